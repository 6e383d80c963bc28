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
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/claudemesh/broker/db"
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

	mu       sync.Mutex
	httpSrv  *http.Server
	listener net.Listener
	cancel   context.CancelFunc
	done     chan struct{}
	stopped  bool
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
	s.mux.HandleFunc("GET /health", s.handleHealth)
	s.mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics.Registry, promhttp.HandlerOpts{}))
	return s, nil
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

// Handler is the replica's HTTP handler (all routes, /ws included).
func (s *Server) Handler() http.Handler { return s.mux }

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
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.mu.Lock()
	s.listener = ln
	s.cancel = cancel
	s.done = make(chan struct{})
	s.httpSrv = &http.Server{
		Handler:           s.mux,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	srv := s.httpSrv
	s.mu.Unlock()

	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		s.runNode(runCtx)
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
	err := srv.Shutdown(ctx)
	cancel()
	select {
	case <-done:
	case <-ctx.Done():
		return ctx.Err()
	}
	stopCtx, stopCancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Second)
	defer stopCancel()
	if e := s.q.NodeStop(stopCtx, s.nodeID); e != nil {
		s.log.Warn("mark node stopped", "err", e)
	}
	s.log.Info("broker stopped")
	return err
}

// runNode registers the node row and heartbeats it until ctx ends. A failed registration is
// retried on every beat, so a replica started while Postgres is down joins when it returns.
func (s *Server) runNode(ctx context.Context) {
	registered := false
	t := time.NewTicker(s.cfg.Heartbeat)
	defer t.Stop()
	for {
		opCtx, cancel := context.WithTimeout(ctx, 3*time.Second)
		if !registered {
			if _, err := s.q.NodeRegister(opCtx, db.NodeRegisterParams{ID: s.nodeID, Region: s.cfg.Region, Address: s.Addr(), Version: Version}); err != nil {
				s.log.Warn("register node", "err", err)
			} else {
				registered = true
			}
		} else if _, err := s.q.NodeHeartbeat(opCtx, s.nodeID); err != nil {
			if errors.Is(db.NotFound(err), db.ErrNotFound) {
				s.log.Warn("node was declared dead by a peer; registering again")
				registered = false
			} else {
				s.log.Warn("heartbeat", "err", err)
			}
		}
		cancel()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
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
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	h := Health{Status: "ok", DB: "up", Version: Version, NodeID: s.nodeID, Region: s.cfg.Region,
		UptimeS: int64(time.Since(s.started).Seconds())}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
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
