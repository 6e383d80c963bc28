package broker

import (
	"context"
	"log/slog"
	"time"

	"github.com/claudemesh/broker/broker/startstop"
	"github.com/claudemesh/broker/broker/store"
)

// sealer chains the audit entries committed since its last tick (package audit: appends only
// record entries; one sealer in the cluster chains them at a time, the others skip). Its own
// loop, so a large backlog never delays the sweeper's presence work.
type sealer struct {
	service
	store   *store.Store
	every   time.Duration
	log     *slog.Logger
	metrics *Metrics
}

// Start seals every tick until Stop.
func (s *sealer) Start(ctx context.Context) error {
	return s.start(ctx, func(ctx context.Context) {
		startstop.Tick(ctx, s.every, func(time.Time) {
			ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if _, err := s.store.SealAudit(ctx); err != nil && ctx.Err() == nil {
				s.metrics.backgroundError(s.log, "seal_audit", err, "retry", "next tick")
			}
		})
	})
}
