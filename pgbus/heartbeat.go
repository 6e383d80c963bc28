package pgbus

import (
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"sync"
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
	// OnTakenOver runs on the heartbeat goroutine, once, when another process registered
	// under this node's id (two replicas given one BROKER_NODE_ID): this one must stop, as each
	// would end the other's sessions. The heartbeat beats no more.
	OnTakenOver func(holder string)
	// SharedAfter is how recent another process's heartbeat must be, at registration, for the
	// id to be reported as possibly shared (0: never).
	SharedAfter time.Duration
}

// Heartbeat keeps this replica's row in the node registry: registered at Start (presences
// reference it, so a replica registers before it serves), refreshed every Interval, marked
// stopped by Stop. Other replicas judge a node dead by its heartbeat.
type Heartbeat struct {
	cfg HeartbeatConfig
	q   *db.Queries
	// instance tells this process's registration from another's under the same node id.
	instance string
	lastOK   atomic.Int64 // unix nanos of the last successful beat
	// takenOver: another process registered under this id; beats stopped for good.
	takenOver atomic.Bool
	upSince   atomic.Int64 // unix nanos since beats succeed without a break; 0 while failing
	// mu serializes beats (the ticks and Beat); registered is whether the node row is ours.
	mu         sync.Mutex
	registered bool
	failing    int  // beats (or registrations) failed in a row
	logged     bool // the outage's first failure was logged: its end is too

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
	if cfg.OnTakenOver == nil {
		cfg.OnTakenOver = func(string) {}
	}
	return &Heartbeat{cfg: cfg, q: db.New(cfg.Exec), instance: rand.Text()}
}

// LastOK is when the last beat (or registration) succeeded; zero before any did.
func (h *Heartbeat) LastOK() time.Time { return unixNanos(h.lastOK.Load()) }

// FailedBeats is how many beats (or registrations) have failed in a row: 0 while beating.
func (h *Heartbeat) FailedBeats() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.failing
}

// TakenOver says another process registered under this node's id (OnTakenOver ran).
func (h *Heartbeat) TakenOver() bool { return h.takenOver.Load() }

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
	h.mu.Lock()
	h.registered = h.register(ctx)
	h.mu.Unlock()
	return h.base.Run(ctx, h.loop)
}

func (h *Heartbeat) register(ctx context.Context) bool {
	opCtx, cancel := context.WithTimeout(ctx, h.cfg.Interval)
	defer cancel()
	n := h.cfg.Node()
	prev, err := h.q.NodeRegister(opCtx, db.NodeRegisterParams{ID: n.ID, Instance: h.instance, Region: n.Region,
		Address: n.Address, Version: n.Version})
	if err != nil {
		// Judged by the caller's context: a registration that timed out (Postgres not
		// answering) is an outage too, only a stop is not.
		h.failed(ctx, err, "registering", true)
		return false
	}
	h.recovered()
	if age := time.Duration(prev.PrevHeartbeatAgeSeconds * float64(time.Second)); age >= 0 && age < h.cfg.SharedAfter {
		h.cfg.Logger.Warn("this node id was held by another process until moments ago: if that process still runs, "+
			"give each replica its own BROKER_NODE_ID (it will stop); if it crashed, nothing is wrong",
			"node", n.ID, "heartbeat_age", age.Round(time.Millisecond))
	}
	h.ok()
	return true
}

// failed counts a failed beat or registration and logs the first of an outage that is not
// this replica's own stop: once per outage, not per beat (/health says it lasts, and the line
// when it ends how long).
func (h *Heartbeat) failed(ctx context.Context, err error, args ...any) {
	h.failing++
	if ctx.Err() == nil && !h.logged {
		h.logged = true
		h.cfg.Logger.Warn("heartbeat failing; retried every beat", append([]any{"err", err}, args...)...)
	}
}

// recovered ends an outage of failed beats.
func (h *Heartbeat) recovered() {
	if h.logged {
		h.cfg.Logger.Info("heartbeat written again", "failed_beats", h.failing)
	}
	h.failing, h.logged = 0, false
}

func (h *Heartbeat) ok() {
	now := time.Now().UnixNano()
	h.lastOK.Store(now)
	h.upSince.CompareAndSwap(0, now)
}

func (h *Heartbeat) loop(ctx context.Context) {
	startstop.Tick(ctx, h.cfg.Interval, func(time.Time) { h.beat(ctx) })
}

// Beat beats now, beside the ticks, and reports whether beats succeed: for a caller about to
// act on beats failing, whose own tick may come just before the one that finds Postgres back.
func (h *Heartbeat) Beat(ctx context.Context) bool {
	h.beat(ctx)
	return !h.UpSince().IsZero()
}

func (h *Heartbeat) beat(ctx context.Context) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.registered {
		if h.registered = h.register(ctx); !h.registered {
			h.upSince.Store(0)
		}
		return
	}
	if h.takenOver.Load() {
		return
	}
	opCtx, cancel := context.WithTimeout(ctx, h.cfg.Interval)
	defer cancel()
	_, err := h.q.NodeHeartbeat(opCtx, db.NodeHeartbeatParams{ID: h.cfg.Node().ID, Instance: h.instance})
	holder := h.instance
	if errors.Is(err, pgx.ErrNoRows) {
		if holder, err = h.q.NodeHolder(opCtx, h.cfg.Node().ID); errors.Is(err, pgx.ErrNoRows) {
			holder, err = h.instance, nil // the row is gone: register again
		}
		if err == nil && holder == "" {
			holder = h.instance // a replica of the previous release registered it last
		}
	} else if err == nil {
		h.recovered()
		h.ok()
		return
	}
	switch {
	case err == nil && holder != h.instance:
		// Registering again would take the id back and end the other's sessions in turn.
		h.takenOver.Store(true)
		h.upSince.Store(0)
		h.cfg.Logger.Error("another process registered under this node's id: BROKER_NODE_ID is shared by two replicas; "+
			"this one stops (give each replica its own id)", "node", h.cfg.Node().ID)
		h.cfg.OnTakenOver(holder)
	case err == nil:
		h.cfg.Logger.Warn("this node was declared dead by a peer; re-registering")
		h.upSince.Store(0)
		h.registered = false
		h.cfg.OnDeclaredDead()
	default:
		h.upSince.Store(0)
		h.failed(ctx, err)
	}
}

// Stop ends the heartbeat and marks the node stopped, so a clean exit is never mistaken for a
// death: within ctx and 3 s. Not beyond ctx, which the caller's stop is bounded by (the broker's
// Stop passes its margin past the drain deadline here). Safe twice.
func (h *Heartbeat) Stop(ctx context.Context) error {
	err := h.base.Stop(ctx)
	if h.takenOver.Load() {
		return err // the row is the other process's now
	}
	mctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if e := h.q.NodeStop(mctx, db.NodeStopParams{ID: h.cfg.Node().ID, Instance: h.instance}); e != nil {
		h.cfg.Logger.Warn("mark node stopped", "err", e)
		return errors.Join(err, e)
	}
	return err
}
