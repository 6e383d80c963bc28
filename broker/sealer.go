package broker

import (
	"context"
	"log/slog"
	"time"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/broker/store"
)

// sealer chains the audit entries committed since its last seal (package audit: appends only
// record entries; one sealer in the cluster chains them at a time, the others skip). Its own
// loop, so a large backlog never delays the sweeper's presence work.
type sealer struct {
	service
	store   *store.Store
	every   time.Duration
	log     *slog.Logger
	metrics *Metrics
	anchors *audit.Anchors // nil: none logged
}

// anchorEvery is how often a replica logs the chain heads that moved (audit.Anchors): the
// anchors an operator verifies the chain against (`broker audit verify --anchor`), kept where
// the logs go, off the database. A cut or rewrite of the chain is seen back to the last anchor.
const anchorEvery = 10 * time.Minute

// sealSoonFactor divides the interval after a seal that chained entries. While entries keep
// coming, the replica that holds the seal seals ten times as often, in statements a tenth the
// size: a second's worth at once is a burst of WAL and CPU beside every other statement
// (send→push p99 at 200 msgs/s: 5.8-10.1 ms sealing once a second, 4.8-6.8 ms this way, 3.9
// ms with no sealing at all; BENCHMARKS.md).
// With nothing to seal, or another replica sealing, it waits the whole interval: no cost idle.
const sealSoonFactor = 10

// Start seals until Stop: every interval, or sooner while there is something to seal.
func (s *sealer) Start(ctx context.Context) error {
	return s.start(ctx, func(ctx context.Context) {
		t := time.NewTimer(s.every)
		defer t.Stop()
		var anchored time.Time // the first logs none: it records the heads
		for {
			select {
			case <-ctx.Done():
				s.lastAnchors(context.WithoutCancel(ctx))
				return
			case <-t.C:
			}
			next := s.every
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			n, err := s.store.SealAudit(sctx)
			cancel()
			switch {
			case err != nil && ctx.Err() == nil:
				s.metrics.backgroundError(s.log, "seal_audit", err, "retry", "next interval")
			case n > 0:
				next = s.every / sealSoonFactor
			}
			if s.anchors != nil && time.Since(anchored) >= anchorEvery {
				actx, cancel := context.WithTimeout(ctx, 30*time.Second)
				if _, err := s.store.LogAuditAnchors(actx, s.anchors); err != nil && ctx.Err() == nil {
					s.metrics.backgroundError(s.log, "audit_anchors", err, "retry", "next interval")
				} else {
					anchored = time.Now()
				}
				cancel()
			}
			t.Reset(next)
		}
	})
}

// stopAnchorTimeout bounds the last seal and anchor log of a stopping replica, so a Postgres
// that does not answer holds up its drain by no more than this.
const stopAnchorTimeout = 3 * time.Second

// lastAnchors seals what is pending and logs the heads that moved since the last anchor: the
// next start only records the heads it finds, so without this a mesh that goes quiet would
// never have its last entries anchored.
func (s *sealer) lastAnchors(ctx context.Context) {
	if s.anchors == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, stopAnchorTimeout)
	defer cancel()
	if _, err := s.store.SealAudit(ctx); err != nil {
		s.metrics.backgroundError(s.log, "seal_audit", err, "retry", "next start")
	}
	if _, err := s.store.LogAuditAnchors(ctx, s.anchors); err != nil {
		s.metrics.backgroundError(s.log, "audit_anchors", err, "retry", "none: the heads of the last minutes go unanchored")
	}
}
