package broker

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are one replica's Prometheus collectors. Each Server has its own registry, so
// several replicas can run in one test process.
type Metrics struct {
	Registry *prometheus.Registry

	HealthChecks *prometheus.CounterVec
}

func newMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		Registry: reg,
		HealthChecks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "claudemesh", Name: "health_checks_total",
			Help: "Health checks served, by reported status.",
		}, []string{"status"}),
	}
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.HealthChecks,
	)
	return m
}
