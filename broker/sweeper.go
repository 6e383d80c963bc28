package broker

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/claudemesh/broker/broker/startstop"
	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// sweeper is the replica's periodic database upkeep: presences whose grace ran out end,
// sessions stuck in working flip to idle, presences without a socket are reconciled, expired
// deliveries, envelopes, hook signals, signatures and old state deletions are swept, the
// pending gauge is read, and the hot tables' planner statistics are kept up with their growth.
type sweeper struct {
	service
	store     *store.Store
	signals   signals
	hub       *hub
	pusher    *pusher
	ender     *ender
	statusTTL time.Duration
	// maxPending is what may wait for one member (MAX_PENDING_PER_MEMBER).
	maxPending int
	every      time.Duration // the tick; the slower sweeps run every few ticks
	// idTaken says another process registered under this node's id: the presences under it
	// that this one holds no socket for are that one's, not orphans.
	idTaken func() bool
	log     *slog.Logger
	metrics *Metrics
	// taskTimeout bounds each sweep (default 30 s; tests).
	taskTimeout time.Duration
	// expire replaces sweepExpired (tests).
	expire func(context.Context)
}

// Start sweeps every second until Stop; the slower sweeps run every few ticks. Replicas
// started together (a deploy, `broker dev`) would sweep in step: each starts at a random point
// of the tick and of the slower sweeps' cycle, so their cluster-wide statements (the gauges,
// the statistics) do not land on Postgres at the same instant.
func (w *sweeper) Start(ctx context.Context) error {
	return w.start(ctx, func(ctx context.Context) {
		phase := time.NewTimer(rand.N(w.every))
		defer phase.Stop()
		select {
		case <-ctx.Done():
			return
		case <-phase.C:
		}
		n := rand.IntN(30)
		// The deleting sweep runs beside the tick, one at a time: clearing a backlog takes
		// seconds, and the grace, working and backlog sweeps run every tick (a dead node's
		// sessions end on time).
		var expiring sync.WaitGroup
		var expiryBusy atomic.Bool
		defer expiring.Wait()
		startstop.Tick(ctx, w.every, func(time.Time) {
			n++
			w.run(ctx, "sweep_grace", w.sweepGrace)
			w.run(ctx, "sweep_working", w.sweepWorking)
			if n%2 == 0 {
				w.run(ctx, "sweep_backlog", w.sweepBacklog)
			}
			if n%5 == 0 {
				w.run(ctx, "pending_gauge", w.updatePendingGauge)
				w.run(ctx, "refresh_statistics", w.refreshStatistics)
			}
			if n%15 == 0 {
				w.run(ctx, "reconcile", w.reconcile)
			}
			if n%30 == 0 && expiryBusy.CompareAndSwap(false, true) {
				expiring.Go(func() {
					defer expiryBusy.Store(false)
					if w.expire != nil {
						w.expire(ctx)
						return
					}
					w.sweepExpired(ctx)
				})
			}
		})
	})
}

// run runs one sweep with its own deadline; a failure is logged and counted, and the sweep
// runs again at its next tick.
func (w *sweeper) run(ctx context.Context, task string, f func(context.Context) error) {
	timeout := 30 * time.Second
	if w.taskTimeout > 0 {
		timeout = w.taskTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := f(ctx); err != nil && ctx.Err() == nil {
		w.metrics.backgroundError(w.log, task, err, "retry", "next tick")
	}
}

// refreshStatistics analyzes the hot tables that grew far past their statistics, so the plans
// every connection caches stop walking indexes the statistics say are empty.
func (w *sweeper) refreshStatistics(ctx context.Context) error {
	names, err := w.store.RefreshStatistics(ctx)
	if len(names) > 0 {
		w.log.Info("analyzed tables that outgrew their statistics", "tables", names)
	}
	return err
}

// sweepGrace ends presences whose grace ran out, on this node or on a node that is gone.
func (w *sweeper) sweepGrace(ctx context.Context) error {
	_, err := w.store.InTx(ctx, nil, func(tx *store.Tx) error {
		ended, err := tx.EndExpiredGrace(ctx)
		for _, p := range ended {
			tx.Audit(w.signals.presenceEnded(tx.Outbox, p))
		}
		return err
	})
	return err
}

// sweepWorking flips this node's sessions stuck in working to idle, releasing held messages.
func (w *sweeper) sweepWorking(ctx context.Context) error {
	var changed []store.StatusChange
	_, err := w.store.InTx(ctx, nil, func(tx *store.Tx) error {
		var err error
		changed, err = tx.ExpireWorking(ctx, w.signals.nodeID, w.statusTTL)
		for _, c := range changed {
			w.signals.statusChanged(tx.Outbox, c)
		}
		return err
	})
	if err != nil {
		return err
	}
	for _, c := range changed {
		if sess := w.hub.get(c.ID); sess != nil {
			noteStatus(w.pusher, sess, protocol.StatusIdle)
		}
	}
	return nil
}

// noteStatus records a local session's new status; idle releases its held messages.
func noteStatus(p *pusher, sess *session, st protocol.Status) {
	sess.setStatus(st)
	if st == protocol.StatusIdle {
		p.request(sess)
	}
}

// reconcile puts presences this node owns but holds no session for into grace, so the end of
// a session that could not be recorded (the database was away) is never lost for good.
func (w *sweeper) reconcile(ctx context.Context) error {
	if w.idTaken != nil && w.idTaken() {
		return nil
	}
	orphans, err := w.store.Orphans(ctx, w.signals.nodeID)
	if err != nil {
		return err
	}
	for _, o := range orphans {
		if w.hub.get(o.ID) == nil {
			w.log.Warn("presence without a session on this node; ending it after its grace", "presence", o.ID)
			w.ender.end(presenceEnd{ref: store.PresenceRef(o), mode: endGrace})
		}
	}
	return nil
}

// sweepBacklog keeps the set of members whose waiting messages are at the bound, which sends
// that would add to them are refused for. A member crossing it is logged with its mesh (never
// what waits); the refusals are counted in backlog_skips_total.
func (w *sweeper) sweepBacklog(ctx context.Context) error {
	_, err := w.sweepBacklogNow(ctx)
	return err
}

// backlogGap is the least time between two backlog sweeps of the cluster: every replica tries
// every other tick (at its own phase), the first to find the gap passed sweeps.
const backlogGap = 1500 * time.Millisecond

// sweepBacklogNow sweeps unless another replica is sweeping or just swept (ran false). A
// member hovering at the bound is logged each time it crosses, at Info: the metric counts what
// it costs its senders.
func (w *sweeper) sweepBacklogNow(ctx context.Context) (ran bool, err error) {
	changes, ran, err := w.store.SweepBacklog(ctx, w.maxPending, backlogGap)
	for _, c := range changes {
		if c.AtBound {
			w.log.Info("a member's waiting messages reached the bound; sends that would wait for it are refused recipient_full",
				"mesh", c.MeshID, "member", c.MemberID, "waiting", c.Waiting, "bound", w.maxPending)
		} else {
			w.log.Info("a member's waiting messages fell below the bound; sends to it are accepted again",
				"mesh", c.MeshID, "member", c.MemberID, "waiting", c.Waiting)
		}
	}
	return ran, err
}

// sweepExpired expires what is past its expiry and deletes what is kept no longer, each part
// with a deadline of its own: one held up (a table locked, a long backlog) leaves the others
// to run.
func (w *sweeper) sweepExpired(ctx context.Context) {
	w.run(ctx, "sweep_expired", w.expireDeliveries)
	w.run(ctx, "sweep_expired", w.deleteOldEnvelopes)
	w.run(ctx, "sweep_expired", w.store.DeleteExpired)
}

func (w *sweeper) expireDeliveries(ctx context.Context) error {
	n, err := w.store.ExpireDeliveries(ctx)
	if n > 0 {
		w.log.Info("expired deliveries", "count", n)
	}
	return err
}

func (w *sweeper) deleteOldEnvelopes(ctx context.Context) error {
	_, err := w.store.DeleteOldEnvelopes(ctx)
	return err
}

func (w *sweeper) updatePendingGauge(ctx context.Context) error {
	n, err := w.store.PendingCount(ctx)
	if err != nil {
		return err
	}
	w.metrics.DeliveriesPending.Set(float64(n))
	entries, oldest, err := w.store.AuditPending(ctx)
	if err != nil {
		return err
	}
	w.metrics.AuditPending.Set(float64(entries))
	w.metrics.AuditPendingOldest.Set(oldest)
	return nil
}
