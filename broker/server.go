package broker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// Server is one broker replica: it wires the store, the hub, the bus and the services, serves
// HTTP, and starts and stops them in order. It holds no business logic.
type Server struct {
	cfg      Config
	pool     *pgxpool.Pool
	store    *store.Store
	log      *slog.Logger
	nodeID   string
	started  time.Time
	metrics  *Metrics
	mux      *http.ServeMux
	draining atomic.Bool
	// fileLimit is the open-file limit after Start raised it (sessions hold one each).
	fileLimit atomic.Uint64
	plain     *plainConns // set by Start
	health    *healthPing
	refusals  *sampledLog

	hub       *hub
	bus       *pgbus.Bus
	heartbeat *pgbus.Heartbeat
	peers     *peers
	committer *committer
	registrar *registrar
	pusher    *pusher
	recorder  *recorder
	ender     *ender
	sweeper   *sweeper
	members   *membership.Service
	// services in start order; Stop stops them in reverse.
	services []interface {
		Start(context.Context) error
		Stop(context.Context) error
	}

	mu         sync.Mutex
	httpSrv    *http.Server
	listener   net.Listener
	metricsSrv *http.Server // on METRICS_ADDR, when set
	metricsLn  net.Listener
	served     sync.WaitGroup
	stopped    bool
	// fatal carries why this replica must stop on its own (Fatal).
	fatal chan error
}

// NewServer builds a replica on pool. It does no I/O; Start does.
func NewServer(cfg Config, pool *pgxpool.Pool, logger *slog.Logger) (*Server, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	nodeID := cfg.NodeID
	if nodeID == "" {
		nodeID = NewNodeID()
	}
	s := &Server{cfg: cfg, pool: pool, store: store.New(pool, cfg.BusNamespace), log: logger.With("node", nodeID), nodeID: nodeID,
		started: time.Now(), metrics: newMetrics(), mux: http.NewServeMux(), hub: newHub(), fatal: make(chan error, 1)}
	s.store.SetLogger(s.log)
	s.store.SetNotifyAfterCommit(cfg.NotifyAfterCommit)
	s.store.SetPushBeforeFlush(cfg.PushBeforeFlush)
	s.hub.newLimits = func() *memberLimits { return newMemberLimits(cfg) }
	sweepEvery, pollEvery, busPing := time.Second, pollInterval, time.Duration(0)
	if cfg.quiet {
		sweepEvery, pollEvery, busPing = time.Hour, time.Hour, time.Hour
	}
	bus, err := pgbus.New(pgbus.Config{
		ConnConfig: pool.Config().ConnConfig, Exec: pool, NodeID: nodeID, Namespace: cfg.BusNamespace,
		Logger: s.log, Observe: s.metrics.observeBus, PingInterval: busPing, PingTimeout: 2 * busPing,
	})
	if err != nil {
		return nil, err
	}
	s.bus = bus
	s.heartbeat = pgbus.NewHeartbeat(pgbus.HeartbeatConfig{Exec: pool, Interval: cfg.Heartbeat, Logger: s.log,
		Node: func() pgbus.NodeInfo {
			return pgbus.NodeInfo{ID: nodeID, Region: cfg.Region, Address: s.Addr(), Version: Version}
		},
		// Our presences were handed to the grace sweep: send the peers to reconnect so their
		// presences are registered afresh.
		OnDeclaredDead: func() { reconnectAll(s.hub) },
		OnTakenOver: func(string) {
			s.fail(fmt.Errorf("another process registered as node %s: BROKER_NODE_ID must be unique per replica", nodeID))
		},
		SharedAfter: cfg.NodeDeadAfter,
	})

	sig := signals{bus: bus, nodeID: nodeID}
	refusals := newSampledLog(s.log, 5, 20)
	s.refusals = refusals
	s.health = &healthPing{ping: s.store.Ping}
	s.recorder = newRecorder(s.store, s.log, s.metrics)
	if cfg.StallTimeout > 0 {
		s.recorder.ackWait = cfg.StallTimeout
	}
	s.pusher = newPusher(s.store, nodeID, s.log, s.metrics, s.hub)
	if hook := cfg.givingBack; hook != nil {
		giveBack := s.pusher.giveBack
		s.pusher.giveBack = func(ids []int64) { hook(ids, giveBack) }
	}
	s.ender = newEnder(s.store, nodeID, cfg.Grace(), s.recorder.settle, s.log, s.metrics)
	pl := &planner{ttl: cfg.MessageTTL, now: time.Now}
	s.committer = newCommitter(s.store, pl, nodeID, s.pusher, cfg.MaxBatch, cfg.Committers, s.log, s.metrics)
	s.committer.sessions = s.hub.all
	if cfg.sendDeadline > 0 {
		s.committer.deadline = cfg.sendDeadline
	}
	s.registrar = newRegistrar(s.store, nodeID, cfg.MaxConnsPerMesh, cfg.HelloConcurrency, cfg.HelloQueue, helloQueueWait,
		s.log, s.metrics)
	s.peers = &peers{cfg: cfg, nodeID: nodeID, store: s.store, hub: s.hub, hellos: newHookLimiter(cfg.HelloRatePerSessionMin, hookLimiterKeys),
		memberHellos: newHookLimiter(cfg.HelloRatePerMemberMin, hookLimiterKeys),
		gate:         newGate(cfg.MaxUnauthenticated, cfg.MaxUnauthPerSource, cfg.HelloTimeout),
		registrar:    s.registrar,
		signals:      sig, committer: s.committer, pusher: s.pusher, recorder: s.recorder, ender: s.ender,
		metrics: s.metrics, log: s.log, refusals: refusals, draining: &s.draining,
		linger: newLingerer(lingerWait)}
	s.peers.melody = s.peers.newMelody()
	if cfg.noLinger {
		s.peers.linger.done = true
	}
	s.sweeper = &sweeper{store: s.store, signals: sig, hub: s.hub, pusher: s.pusher, ender: s.ender, idTaken: s.heartbeat.TakenOver,
		statusTTL: cfg.StatusTTL, maxPending: cfg.MaxPendingPerMember, every: sweepEvery, log: s.log, metrics: s.metrics}
	live := &liveness{store: s.store, signals: sig, heartbeat: s.heartbeat, hub: s.hub, interval: cfg.Heartbeat,
		deadAfter: cfg.NodeDeadAfter, grace: cfg.Grace(), log: s.log, metrics: s.metrics,
		onTakeOver: func(ctx context.Context) { _ = s.sweeper.sweepGrace(ctx) }}
	rt := &router{bus: bus, store: s.store, hub: s.hub, pusher: s.pusher, nodeID: nodeID, poll: pollEvery, log: s.log, metrics: s.metrics}
	gd := &guard{peers: s.peers, pusher: s.pusher, hub: s.hub, stall: cfg.StallTimeout, pingEvery: pingPeriod}
	if cfg.pingEvery > 0 {
		gd.pingEvery = cfg.pingEvery
	}
	// Start order: the node row first (presences reference it), the listener, then the
	// services that write (records and ends stop last, so closing sessions are recorded).
	sl := &sealer{store: s.store, every: sweepEvery, log: s.log, metrics: s.metrics, anchors: audit.NewAnchors(s.log)}
	s.services = append(s.services, s.heartbeat, bus, s.recorder, s.ender, s.pusher, s.committer, s.registrar, rt, s.sweeper,
		sl, live, gd)

	s.metrics.registerFuncs(s)
	hk := newHooks(cfg, s.store, sig, s.metrics, s.log, refusals)
	sp := &statusPage{cfg: cfg, store: s.store, nodeID: nodeID, started: s.started, hub: s.hub, log: s.log, refusals: refusals,
		listener: bus.Connected, draining: s.draining.Load}
	s.members = membership.New(pool, membership.Config{Logger: s.log, BusNamespace: cfg.BusNamespace,
		Refusals: refusals, JoinBounds: newJoinBounds(cfg), CountJoin: s.metrics.countJoin})
	s.mux.HandleFunc("GET /health", s.handleHealth)
	if cfg.MetricsAddr == "" {
		s.mux.Handle("GET /metrics", s.metricsHandler())
	}
	s.mux.HandleFunc("GET "+protocol.PathWS, s.peers.handleWS)
	s.mux.HandleFunc("POST "+protocol.PathHookState, hk.handleHook)
	s.mux.HandleFunc("POST "+protocol.PathJoin, s.members.HandleJoin)
	s.mux.HandleFunc("GET /status", sp.handleStatusPage)
	return s, nil
}

// metricsHandler serves Prometheus text, behind METRICS_TOKEN when set (a bearer token): the
// numbers say how busy each mesh's cluster is, which not every client should read.
func (s *Server) metricsHandler() http.Handler {
	return s.guardMetrics(promhttp.HandlerFor(s.metrics.Registry, promhttp.HandlerOpts{}))
}

// guardMetrics puts h behind METRICS_TOKEN when it is set.
func (s *Server) guardMetrics(h http.Handler) http.Handler {
	if s.cfg.MetricsToken == "" {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, _ := bearerToken(r)
		if !tokenMatches(tok, s.cfg.MetricsToken) {
			s.refusals.Info("metrics refused: missing or wrong metrics token", "path", r.URL.Path,
				"source", clientSource(r, s.cfg.TrustedProxyHeader))
			w.Header().Set("WWW-Authenticate", `Bearer realm="claudemesh metrics"`)
			http.Error(w, "missing or wrong metrics token (Authorization: Bearer <token>)", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// NewNodeID returns a fresh replica id: host name prefix plus random bytes, short enough to
// name a LISTEN channel.
func NewNodeID() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	host, _ := os.Hostname()
	if len(host) > 16 {
		host = host[:16]
	}
	clean := make([]byte, 0, len(host))
	for _, r := range []byte(host) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' {
			clean = append(clean, r)
		}
	}
	if len(clean) == 0 {
		clean = []byte("node")
	}
	return string(clean) + "-" + hex.EncodeToString(b)
}

// NodeID is this replica's id.
func (s *Server) NodeID() string { return s.nodeID }

// Metrics exposes the replica's collectors (tests read them).
func (s *Server) Metrics() *Metrics { return s.metrics }

// Handle mounts an extra route.
func (s *Server) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// Members is the membership service behind /join (tests and the dev cluster use it).
func (s *Server) Members() *membership.Service { return s.members }

// Sessions is the number of live sessions on this replica.
func (s *Server) Sessions() int { return s.hub.len() }

// BusConnected reports whether this replica's LISTEN connection is up.
func (s *Server) BusConnected() bool { return s.bus.Connected() }

// Handler is the replica's HTTP handler (all routes, /ws included).
func (s *Server) Handler() http.Handler { return s.mux }

// Addr is the address the replica listens on, once started.
func (s *Server) Addr() string { return s.addrOf(func() net.Listener { return s.listener }) }

// MetricsAddr is the address /metrics is served on when METRICS_ADDR is set, once started.
func (s *Server) MetricsAddr() string { return s.addrOf(func() net.Listener { return s.metricsLn }) }

func (s *Server) addrOf(ln func() net.Listener) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if l := ln(); l != nil {
		return l.Addr().String()
	}
	return ""
}

// Start listens on addr (":0" picks a free port), starts every service in order (the node is
// registered before anything is served) and serves HTTP. Postgres being down does not fail
// Start: the replica serves 503 health and registers itself when the database returns.
func (s *Server) Start(ctx context.Context, addr string) error {
	if before, after, err := raiseFileLimit(); err != nil {
		s.log.Warn("could not raise the open-file limit; sessions are capped by it", "limit", before, "err", err)
		s.fileLimit.Store(before)
	} else {
		if after > before {
			s.log.Info("open-file limit raised to the hard limit", "from", before, "to", after)
		}
		s.fileLimit.Store(after)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		// Name the settings: "address already in use" alone leaves the operator to guess
		// where the address came from.
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("listen %s: %w: another process (another broker?) holds the port; stop it or set BROKER_PORT to a free one", addr, err)
		}
		return fmt.Errorf("listen %s: %w: check BROKER_HOST and BROKER_PORT", addr, err)
	}
	var mln net.Listener
	if s.cfg.MetricsAddr != "" {
		if mln, err = net.Listen("tcp", s.cfg.MetricsAddr); err != nil {
			_ = ln.Close()
			return fmt.Errorf("listen %s (METRICS_ADDR): %w", s.cfg.MetricsAddr, err)
		}
	}
	s.mu.Lock()
	s.listener, s.metricsLn = ln, mln
	s.mu.Unlock()
	// The services outlive the caller's context: only Stop ends them.
	runCtx := context.WithoutCancel(ctx)
	for i, svc := range s.services {
		if err := svc.Start(runCtx); err != nil {
			late, cancel := pastDeadline(ctx)
			s.stopServices(ctx, late, s.services[:i])
			cancel()
			_ = ln.Close()
			if mln != nil {
				_ = mln.Close()
			}
			return err
		}
	}
	// Every plain request (a hook, a join, health, a 404) has httpReadTimeout for its headers
	// and body and httpWriteTimeout to be answered, and a kept-alive connection is closed after
	// httpIdleTimeout without a request: a client trickling a body or sitting on a connection
	// holds a socket and a goroutine that no other limit counts. A WebSocket is not cut by
	// them: the upgrade (gorilla/websocket) clears the connection's deadlines once it is
	// hijacked, and the session keeps its own (pings, pong deadline, write stalls);
	// TestPlainHTTPTimesOutAndWebSocketsStay checks both.
	readTimeout, writeTimeout, idleTimeout := httpReadTimeout, httpReadTimeout+httpHandlerTimeout, httpIdleTimeout
	if s.cfg.httpTimeouts != nil {
		readTimeout, writeTimeout, idleTimeout = s.cfg.httpTimeouts[0], s.cfg.httpTimeouts[1], s.cfg.httpTimeouts[2]
	}
	maxPlain := plainConnLimit(sessionCapacity(s.fileLimit.Load()))
	perSource := s.cfg.MaxUnauthPerSource
	if s.cfg.TrustedProxyHeader != "" {
		perSource = 0
	}
	room := s.plainRoom
	if s.cfg.plainConnLimits != nil {
		maxPlain, perSource, room = s.cfg.plainConnLimits[0], s.cfg.plainConnLimits[1], nil
	}
	s.plain = newPlainConns(maxPlain, perSource, maxPlain+s.cfg.MaxUnauthenticated, room, func(source string, replicaWide bool, limit int) {
		reason := "http_source_limit"
		if replicaWide {
			reason = "http_limit"
		}
		s.metrics.ConnRejected.WithLabelValues(reason).Inc()
		s.refusals.Info("HTTP connection closed unread: too many open", "reason", reason, "limit", limit, "source", source)
	})
	srv := &http.Server{Handler: s.mux, ReadHeaderTimeout: readTimeout, ReadTimeout: readTimeout,
		WriteTimeout: writeTimeout, IdleTimeout: idleTimeout, MaxHeaderBytes: maxHeaderBytes, ConnState: s.plain.track,
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)}
	s.mu.Lock()
	s.httpSrv = srv
	s.mu.Unlock()
	s.serve(srv, ln, "http serve")
	if mln != nil {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", s.metricsHandler())
		// Profiles (heap, goroutines, CPU) for the operator, only on this address, never on the
		// peers' port, and only behind METRICS_TOKEN or on a loopback address: a profile shows
		// every goroutine's stack and can cost a core for its duration, more than the numbers
		// an operator may choose to leave open on a private network.
		if s.pprofServed() {
			mux.Handle("GET /debug/pprof/", s.guardMetrics(http.HandlerFunc(pprof.Index)))
			mux.Handle("GET /debug/pprof/profile", s.guardMetrics(http.HandlerFunc(pprof.Profile)))
		} else {
			s.log.Info("profiles (/debug/pprof/) not served: set METRICS_TOKEN, or METRICS_ADDR on a loopback address",
				"metrics_addr", s.cfg.MetricsAddr)
		}
		// Counted too: whoever reaches this address (public, behind METRICS_TOKEN) could
		// otherwise hold an open file and a goroutine per half-sent request, the sessions' open
		// files. A scrape is served in milliseconds, so at the limit the connection waiting
		// longest makes room, as on the peers' port.
		metricsConns := newPlainConns(metricsConnLimit, 0, metricsConnLimit, nil, func(source string, _ bool, limit int) {
			s.metrics.ConnRejected.WithLabelValues("metrics_limit").Inc()
			s.refusals.Info("metrics connection closed: too many open", "limit", limit, "source", source)
		})
		// No WebSocket here: plain timeouts, the write one long enough for a CPU profile (30 s
		// by default; pprof refuses one longer than the write timeout).
		ms := &http.Server{Handler: mux, ReadHeaderTimeout: httpReadTimeout, ReadTimeout: httpReadTimeout,
			WriteTimeout: metricsWriteTimeout, IdleTimeout: httpIdleTimeout, MaxHeaderBytes: maxHeaderBytes,
			ConnState: metricsConns.track, ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)}
		s.mu.Lock()
		s.metricsSrv = ms
		s.mu.Unlock()
		s.serve(ms, mln, "metrics serve")
	}
	s.log.Info("broker listening", "addr", ln.Addr().String(), "version", Version, "region", s.cfg.Region)
	return nil
}

// Timeouts of the plain HTTP requests (see Start).
const (
	httpReadTimeout = 10 * time.Second // headers and body
	// httpHandlerTimeout is what a handler may take after its body is read: a hook waits up to
	// hookSlotWait for a slot and opTimeout for its statement.
	httpHandlerTimeout  = 20 * time.Second
	httpIdleTimeout     = 60 * time.Second
	metricsWriteTimeout = 2 * time.Minute
	// metricsConnLimit bounds the connections METRICS_ADDR holds: scrapers and an operator's
	// profile need a few.
	metricsConnLimit = 64
)

// pprofServed reports whether METRICS_ADDR serves profiles: behind METRICS_TOKEN, or on a
// loopback address (only this machine's processes reach it).
func (s *Server) pprofServed() bool {
	if s.cfg.MetricsToken != "" {
		return true
	}
	host, _, err := net.SplitHostPort(s.cfg.MetricsAddr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}

func (s *Server) serve(srv *http.Server, ln net.Listener, what string) {
	s.served.Go(func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error(what, "err", err)
		}
	})
}

// StopMargin is how long Stop may run past its context's deadline: what the services share
// to stop once the drain has used the deadline up, since the bus must still be stopped and the
// node marked stopped, or the node would be declared dead instead and its LISTEN goroutines
// would outlive the server. Shared, not per service: with Postgres not answering, a margin
// each added up to half a minute past the deadline, beyond what platforms wait before SIGKILL.
const StopMargin = 3 * time.Second

// Stop shuts the replica down: no new connections, sessions closed with 1012 (their
// presences kept in grace), every service stopped in reverse order, the node marked stopped.
// The services get what is left of ctx and, once it is done, StopMargin more between them:
// Stop returns within ctx's deadline plus StopMargin, leaving a service that has not stopped
// by then behind. Safe to call twice; the second call returns at once.
func (s *Server) Stop(ctx context.Context) error {
	s.mu.Lock()
	if s.stopped || s.httpSrv == nil {
		s.stopped = true
		s.mu.Unlock()
		return nil
	}
	s.stopped = true
	srv, ms := s.httpSrv, s.metricsSrv
	s.mu.Unlock()

	late, cancelLate := pastDeadline(ctx)
	defer cancelLate()
	s.draining.Store(true)
	s.drainSessions(ctx)
	// Whatever did not leave in the drain window is cut now, and its end queued for the ender
	// (which stops after everything that could still close a session).
	_ = s.peers.melody.Close()
	s.waitSessionsGone(late, StopMargin)
	err := srv.Shutdown(ctx)
	if err != nil {
		_ = srv.Close() // the deadline passed with requests open: cut them
	}
	if ms != nil {
		_ = ms.Close()
	}
	s.served.Wait()
	// Sockets still lingering after their close frame get what is left of the linger, within
	// ctx, for their clients to read the last pushes; then they are cut.
	grace := lingerWait
	if d, ok := ctx.Deadline(); ok {
		grace = max(0, min(grace, time.Until(d)))
	}
	s.peers.linger.stop(grace)
	err = errors.Join(err, s.stopServices(ctx, late, s.services))
	s.log.Info("broker stopped")
	return err
}

// pastDeadline is ctx extended by StopMargin: done StopMargin after ctx's deadline, or after
// ctx is done when it has none.
func pastDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if d, ok := ctx.Deadline(); ok {
		return context.WithDeadline(context.WithoutCancel(ctx), d.Add(StopMargin))
	}
	late, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(StopMargin, cancel)
		context.AfterFunc(late, func() { t.Stop() })
	})
	return late, func() { stop(); cancel() }
}

// stopServices stops services in reverse order with what is left of ctx, and once ctx is done
// with what is left of late.
func (s *Server) stopServices(ctx, late context.Context, services []interface {
	Start(context.Context) error
	Stop(context.Context) error
}) error {
	var errs []error
	for i := len(services) - 1; i >= 0; i-- {
		sctx := ctx
		if ctx.Err() != nil {
			sctx = late
		}
		if err := services[i].Stop(sctx); err != nil {
			errs = append(errs, fmt.Errorf("stop %T: %w", services[i], err))
		}
	}
	return errors.Join(errs...)
}

// waitSessionsGone waits, up to d and while ctx lasts, until every closed socket's session
// left the hub (its end is then queued).
func (s *Server) waitSessionsGone(ctx context.Context, d time.Duration) {
	deadline := time.Now().Add(d)
	for s.hub.len() > 0 && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
}

// Fatal delivers, once, why this replica must stop although nobody asked it to (another
// process took its node id); whoever runs it should Stop it and exit with an error.
func (s *Server) Fatal() <-chan error { return s.fatal }

func (s *Server) fail(err error) {
	select {
	case s.fatal <- err:
	default:
	}
}

// Health is the body of GET /health.
type Health struct {
	Status   string `json:"status"` // ok, degraded, draining
	DB       string `json:"db"`     // up, down
	Version  string `json:"version"`
	NodeID   string `json:"nodeId"`
	Region   string `json:"region,omitempty"`
	UptimeS  int64  `json:"uptimeSeconds"`
	Sessions int    `json:"sessions"`
	Listener string `json:"listener"` // up, down
	// Heartbeat is failing when this replica's node row has not been written for half the
	// dead-node deadline: Postgres answers reads but not its writes (disk full, locks), and
	// the replica is about to send its sessions away (liveness).
	Heartbeat string `json:"heartbeat"` // ok, failing
	// Capacity is how many sessions this replica's open-file limit allows (0: unknown): the
	// figure to set a load balancer's per-replica limit below.
	Capacity     int    `json:"sessionCapacity,omitempty"`
	OpenFilesMax uint64 `json:"openFilesLimit,omitempty"`
}

// plainRoom is the session slots not in use (sessions and sockets waiting for their hello
// take theirs): what a storm of reconnects may hold while the replica reads their upgrades.
func (s *Server) plainRoom() int {
	return sessionCapacity(s.fileLimit.Load()) - s.hub.len() - s.peers.gate.unauthenticated()
}

// fdReserve is what a replica keeps of its open-file limit for other than sessions: its pool
// and LISTEN connections, listeners, sockets being upgraded or lingering after their close
// (maxLingering), logs.
const fdReserve = 256 + maxLingering

// sessionCapacity is the sessions an open-file limit allows: one descriptor each.
func sessionCapacity(limit uint64) int {
	if limit <= fdReserve {
		return 0
	}
	return int(min(limit-fdReserve, 1<<31-1))
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	h := Health{Status: "ok", DB: "up", Version: Version, NodeID: s.nodeID, Region: s.cfg.Region,
		UptimeS: int64(time.Since(s.started).Seconds())}
	h.Sessions = s.hub.len()
	h.OpenFilesMax = s.fileLimit.Load()
	h.Capacity = sessionCapacity(h.OpenFilesMax)
	h.Listener = "up"
	if !s.bus.Connected() {
		h.Status, h.Listener = "degraded", "down"
	}
	h.Heartbeat = "ok"
	// A beat's slack on top of the point where liveness sends the sessions away: with the
	// shortest deadline allowed (two beats), half of it is one beat, and a beat a little late
	// would flap the answer.
	beating := time.Since(s.heartbeat.LastOK()) <= s.cfg.NodeDeadAfter/2+s.cfg.Heartbeat
	if !beating {
		h.Status, h.Heartbeat = "degraded", "failing"
	}
	if err := s.health.result(r.Context()); err != nil && !(beating && s.store.PoolBusy()) {
		h.Status, h.DB = "degraded", "down"
	}
	if s.draining.Load() {
		h.Status = "draining"
	}
	code := http.StatusOK
	if h.Status != "ok" {
		code = http.StatusServiceUnavailable
	}
	s.metrics.HealthChecks.WithLabelValues(h.Status).Inc()
	writeJSON(w, code, h)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// drainSessions closes every local session with 1012 ("reconnect elsewhere"), spread over a
// short window so the peers don't all reconnect in the same instant, and waits for them to go
// (their presences stay in grace, so nobody sees them leave).
func (s *Server) drainSessions(ctx context.Context) {
	sessions := s.hub.all()
	if len(sessions) == 0 {
		return
	}
	window := min(2*time.Second, s.cfg.DrainTimeout/4)
	step := window / time.Duration(len(sessions))
	s.log.Info("draining sessions", "count", len(sessions), "window", window)
	// Each socket closes once the acks of the sends it accepted are queued before the close
	// frame, or after ackWait (a statement that slow is the failover's case: the client's
	// client_message_id, when it sets one, folds its retry into the stored send).
	ackWait := min(2*time.Second, s.cfg.DrainTimeout/8)
	var closers sync.WaitGroup
	defer closers.Wait() // each within ackWait: none outlives the drain
	for i, sess := range sessions {
		if i > 0 && step > 0 {
			select {
			case <-time.After(step):
			case <-ctx.Done():
			}
		}
		owed := sess.stopSends()
		closers.Go(func() {
			t := time.NewTimer(ackWait)
			defer t.Stop()
			select {
			case <-owed:
			case <-t.C:
			case <-ctx.Done():
			}
			closeWith(sess.ws, protocol.CloseDraining, "draining")
		})
	}
	deadline := time.NewTimer(min(5*time.Second, s.cfg.DrainTimeout/2))
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for s.hub.len() > 0 {
		select {
		case <-ctx.Done():
		case <-deadline.C:
			s.log.Warn("sessions still open after drain window; closing them", "count", s.hub.len())
		case <-tick.C:
			continue
		}
		break
	}
}
