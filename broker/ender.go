package broker

import (
	"context"
	"log/slog"
	"time"

	"github.com/claudemesh/broker/broker/store"
)

// endMode says what a closing socket does to its presence.
type endMode int

const (
	endGrace    endMode = iota // non-clean close: keep the presence listed for the grace window
	endNow                     // clean close, revoke or kick: the peer is gone
	endReplaced                // another socket took the presence over: leave it alone
)

// presenceEnd is a closed socket's presence to record.
type presenceEnd struct {
	ref  store.PresenceRef // the registration the closed socket owned
	mode endMode
}

// ender records closed sessions in batches: one statement (its audit append and one
// notification per node inside) for everything that closed while the previous batch was in
// flight.
// A batch that fails is retried, so a presence never stays live for a socket that is gone
// (and the sweeper's reconcile backs that up).
type ender struct {
	service
	store   *store.Store
	nodeID  string
	grace   time.Duration
	log     *slog.Logger
	metrics *Metrics
	q       *queue[presenceEnd]
	// settle records this replica's queued acks and writes (recorder.settle) before sessions
	// are ended, so an end releases only what was not delivered.
	settle func(context.Context) error
}

func newEnder(st *store.Store, nodeID string, grace time.Duration, settle func(context.Context) error, log *slog.Logger, m *Metrics) *ender {
	return &ender{store: st, nodeID: nodeID, grace: grace, settle: settle, log: log, metrics: m, q: newQueue[presenceEnd]()}
}

func (e *ender) end(p presenceEnd) { e.q.add(p) }

// Start records ends until Stop; what closed during the drain is recorded on the way out.
func (e *ender) Start(ctx context.Context) error {
	return e.start(ctx, func(ctx context.Context) {
		retry := time.NewTimer(time.Hour)
		defer retry.Stop()
		failures := 0
		for {
			select {
			case <-ctx.Done():
				fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
				_ = e.flush(fctx)
				cancel()
				return
			case <-e.q.wake:
			case <-retry.C:
			}
			if err := e.flush(ctx); err != nil {
				failures++
				retry.Reset(min(time.Duration(failures)*200*time.Millisecond, 3*time.Second))
				continue
			}
			failures = 0
		}
	})
}

// flush writes every queued end; on failure they go back for the retry.
func (e *ender) flush(ctx context.Context) error {
	batch := e.q.take()
	if len(batch) == 0 {
		return nil
	}
	err := e.record(ctx, batch)
	if err != nil {
		e.q.putBack(batch)
		if ctx.Err() == nil {
			e.metrics.backgroundError(e.log, "record_session_ends", err, "count", len(batch), "retry", "with backoff")
		}
	}
	return err
}

func (e *ender) record(ctx context.Context, batch []presenceEnd) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := e.settle(ctx); err != nil {
		return err // the batch is retried
	}
	var grace, now []store.PresenceRef
	for _, p := range batch {
		if p.mode == endGrace {
			grace = append(grace, p.ref)
		} else {
			now = append(now, p.ref)
		}
	}
	return e.store.EndSessions(ctx, e.nodeID, grace, time.Now().Add(e.grace), now)
}
