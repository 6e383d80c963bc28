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
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/olahol/melody"

	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// Server is one broker replica: its HTTP routes, its sessions and its node row.
type Server struct {
	cfg     Config
	pool    *pgxpool.Pool
	q       *db.Queries
	log     *slog.Logger
	nodeID  string
	started time.Time
	metrics *Metrics
	mux     *http.ServeMux

	draining atomic.Bool

	hub       *hub
	melody    *melody.Melody
	bus       *pgbus.Bus
	sends     chan sendReq
	marker    *marker
	drainer   *drainer
	ender     *ender
	hookLimit *hookLimiter // per claimed pid + cwd
	// hookCallers: per proven caller (member key of a signed hook, client address otherwise).
	hookCallers *hookLimiter
	gate        *gate
	refusals    *sampledLog // refusals a client can cause at will
	members     *membership.Service
	// runCtx lives from Start to Stop; background work (bg) runs under it.
	runCtx    context.Context
	runCancel context.CancelFunc
	bg        sync.WaitGroup

	mu         sync.Mutex
	httpSrv    *http.Server
	listener   net.Listener
	metricsSrv *http.Server // on METRICS_ADDR, when set
	metricsLn  net.Listener
	cancel     context.CancelFunc
	done       chan struct{}
	stopped    bool
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
	s := &Server{
		cfg:     cfg,
		pool:    pool,
		q:       db.New(pool),
		log:     logger.With("node", nodeID),
		nodeID:  nodeID,
		started: time.Now(),
		metrics: newMetrics(),
		mux:     http.NewServeMux(),
	}
	s.runCtx, s.runCancel = context.WithCancel(context.Background())
	s.hub = newHub()
	s.melody = s.newMelody()
	s.sends = make(chan sendReq, sendQueueCap)
	s.marker = newMarker(s)
	s.drainer = newDrainer(s)
	s.ender = newEnder(s)
	s.hookLimit = newHookLimiter(cfg.HookRatePerMin)
	s.hookCallers = newHookLimiter(cfg.HookRatePerCallerMin)
	s.gate = newGate(cfg.MaxUnauthenticated, cfg.MaxUnauthPerSource, cfg.HelloTimeout)
	s.refusals = newSampledLog(s.log, 5, 20)
	bus, err := pgbus.New(pgbus.Config{
		ConnConfig: pool.Config().ConnConfig, Exec: pool, NodeID: nodeID, Namespace: cfg.BusNamespace,
		Logger: s.log, Observe: s.metrics.observeBus,
	})
	if err != nil {
		return nil, err
	}
	s.bus = bus
	s.metrics.registerFuncs(s)
	s.mux.HandleFunc("GET /health", s.handleHealth)
	if cfg.MetricsAddr == "" {
		s.mux.Handle("GET /metrics", s.metricsHandler())
	}
	s.mux.HandleFunc("GET "+protocol.PathWS, s.handleWS)
	s.mux.HandleFunc("POST "+protocol.PathHookState, s.handleHook)
	s.members = membership.New(pool, membership.Config{Logger: s.log, OnRevoke: RevokeHook(pool, cfg.BusNamespace, s.log)})
	s.mux.HandleFunc("POST "+protocol.PathJoin, s.members.HandleJoin)
	s.mux.HandleFunc("GET /status", s.handleStatusPage)
	return s, nil
}

// metricsHandler serves Prometheus text, behind METRICS_TOKEN when set (a bearer token): the
// numbers say how busy each mesh's cluster is, which not every client should read.
func (s *Server) metricsHandler() http.Handler {
	h := promhttp.HandlerFor(s.metrics.Registry, promhttp.HandlerOpts{})
	if s.cfg.MetricsToken == "" {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !adminTokenMatches(tok, s.cfg.MetricsToken) {
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

// MetricsAddr is the address /metrics is served on when METRICS_ADDR is set, once started.
func (s *Server) MetricsAddr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.metricsLn == nil {
		return ""
	}
	return s.metricsLn.Addr().String()
}

// Addr is the address the replica listens on, once started.
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.listener == nil {
		return ""
	}
	return s.listener.Addr().String()
}

// Start registers the node and serves HTTP on addr (":0" picks a free port). Background work
// runs until Stop. Postgres being down does not fail Start: the replica serves 503 health and
// registers itself when the database returns.
func (s *Server) Start(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	var mln net.Listener
	if s.cfg.MetricsAddr != "" {
		if mln, err = net.Listen("tcp", s.cfg.MetricsAddr); err != nil {
			_ = ln.Close()
			return fmt.Errorf("listen %s (METRICS_ADDR): %w", s.cfg.MetricsAddr, err)
		}
	}
	_ = ctx
	runCtx, cancel := s.runCtx, s.runCancel
	if err := s.bus.Start(runCtx); err != nil {
		_ = ln.Close()
		if mln != nil {
			_ = mln.Close()
		}
		return err
	}
	for _, f := range []func(context.Context){s.runCommitter, s.marker.run, s.drainer.run, s.ender.run, s.runBus, s.runSweeper, s.runGuard} {
		s.bg.Go(func() { f(runCtx) })
	}
	s.mu.Lock()
	s.listener = ln
	s.mu.Unlock()
	registered := s.registerNode(runCtx) // before serving: presences reference the node row
	s.mu.Lock()
	s.cancel = cancel
	s.done = make(chan struct{})
	s.httpSrv = &http.Server{
		Handler:           s.mux,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	srv := s.httpSrv
	s.mu.Unlock()

	if mln != nil {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", s.metricsHandler())
		metricsSrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		s.mu.Lock()
		s.metricsSrv, s.metricsLn = metricsSrv, mln
		s.mu.Unlock()
		s.bg.Go(func() {
			if err := metricsSrv.Serve(mln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("metrics serve", "err", err)
			}
		})
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		s.runNode(runCtx, registered)
	}()
	go func() {
		defer wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("http serve", "err", err)
		}
	}()
	go func() { wg.Wait(); close(s.done) }()
	s.log.Info("broker listening", "addr", ln.Addr().String(), "version", Version, "region", s.cfg.Region)
	return nil
}

// Stop shuts the replica down: no new connections, node marked stopped. Safe to call twice.
func (s *Server) Stop(ctx context.Context) error {
	s.mu.Lock()
	if s.stopped || s.httpSrv == nil {
		s.stopped = true
		s.mu.Unlock()
		return nil
	}
	s.stopped = true
	srv, cancel, done := s.httpSrv, s.cancel, s.done
	s.mu.Unlock()

	s.draining.Store(true)
	s.drainSessions(ctx)
	err := srv.Shutdown(ctx)
	s.mu.Lock()
	if s.metricsSrv != nil {
		_ = s.metricsSrv.Close()
	}
	s.mu.Unlock()
	cancel()
	bgDone := make(chan struct{})
	go func() { s.bg.Wait(); close(bgDone) }()
	for _, ch := range []chan struct{}{done, bgDone} {
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	_ = s.bus.Stop(ctx)
	stopCtx, stopCancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Second)
	defer stopCancel()
	if e := s.q.NodeStop(stopCtx, s.nodeID); e != nil {
		s.log.Warn("mark node stopped", "err", e)
	}
	s.log.Info("broker stopped")
	return err
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
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	h := Health{Status: "ok", DB: "up", Version: Version, NodeID: s.nodeID, Region: s.cfg.Region,
		UptimeS: int64(time.Since(s.started).Seconds())}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	h.Sessions = s.hub.len()
	h.Listener = "up"
	if !s.bus.Connected() {
		h.Status, h.Listener = "degraded", "down"
	}
	if err := s.pool.Ping(ctx); err != nil {
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
// short window so the peers don't all reconnect in the same instant, and waits for them to
// go (their presences stay in grace, so nobody sees them leave).
func (s *Server) drainSessions(ctx context.Context) {
	sessions := s.hub.all()
	if len(sessions) == 0 {
		return
	}
	window := min(2*time.Second, s.cfg.DrainTimeout/4)
	step := window / time.Duration(len(sessions))
	s.log.Info("draining sessions", "count", len(sessions), "window", window)
	for i, sess := range sessions {
		if i > 0 && step > 0 {
			select {
			case <-time.After(step):
			case <-ctx.Done():
			}
		}
		closeWith(sess.ws, protocol.CloseDraining, "draining")
	}
	deadline := time.NewTimer(min(5*time.Second, s.cfg.DrainTimeout/2))
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for s.hub.len() > 0 {
		select {
		case <-ctx.Done():
			return
		case <-deadline.C:
			s.log.Warn("sessions still open after drain window; closing them", "count", s.hub.len())
			_ = s.melody.Close()
			return
		case <-tick.C:
		}
	}
}
