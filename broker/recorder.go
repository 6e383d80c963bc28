package broker

import (
	"context"
	"log/slog"
	"time"

	"github.com/claudemesh/broker/broker/store"
)

// recorder records what happened to deliveries in batches off the hot path: client_acks, pushes
// written to sessions that don't ack, and assigned pushes written to sessions that do.
// Everything that arrived while the previous statement was in flight goes into the next one;
// taken pushes wait up to recordLinger for their ack to share its statement.
type recorder struct {
	service
	store   *store.Store
	log     *slog.Logger
	metrics *Metrics
	acks    *queue[store.Ack]
	written *queue[int64]
	taken   *queue[int64]
}

// recordLinger is how long a taken push's record waits for an ack to share a statement with.
const recordLinger = 20 * time.Millisecond

func newRecorder(st *store.Store, log *slog.Logger, m *Metrics) *recorder {
	r := &recorder{store: st, log: log, metrics: m, acks: newQueue[store.Ack](), written: newQueue[int64](), taken: newQueue[int64]()}
	r.written.wake = r.acks.wake // acks and writes are recorded at once; taken pushes linger
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
			if ctx.Err() != nil {
				fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
				r.flush(fctx)
				cancel()
				return
			}
			select {
			case <-ctx.Done():
				continue // the final flush above
			case <-r.acks.wake:
				// An ack is recorded at once: until it is, a reconnect would get the message
				// again.
			case <-r.taken.wake:
				// A push's client_ack usually follows it within milliseconds: lingering a
				// moment (cut short by the ack) puts both in one statement, one row update
				// instead of two. Nothing waits on the taken record but the catch-up.
				t := time.NewTimer(recordLinger)
				select {
				case <-ctx.Done():
				case <-r.acks.wake:
				case <-t.C:
				}
				t.Stop()
			}
			if ctx.Err() == nil { // else the final flush, with a context of its own
				r.flush(ctx)
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
