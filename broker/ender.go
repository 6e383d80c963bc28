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

// ender records closed sessions in batches: one transaction, one audit append and one
// notification per node for everything that closed while the previous batch was in flight.
// A batch that fails is retried, so a presence never stays live for a socket that is gone
// (and the sweeper's reconcile backs that up).
type ender struct {
	service
	store   *store.Store
	signals signals
	grace   time.Duration
	log     *slog.Logger
	metrics *Metrics
	q       *queue[presenceEnd]
}

func newEnder(st *store.Store, sig signals, grace time.Duration, log *slog.Logger, m *Metrics) *ender {
	return &ender{store: st, signals: sig, grace: grace, log: log, metrics: m, q: newQueue[presenceEnd]()}
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
	var grace, now []store.PresenceRef
	all := make([]string, 0, len(batch))
	for _, p := range batch {
		all = append(all, p.ref.ID)
		if p.mode == endGrace {
			grace = append(grace, p.ref)
		} else {
			now = append(now, p.ref)
		}
	}
	_, err := e.store.InTx(ctx, nil, func(tx *store.Tx) error {
		if len(grace) > 0 {
			if err := tx.GracePresences(ctx, e.signals.nodeID, grace, time.Now().Add(e.grace)); err != nil {
				return err
			}
		}
		if len(now) > 0 {
			ended, err := tx.EndPresences(ctx, e.signals.nodeID, now)
			if err != nil {
				return err
			}
			for _, p := range ended {
				tx.Audit(e.signals.presenceEnded(tx.Outbox, p))
			}
		}
		released, err := tx.ReleasePresencePushes(ctx, all)
		if err != nil || len(released) == 0 {
			return err
		}
		holders, err := tx.Holders(ctx, released)
		if err != nil {
			return err
		}
		e.signals.deliveriesFor(tx.Outbox, holders)
		return nil
	})
	return err
}
