package pgbus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgxlisten"

	"github.com/claudemesh/broker/broker/startstop"
	"github.com/claudemesh/broker/db"
)

// Defaults; zero Config fields mean these.
const (
	DefaultNamespace    = "claudemesh"
	DefaultQueueSize    = 4096
	DefaultPingInterval = 2 * time.Second
	// A LISTEN connection that has not seen its own ping for this long is replaced.
	DefaultPingTimeout = 6 * time.Second
	maxReconnectDelay  = 3 * time.Second
)

// Config configures a Bus.
type Config struct {
	// ConnConfig is where the LISTEN connection goes: straight to the primary, never through
	// a transaction-mode pooler (LISTEN is session state).
	ConnConfig *pgx.ConnConfig
	// Exec runs the bus's own writes (pings); usually the replica's pool.
	Exec         db.DBTX
	NodeID       string
	Namespace    string
	QueueSize    int
	PingInterval time.Duration
	PingTimeout  time.Duration
	Logger       *slog.Logger
	// Observe, when set, is told about bus events for metrics: "received", "reconnect",
	// "overflow", "bad_payload".
	Observe func(event string, n int)
}

// Bus owns one LISTEN connection on its node channel and the cluster channel. Handlers never
// run on the listener: notifications go to a bounded queue, and an overflow turns into a
// resync signal instead of a silent drop.
type Bus struct {
	cfg       Config
	node      string
	cluster   string
	queue     chan Message
	resync    chan struct{}
	connected atomic.Bool
	lastPing  atomic.Int64 // unix nanos of the last own ping received
	log       *slog.Logger
	// behind: a message was dropped and no resync has been queued since; until one is (once
	// the queue is half empty: resume), nothing more is queued (touched only on the listener's
	// goroutine).
	behind bool
	// heard is the database clock (unix microseconds) of the latest own ping received: every
	// notification committed before that ping has been received, since Postgres delivers them
	// in commit order. 0 until the first. It follows the clock back when it steps back.
	heard atomic.Int64
	// lost, lostFrom: a complete connection ended and the next has not completed yet; what was
	// heard when it ended (listener goroutine only). The gap is marked once the next connection
	// is complete, just before its resync, so no catch-up run meanwhile can take it.
	lost     bool
	lostFrom int64
	gapMu    sync.Mutex
	gapOpen  bool
	gapFrom  int64
	// pingNow asks for a ping at once (a connection completed): heard is then soon current.
	pingNow chan struct{}

	startstop.Base
}

// New validates cfg and builds a Bus; Start runs it.
func New(cfg Config) (*Bus, error) {
	if cfg.ConnConfig == nil || cfg.Exec == nil || cfg.NodeID == "" {
		return nil, errors.New("pgbus: ConnConfig, Exec and NodeID are required")
	}
	if cfg.Namespace == "" {
		cfg.Namespace = DefaultNamespace
	}
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = DefaultQueueSize
	}
	if cfg.PingInterval <= 0 {
		cfg.PingInterval = DefaultPingInterval
	}
	if cfg.PingTimeout <= 0 {
		cfg.PingTimeout = DefaultPingTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Observe == nil {
		cfg.Observe = func(string, int) {}
	}
	node := NodeChannel(cfg.Namespace, cfg.NodeID)
	if len(node) > 63 {
		return nil, fmt.Errorf("pgbus: channel %q is longer than 63 bytes: shorten the namespace or node id", node)
	}
	return &Bus{
		cfg:     cfg,
		node:    node,
		cluster: ClusterChannel(cfg.Namespace),
		queue:   make(chan Message, cfg.QueueSize),
		resync:  make(chan struct{}, 1),
		pingNow: make(chan struct{}, 1),
		log:     cfg.Logger.With("component", "pgbus"),
	}, nil
}

// ListenerAppName is the application_name of a node's LISTEN connection.
func ListenerAppName(nodeID string) string {
	name := "claudemesh-listen-" + nodeID
	if len(name) > 63 {
		name = name[:63]
	}
	return name
}

// NodeChannel is the channel a node listens on for messages directed at it.
func NodeChannel(namespace, nodeID string) string { return namespace + "_n_" + nodeID }

// ClusterChannel carries mesh-wide events every node hears.
func ClusterChannel(namespace string) string { return namespace + "_all" }

// NodeChannel returns the directed channel of another node.
func (b *Bus) NodeChannel(nodeID string) string { return NodeChannel(b.cfg.Namespace, nodeID) }

// ClusterChannel returns the cluster-wide channel.
func (b *Bus) ClusterChannel() string { return b.cluster }

// Messages is the queue of received messages, in arrival order.
func (b *Bus) Messages() <-chan Message { return b.queue }

// Resync fires after an overflow of the queue: the consumer must re-read everything it holds,
// since notifications were dropped. After every (re)connect the same request comes in order,
// as a KindResync message on Messages: before anything received on the new connection, so
// the consumer catches up on the gap before it applies what followed it.
func (b *Bus) Resync() <-chan struct{} { return b.resync }

// Connected reports whether the LISTEN connection is up.
func (b *Bus) Connected() bool { return b.connected.Load() }

// Heard is the database clock (unix microseconds) up to which every notification was received
// (see heard); 0 before the first ping came back.
func (b *Bus) Heard() int64 { return b.heard.Load() }

// TakeGap returns, and forgets, the start of the notifications lost since the last call (a
// connection that ended, a queue overflow): the database clock (unix microseconds) up to which
// every notification had been received before them, 0 if none had been yet. ok is false when
// nothing was lost. Call it when resyncing: what changed since then may not have been heard.
func (b *Bus) TakeGap() (from int64, ok bool) {
	b.gapMu.Lock()
	defer b.gapMu.Unlock()
	from, ok = b.gapFrom, b.gapOpen
	b.gapOpen = false
	return from, ok
}

// markGap records that notifications after from may have been lost; the earliest counts.
func (b *Bus) markGap(from int64) {
	b.gapMu.Lock()
	defer b.gapMu.Unlock()
	if !b.gapOpen || from < b.gapFrom {
		b.gapOpen, b.gapFrom = true, from
	}
}

// disconnected records the end of the connection; it reports whether it had been complete.
func (b *Bus) disconnected() bool {
	if !b.connected.Swap(false) {
		return false
	}
	if !b.lost {
		b.lost, b.lostFrom = true, b.heard.Load()
	}
	return true
}

// Start runs the listener and the self-ping until Stop or until ctx ends.
func (b *Bus) Start(ctx context.Context) error {
	return b.Run(ctx, func(ctx context.Context) {
		var wg sync.WaitGroup
		wg.Go(func() { b.listenLoop(ctx) })
		wg.Go(func() { b.pingLoop(ctx) })
		wg.Wait()
	})
}

// Stop (from startstop.Base) ends the listener and waits for its goroutines (or ctx). Safe
// before Start and twice: a second call waits again, so a Stop whose deadline passed can be
// completed.

func (b *Bus) signalResync() {
	select {
	case b.resync <- struct{}{}:
	default: // one pending signal is enough
	}
}

// resyncInOrder queues a resync among the messages; a full queue falls back to the signal.
func (b *Bus) resyncInOrder() {
	if !b.queueResync() {
		b.overflow()
	}
}

// queueResync queues a resync among the messages if there is room, and says so.
func (b *Bus) queueResync() bool {
	select {
	case b.queue <- Message{Kind: KindResync}:
		b.behind = false
		return true
	default:
		return false
	}
}

// resume ends an episode of drops, queueing its resync, once the consumer has taken half the
// queue. Not at the first free slot: a consumer that stays behind would get a resync (a full
// one, for every local session) and a log line for nearly every message it takes, and
// everything else dropped; one resync covers what is dropped until it is queued.
func (b *Bus) resume() bool {
	return len(b.queue) <= cap(b.queue)/2 && b.queueResync()
}

// overflow records a dropped message: the consumer is told at once (nothing more may come to
// carry the resync), and what arrives next waits behind a queued resync (enqueue).
func (b *Bus) overflow() {
	b.cfg.Observe("overflow", 1)
	if !b.behind { // once per episode: a burst drops many
		b.log.Warn("bus queue full: notifications dropped until the consumer catches up; a full resync follows",
			"queue_size", cap(b.queue))
	}
	// Every drop: the consumer may have taken the episode's gap (its out-of-band resync) while
	// the queue was still full.
	b.markGap(b.heard.Load())
	b.behind = true
	b.signalResync()
}

// enqueue hands m to the consumer, never blocking. After a drop, m goes only behind a resync:
// applied before the catch-up that recovers the dropped message, a later push to the same
// session would reach it first (the out-of-band signal may be read after the queue).
func (b *Bus) enqueue(m Message) {
	if b.behind && !b.resume() {
		b.overflow()
		return
	}
	select {
	case b.queue <- m:
	default:
		b.overflow()
	}
}

// listenLoop keeps one LISTEN connection alive. pgxlisten reconnects by itself; the
// backoff lives in Connect (pgxlisten's own delay is fixed). The loop here only replaces a
// connection the ping watchdog found dead, with a fresh context.
func (b *Bus) listenLoop(ctx context.Context) {
	failures := 0 // consecutive failed connection attempts; touched only on this goroutine
	for ctx.Err() == nil {
		connCtx, cancelConn := context.WithCancel(ctx)
		b.lastPing.Store(time.Now().UnixNano())
		watchDone := make(chan struct{})
		go func() {
			defer close(watchDone)
			b.watchdog(connCtx, cancelConn)
		}()
		l := &pgxlisten.Listener{
			Connect: func(ctx context.Context) (*pgx.Conn, error) {
				if b.disconnected() {
					b.log.Warn("LISTEN connection lost; reconnecting")
				}
				if failures > 0 {
					if !sleepCtx(ctx, backoff(failures)) {
						return nil, ctx.Err()
					}
				}
				cc := b.cfg.ConnConfig.Copy()
				// Named, so operators (and tests) can tell listeners apart in pg_stat_activity.
				cc.RuntimeParams["application_name"] = ListenerAppName(b.cfg.NodeID)
				// Its context ends while it waits, idle, for notifications (a stop, the watchdog):
				// no statement to cancel, so drop it at once rather than after a cancel's wait.
				cc.BuildContextWatcherHandler = func(c *pgconn.PgConn) ctxwatch.Handler {
					return &pgconn.DeadlineContextWatcherHandler{Conn: c.Conn()}
				}
				// Keepalive finds a silently dropped connection even between pings.
				cc.DialFunc = (&net.Dialer{KeepAlive: 10 * time.Second, Timeout: 5 * time.Second}).DialContext
				conn, err := pgx.ConnectConfig(ctx, cc)
				failures++ // reset once LISTEN succeeds (HandleBacklog)
				return conn, err
			},
			LogError: func(ctx context.Context, err error) {
				// The loss and the first failed attempt, not every retry of an outage (every
				// 3 s at most): "LISTEN connected" then says how many failed.
				if ctx.Err() == nil && failures <= 1 {
					b.log.Warn("listener", "err", err, "attempt", failures)
				}
			},
			ReconnectDelay: -1, // no fixed delay: Connect backs off with jitter
		}
		handler := &handler{b: b, onConnect: func() int { f := failures; failures = 0; return f }}
		l.Handle(b.node, handler)
		l.Handle(b.cluster, handler)
		_ = l.Listen(connCtx) // returns only when connCtx ends; errors were logged
		cancelConn()
		<-watchDone
		b.disconnected()
		if ctx.Err() != nil {
			return
		}
		failures = max(failures, 1) // a watchdog replacement counts as a failure
	}
}

// backoff is the jittered exponential delay before reconnect attempt n (n >= 1): 50 ms
// doubling to maxReconnectDelay, halved at random so replicas don't reconnect in lockstep.
func backoff(n int) time.Duration {
	d := min(time.Duration(1<<min(n-1, 10))*50*time.Millisecond, maxReconnectDelay)
	return d/2 + rand.N(d/2+1)
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// watchdog cancels the connection when its own pings stop arriving.
func (b *Bus) watchdog(ctx context.Context, cancel context.CancelFunc) {
	startstop.Tick(ctx, b.cfg.PingInterval/2, func(time.Time) {
		if ctx.Err() == nil && b.connected.Load() && time.Since(time.Unix(0, b.lastPing.Load())) > b.cfg.PingTimeout {
			b.log.Warn("LISTEN connection missed its pings; replacing it", "timeout", b.cfg.PingTimeout)
			cancel() // ends this Tick too
		}
	})
}

// pingLoop notifies the node's own channel so the watchdog can see the LISTEN path work end
// to end (a socket can look open while delivering nothing). Each ping carries the database's
// clock, which says up to when notifications were heard (Heard).
func (b *Bus) pingLoop(ctx context.Context) {
	q := db.New(b.cfg.Exec)
	t := time.NewTicker(b.cfg.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-b.pingNow:
		}
		opCtx, cancel := context.WithTimeout(ctx, b.cfg.PingInterval)
		err := q.NotifyPing(opCtx, db.NotifyPingParams{Channel: b.node, NodeID: b.cfg.NodeID})
		cancel()
		if err != nil && ctx.Err() == nil {
			b.log.Debug("bus ping", "err", err)
		}
	}
}

type handler struct {
	b         *Bus
	onConnect func() int // the failed attempts before this connection
	// The connection each channel was last LISTENed on. pgxlisten LISTENs in map order,
	// which is random: either channel may come last. Holding the pointers keeps a closed
	// connection's address from being reused, so equality means the same connection.
	nodeOn, clusterOn *pgx.Conn
}

// HandleBacklog runs right after each LISTEN succeeds: whatever was sent while we were not
// listening is only in the tables, so the consumer resyncs.
func (h *handler) HandleBacklog(_ context.Context, channel string, conn *pgx.Conn) error {
	switch channel {
	case h.b.node:
		h.nodeOn = conn
	case h.b.cluster:
		h.clusterOn = conn
	}
	// Only with both channels listened is the connection complete: connected (or the
	// resync) any earlier would let a NOTIFY to the other channel go unheard, and unresynced.
	if h.nodeOn == conn && h.clusterOn == conn {
		h.b.connected.Store(true)
		h.b.lastPing.Store(time.Now().UnixNano())
		// The attempt that connected counts among failures: the ones before it failed.
		h.b.log.Info("LISTEN connected", "channel", h.b.node, "failed_attempts", max(h.onConnect()-1, 0))
		if h.b.lost { // before the resync that will take it
			h.b.markGap(h.b.lostFrom)
			h.b.lost = false
			// Counted here, once re-established: counted per attempt, an outage added one
			// for each retry and a connection replaced at the first attempt none.
			h.b.cfg.Observe("reconnect", 1)
		}
		select {
		case h.b.pingNow <- struct{}{}:
		default:
		}
		// Notifications are read only after every channel's backlog call: this comes first.
		h.b.resyncInOrder()
	}
	return nil
}

// HandleNotification never blocks: a full queue becomes a resync.
func (h *handler) HandleNotification(_ context.Context, n *pgconn.Notification, _ *pgx.Conn) error {
	msgs, err := Decode(n.Payload)
	if err != nil {
		h.b.cfg.Observe("bad_payload", 1)
		h.b.log.Warn("bad bus payload; resyncing", "channel", n.Channel, "err", err)
		// What the unreadable lines said is lost as a dropped notification is: a push stays
		// assigned to its session and a later one would overtake it. The consumer catches up
		// first, before this payload's readable lines and what follows.
		h.b.markGap(h.b.heard.Load())
		h.b.resyncInOrder()
	}
	for _, m := range msgs {
		if m.Kind == KindPing {
			if m.Node == h.b.cfg.NodeID {
				h.b.lastPing.Store(time.Now().UnixNano())
				// The latest ping, not the highest clock seen: the database clock can step
				// back, and the writes after the step carry the clock as it is then.
				if m.ID != 0 {
					h.b.heard.Store(m.ID)
				}
			}
			continue
		}
		h.b.cfg.Observe("received", 1)
		if m.Kind == KindResync {
			h.b.resyncInOrder()
			continue
		}
		h.b.enqueue(m)
	}
	return nil
}

// Send writes the outbox's notifications through q, all in one statement (inside the
// caller's transaction, so they go out exactly when its rows become visible).
// It returns how many notifications it sent.
func Send(ctx context.Context, q *db.Queries, o *Outbox) (int, error) {
	ps := o.Payloads()
	if len(ps) == 0 {
		return 0, nil
	}
	p := db.NotifyManyParams{Channels: make([]string, len(ps)), Payloads: make([]string, len(ps))}
	for i, cp := range ps {
		p.Channels[i], p.Payloads[i] = cp.Channel, cp.Payload
	}
	if err := q.NotifyMany(ctx, p); err != nil {
		return 0, fmt.Errorf("notify: %w", err)
	}
	return len(ps), nil
}
