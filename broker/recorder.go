package broker

import (
	"context"
	"log/slog"
	"time"

	"github.com/claudemesh/broker/broker/store"
)

// recorder records what happened to deliveries in batches off the hot path: client_acks, pushes
// written to sessions that don't ack, and assigned pushes written to sessions that do.
// Everything that arrived while the previous statement was in flight, or within recordLinger of
// the first record, goes into the next one.
type recorder struct {
	service
	store   *store.Store
	log     *slog.Logger
	metrics *Metrics
	acks    *queue[store.Ack]
	written *queue[int64]
	taken   *queue[int64]
}

// recordLinger is how long the recorder lets records gather after the first one arrives.
const recordLinger = 20 * time.Millisecond

func newRecorder(st *store.Store, log *slog.Logger, m *Metrics) *recorder {
	r := &recorder{store: st, log: log, metrics: m, acks: newQueue[store.Ack](), written: newQueue[int64](), taken: newQueue[int64]()}
	r.written.wake, r.taken.wake = r.acks.wake, r.acks.wake // one loop wakes for all
	return r
}

// acked queues a session's client_ack of message ids.
func (r *recorder) acked(sess *session, ids []string) {
	acks := make([]store.Ack, len(ids))
	for i, id := range ids {
		acks[i] = store.Ack{EnvelopeID: id, MemberID: sess.memberID, SessionPubkey: sess.sessionPubkey, SessionID: sess.sessionID}
	}
	r.acks.add(acks...)
}

// wrote queues a delivery whose push was written to a session that does not ack.
func (r *recorder) wrote(id int64) { r.written.add(id) }

// took queues an assigned delivery written to a session that acks: it waits for the ack now.
func (r *recorder) took(id int64) { r.taken.add(id) }

// Start runs the recorder until Stop; the last records are written on the way out.
func (r *recorder) Start(ctx context.Context) error {
	return r.start(ctx, func(ctx context.Context) {
		for {
			select {
			case <-ctx.Done():
				fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
				r.flush(fctx)
				cancel()
				return
			case <-r.acks.wake:
				// A push's client_ack usually follows it within milliseconds: lingering a
				// moment puts both in one statement, one row update instead of two, and
				// fewer statements in all. Nothing waits on this record but a redelivery.
				t := time.NewTimer(recordLinger)
				select {
				case <-ctx.Done(): // the loop flushes on its way out
				case <-t.C:
					r.flush(ctx)
				}
				t.Stop()
			}
		}
	})
}

func (r *recorder) flush(ctx context.Context) {
	acks, written, taken := r.acks.take(), r.written.take(), r.taken.take()
	if len(acks)+len(written)+len(taken) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := r.store.MarkDelivered(ctx, acks, written, taken); err != nil {
		// The rows stay assigned or pushed: they go back to pending when the session ends and
		// reach the recipient again: at least once.
		r.metrics.backgroundError(r.log, "record_deliveries", err, "count", len(acks)+len(written)+len(taken))
	}
}
