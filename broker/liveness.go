package broker

import (
	"context"
	"log/slog"
	"time"

	"github.com/claudemesh/broker/broker/startstop"
	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// liveness acts on the node registry: it takes over replicas that went silent, and sends this
// replica's peers elsewhere when it is itself cut off from Postgres.
type liveness struct {
	service
	store     *store.Store
	signals   signals
	heartbeat *pgbus.Heartbeat
	hub       *hub
	interval  time.Duration
	deadAfter time.Duration
	grace     time.Duration
	log       *slog.Logger
	metrics   *Metrics
	// onTakeOver runs after dead nodes were taken over (their expired graces end at once).
	onTakeOver func(ctx context.Context)
}

// Start checks every interval until Stop.
func (l *liveness) Start(ctx context.Context) error {
	return l.start(ctx, func(ctx context.Context) {
		sentAway := false // sessions already sent elsewhere during this outage
		startstop.Tick(ctx, l.interval, func(time.Time) {
			if up := l.heartbeat.UpSince(); !up.IsZero() {
				sentAway = false
				// Judge others only once connected for a whole deadline ourselves: after a
				// Postgres outage every heartbeat is stale, and the first replica back must not
				// declare all the others dead.
				if time.Since(up) > l.deadAfter {
					l.takeOver(ctx)
				}
				return
			}
			// Cut off from Postgres we can neither store nor route: send the peers to a healthy
			// replica before the others declare us dead, so they resume there instead of being
			// listed as gone.
			if !sentAway && time.Since(l.heartbeat.LastOK()) > l.deadAfter/2 && l.hub.len() > 0 {
				// The heartbeat ticks with this check, so the beats read may end with one that
				// failed just before Postgres came back: beat now, and keep the sessions if it
				// succeeds (an outage spanning two beats closed every session a beat after it).
				if l.heartbeat.Beat(ctx) {
					return
				}
				l.log.Warn("Postgres unreachable; asking sessions to reconnect to another replica", "sessions", l.hub.len())
				reconnectAll(l.hub)
				sentAway = true
			}
		})
	})
}

// reconnectAll closes every local session with 1012 so its peer reconnects (anywhere).
func reconnectAll(h *hub) {
	for _, sess := range h.all() {
		closeWith(sess.ws, protocol.CloseDraining, "reconnect")
	}
}

// takeOver marks silent nodes dead, puts their presences in grace and releases their unacked
// pushes, then wakes every replica for the recipients (as release_held does, migration 00040).
func (l *liveness) takeOver(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var dead []store.DeadNode
	_, err := l.store.InTx(ctx, nil, func(tx *store.Tx) error {
		var released []string
		var err error
		if dead, released, err = tx.TakeOverDeadNodes(ctx, l.deadAfter, l.grace); err != nil {
			return err
		}
		l.signals.pendingFor(tx.Outbox, released)
		return nil
	})
	if err != nil {
		if ctx.Err() == nil {
			l.metrics.backgroundError(l.log, "dead_node_takeover", err, "retry", "next heartbeat")
		}
		return
	}
	for _, d := range dead {
		l.metrics.DeadNodes.Inc()
		l.log.Warn("node declared dead; its sessions are in grace and its unacked pushes released", "dead_node", d.ID)
	}
	if len(dead) > 0 {
		l.onTakeOver(ctx) // presences whose grace already ran out leave now
	}
}
