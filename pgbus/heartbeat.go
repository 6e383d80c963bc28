package pgbus

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/broker/startstop"
	"github.com/claudemesh/broker/db"
)

// NodeInfo is what the node registry says about this replica.
type NodeInfo struct{ ID, Region, Address, Version string }

// HeartbeatConfig configures a Heartbeat.
type HeartbeatConfig struct {
	Exec     db.DBTX
	Node     func() NodeInfo // read at each registration (the address is known once listening)
	Interval time.Duration
	Logger   *slog.Logger
	// OnDeclaredDead runs on the heartbeat goroutine when another replica declared this node
	// dead (it was cut off from Postgres): the node re-registers at the next beat.
	OnDeclaredDead func()
}

// Heartbeat keeps this replica's row in the node registry: registered at Start (presences
// reference it, so a replica registers before it serves), refreshed every Interval, marked
// stopped by Stop. Other replicas judge a node dead by its heartbeat.
type Heartbeat struct {
	cfg     HeartbeatConfig
	q       *db.Queries
	lastOK  atomic.Int64 // unix nanos of the last successful beat
	upSince atomic.Int64 // unix nanos since beats succeed without a break; 0 while failing

	base startstop.Base
}

// NewHeartbeat builds a heartbeat; Start runs it.
func NewHeartbeat(cfg HeartbeatConfig) *Heartbeat {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.OnDeclaredDead == nil {
		cfg.OnDeclaredDead = func() {}
	}
	return &Heartbeat{cfg: cfg, q: db.New(cfg.Exec)}
}

// LastOK is when the last beat (or registration) succeeded; zero before any did.
func (h *Heartbeat) LastOK() time.Time { return unixNanos(h.lastOK.Load()) }

// UpSince is the start of the current unbroken run of successful beats; zero while failing.
func (h *Heartbeat) UpSince() time.Time { return unixNanos(h.upSince.Load()) }

func unixNanos(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// Start registers the node, waiting at most one interval (Postgres being down does not fail
// Start: the registration is retried at every beat), then beats until Stop.
func (h *Heartbeat) Start(ctx context.Context) error {
	registered := h.register(ctx)
	return h.base.Run(ctx, func(ctx context.Context) { h.loop(ctx, registered) })
}

func (h *Heartbeat) register(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, h.cfg.Interval)
	defer cancel()
	n := h.cfg.Node()
	if _, err := h.q.NodeRegister(ctx, db.NodeRegisterParams{ID: n.ID, Region: n.Region, Address: n.Address, Version: n.Version}); err != nil {
		if ctx.Err() == nil {
			h.cfg.Logger.Warn("register node", "err", err)
		}
		return false
	}
	h.ok()
	return true
}

func (h *Heartbeat) ok() {
	now := time.Now().UnixNano()
	h.lastOK.Store(now)
	h.upSince.CompareAndSwap(0, now)
}

func (h *Heartbeat) loop(ctx context.Context, registered bool) {
	startstop.Tick(ctx, h.cfg.Interval, func(time.Time) {
		if !registered {
			if registered = h.register(ctx); !registered {
				h.upSince.Store(0)
			}
			return
		}
		opCtx, cancel := context.WithTimeout(ctx, h.cfg.Interval)
		_, err := h.q.NodeHeartbeat(opCtx, h.cfg.Node().ID)
		cancel()
		switch {
		case err == nil:
			h.ok()
		case errors.Is(err, pgx.ErrNoRows):
			h.cfg.Logger.Warn("this node was declared dead by a peer; re-registering")
			h.upSince.Store(0)
			registered = false
			h.cfg.OnDeclaredDead()
		default:
			h.upSince.Store(0)
			if ctx.Err() == nil {
				h.cfg.Logger.Warn("heartbeat", "err", err)
			}
		}
	})
}

// Stop ends the heartbeat and marks the node stopped, with a deadline of its own even when
// ctx has already ended, so a clean exit is never mistaken for a death. Safe twice.
func (h *Heartbeat) Stop(ctx context.Context) error {
	err := h.base.Stop(ctx)
	mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Second)
	defer cancel()
	if e := h.q.NodeStop(mctx, h.cfg.Node().ID); e != nil {
		h.cfg.Logger.Warn("mark node stopped", "err", e)
		return errors.Join(err, e)
	}
	return err
}
