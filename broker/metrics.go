package broker

import (
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/claudemesh/broker/broker/membership"
)

// Metrics are one replica's Prometheus collectors. Each Server has its own registry, so
// several replicas can run in one test process.
type Metrics struct {
	Registry *prometheus.Registry

	HealthChecks      *prometheus.CounterVec
	ConnActive        prometheus.Gauge
	ConnTotal         prometheus.Counter
	ConnRejected      *prometheus.CounterVec
	BadFrames         *prometheus.CounterVec
	SlowConsumers     prometheus.Counter
	MessagesRouted    *prometheus.CounterVec
	Pushes            prometheus.Counter
	SendFailures      prometheus.Counter
	BacklogSkips      prometheus.Counter
	SendRefused       *prometheus.CounterVec
	AdminOps          *prometheus.CounterVec
	DeliveriesPending prometheus.Gauge
	// AuditPending and AuditPendingOldest: audit entries not yet chained (cluster-wide).
	AuditPending, AuditPendingOldest prometheus.Gauge
	BusSent                          prometheus.Counter
	BusReceived                      prometheus.Counter
	BusEvents                        *prometheus.CounterVec
	BatchSize                        prometheus.Histogram
	HelloBatchSize                   prometheus.Histogram
	CommitSeconds                    prometheus.Histogram
	HookRequests                     *prometheus.CounterVec
	JoinRequests                     *prometheus.CounterVec
	DeadNodes                        prometheus.Counter
	Claims                           prometheus.Counter
	ClaimSkips                       prometheus.Counter
	BackgroundErrors                 *prometheus.CounterVec
	// StateCatchUp counts what the state catch-up told, by outcome (sent, capped).
	StateCatchUp *prometheus.CounterVec
	// EventCatchUp counts what the system events' catch-up told, by outcome (sent, capped).
	EventCatchUp *prometheus.CounterVec

	// logged holds back repeats of a failure's log line: background failures by task
	// (backgroundError), request failures by message (warnRepeated).
	logged *repeatLog

	// RequestsRateLimited counts requests other than send refused rate_limited, by type.
	RequestsRateLimited *prometheus.CounterVec
}

func newMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	c := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: "claudemesh", Name: name, Help: help})
	}
	cv := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "claudemesh", Name: name, Help: help}, labels)
	}
	g := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "claudemesh", Name: name, Help: help})
	}
	m := &Metrics{
		logged:         newRepeatLog(repeatLogEvery),
		Registry:       reg,
		HealthChecks:   cv("health_checks_total", "Health checks served, by reported status.", "status"),
		ConnActive:     g("connections_active", "Open WebSocket connections on this replica."),
		ConnTotal:      c("connections_total", "WebSocket connections accepted."),
		ConnRejected:   cv("connections_rejected_total", "Connections or hellos refused, by reason.", "reason"),
		BadFrames:      cv("bad_frames_total", "Client frames answered with an error, by code.", "code"),
		SlowConsumers:  c("slow_consumer_closes_total", "Sessions closed with 4008 because their send queue overflowed."),
		MessagesRouted: cv("messages_routed_total", "Envelopes stored and routed, by priority.", "priority"),
		Pushes:         c("pushes_total", "Envelopes written to recipient sockets."),
		SendFailures:   c("send_failures_total", "Sends refused because their batch could not be stored."),
		BacklogSkips: c("backlog_skips_total", "Deliveries left out of sends because what waits for their member reached MAX_PENDING_PER_MEMBER: "+
			"a direct send refused recipient_full, or a multicast's copy for a waiting session of that member not stored."),
		SendRefused:       cv("sends_refused_total", "Sends refused before the database, by code (too_large, rate_limited).", "code"),
		AdminOps:          cv("admin_operations_total", "kick, disconnect, ban, unban and list_bans requests, by operation and outcome.", "op", "outcome"),
		DeliveriesPending: g("deliveries_pending", "Deliveries not yet acknowledged (pending or pushed), cluster-wide."),
		AuditPending:      g("audit_pending_entries", "Audit entries recorded and not yet hashed onto their chains, cluster-wide."),
		AuditPendingOldest: g("audit_pending_oldest_seconds",
			"Age of the oldest audit entry not yet hashed onto its chain, cluster-wide (0 when none)."),
		BusSent:     c("bus_notifications_sent_total", "NOTIFY payloads sent by this replica."),
		BusReceived: c("bus_notifications_received_total", "Bus messages received and applied."),
		BusEvents:   cv("bus_events_total", "Listener events: reconnect, overflow, bad_payload.", "event"),
		BatchSize: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "claudemesh", Name: "commit_batch_size",
			Help: "Sends per group-commit transaction.", Buckets: prometheus.ExponentialBuckets(1, 2, 10)}),
		HelloBatchSize: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "claudemesh", Name: "hello_batch_size",
			Help: "Hellos registered per statement.", Buckets: prometheus.ExponentialBuckets(1, 2, 7)}),
		CommitSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "claudemesh", Name: "commit_seconds",
			Help: "Time to resolve and commit one send batch.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		HookRequests:     cv("hook_requests_total", "Hook requests, by outcome.", "outcome"),
		JoinRequests:     cv("join_requests_total", "POST /join requests, by outcome.", "outcome"),
		DeadNodes:        c("dead_nodes_taken_over_total", "Silent replicas this replica declared dead and took over."),
		Claims:           c("claims_total", "Claim statements run for pending deliveries (each covers many sessions)."),
		ClaimSkips:       c("claim_skips_total", "Sessions a claim skipped because another transaction held their row (a takeover, a change of status); claimed for again shortly."),
		BackgroundErrors: cv("background_errors_total", "Failures of background work (sweeps, records, catch-up), by task.", "task"),
		StateCatchUp: cv("state_catch_up_total",
			"Shared-state changes told to local sessions after lost notices (sent), and meshes whose catch-up was capped (capped).", "outcome"),
		EventCatchUp: cv("event_catch_up_total",
			"System events (peer_joined, peer_left, peer_status) told to local sessions after lost notices (sent), and meshes whose catch-up was capped (capped).", "outcome"),
	}
	m.RequestsRateLimited = cv("requests_rate_limited_total",
		"Requests other than send refused rate_limited (WRITE_RATE_PER_MEMBER, READ_RATE_PER_MEMBER), by type.", "type")
	// Every task's series exists from the start, at 0, so a dashboard shows it before it fails.
	for _, task := range backgroundTasks {
		m.BackgroundErrors.WithLabelValues(task)
	}
	for _, outcome := range []string{"sent", "capped"} {
		m.StateCatchUp.WithLabelValues(outcome)
		m.EventCatchUp.WithLabelValues(outcome)
	}
	for _, outcome := range membership.JoinOutcomes {
		m.JoinRequests.WithLabelValues(outcome)
	}
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.HealthChecks, m.ConnActive, m.ConnTotal, m.ConnRejected, m.BadFrames, m.SlowConsumers,
		m.MessagesRouted, m.Pushes, m.SendFailures, m.BacklogSkips, m.SendRefused, m.RequestsRateLimited, m.AdminOps, m.DeliveriesPending, m.AuditPending, m.AuditPendingOldest, m.BusSent, m.BusReceived,
		m.BusEvents, m.BatchSize, m.HelloBatchSize, m.CommitSeconds, m.HookRequests, m.JoinRequests, m.DeadNodes, m.Claims, m.ClaimSkips, m.BackgroundErrors,
		m.StateCatchUp, m.EventCatchUp,
	)
	return m
}

// backgroundError counts a failure of background work by task, so a sweeper failing for an
// hour shows on the dashboard, and logs it at Error: at most once per 10 s per task, saying how
// many were left out, so an outage that fails every tick doesn't flood the log. Work that is
// retried says so in args.
func (m *Metrics) backgroundError(log *slog.Logger, task string, err error, args ...any) {
	m.BackgroundErrors.WithLabelValues(task).Inc()
	ok, left := m.logged.allow("task " + task)
	if !ok {
		return
	}
	if left > 0 {
		args = append(args, "suppressed_since_last", left)
	}
	log.Error(task+" failed", append([]any{"task", task, "err", err}, args...)...)
}

// warnRepeated logs msg at Warn as backgroundError logs a task's failure: at most once per 10 s
// per msg, the next line saying how many were left out. For the failures every request meets
// while Postgres is down, which thousands of peers reconnecting turn into hundreds of lines a
// second; the first in each interval still shows the error.
func (m *Metrics) warnRepeated(log *slog.Logger, msg string, args ...any) {
	ok, left := m.logged.allow("warn " + msg)
	if !ok {
		return
	}
	if left > 0 {
		args = append(args, "suppressed_since_last", left)
	}
	log.Warn(msg, args...)
}

// repeatLogEvery is how often a repeated failure's line is let through.
const repeatLogEvery = 10 * time.Second

// repeatLog lets each kind of log line through at most once per interval and counts the ones it
// holds back, for the next line of that kind to report.
type repeatLog struct {
	every time.Duration
	now   func() time.Time // time.Now; tests move it
	mu    sync.Mutex
	last  map[string]bgLog // by kind: a fixed set of tasks and messages
}

func newRepeatLog(every time.Duration) *repeatLog {
	return &repeatLog{every: every, now: time.Now, last: map[string]bgLog{}}
}

// allow reports whether a line of kind may be logged now and, when it may, how many lines of
// that kind were held back since the last one.
func (r *repeatLog) allow(kind string) (bool, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	last, seen := r.last[kind]
	if seen && now.Sub(last.at) < r.every {
		last.suppressed++
		r.last[kind] = last
		return false, 0
	}
	r.last[kind] = bgLog{at: now}
	return true, last.suppressed
}

// backgroundTasks are the task labels of background_errors_total.
var backgroundTasks = []string{"record_deliveries", "record_session_ends", "claim", "release_unwritten", "catch_up",
	"resync", "reload_status", "load_changed_state", "state_catch_up", "event_catch_up", "sweep_grace", "sweep_working", "sweep_expired", "pending_gauge", "refresh_statistics",
	"reconcile", "dead_node_takeover", "session_row_held", "sweep_backlog", "seal_audit", "audit_anchors"}

type bgLog struct {
	at         time.Time
	suppressed int
}

// countJoin counts a POST /join under its outcome (membership.JoinOutcomes).
func (m *Metrics) countJoin(outcome string) { m.JoinRequests.WithLabelValues(outcome).Inc() }

func (m *Metrics) observeBus(event string, n int) {
	if event == "received" {
		return // counted when applied
	}
	m.BusEvents.WithLabelValues(event).Add(float64(n))
}

// registerFuncs adds gauges read from the server at scrape time.
func (m *Metrics) registerFuncs(s *Server) {
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "claudemesh", Name: "session_capacity",
		Help: "Sessions this replica's open-file limit allows (one descriptor each); 0 when unknown."}, func() float64 {
		return float64(sessionCapacity(s.fileLimit.Load()))
	}))
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "claudemesh", Name: "listener_up",
		Help: "1 when this replica's LISTEN connection is up."}, func() float64 {
		if s.bus.Connected() {
			return 1
		}
		return 0
	}))
}
