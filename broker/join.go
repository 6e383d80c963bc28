package broker

import (
	"context"
	"net/http"
)

// joinBounds bounds unauthenticated POST /join requests (membership.JoinBounds) the way hooks
// are bounded: a rate per client address (JOIN_RATE_LIMIT_PER_SOURCE_PER_MIN, keyed as hooks
// key it, TRUSTED_PROXY_HEADER included) before the body is read, and a few statement slots
// with a bounded wait, so a flood of self-signed invites can't take the database pool from
// sends and hellos.
type joinBounds struct {
	trustedHeader string
	perSource     *hookLimiter
	slots         *hookSlots
}

// The statement bounds are constants, not settings: a join is a person accepting an invite, a
// few a minute on a busy broker, so they sit far above real use and need no tuning.
const (
	// joinConcurrency is the join statements a replica runs at once: 2 of the pool's 16
	// connections (db.DefaultMaxConns), next to hooks' 4 (HOOK_CONCURRENCY).
	joinConcurrency = 2
	// joinQueue is the joins waiting for a slot (hookSlotWait each at most); beyond, 503 at once.
	joinQueue = 32
)

func newJoinBounds(cfg Config) *joinBounds {
	return &joinBounds{trustedHeader: cfg.TrustedProxyHeader,
		perSource: newHookLimiter(cfg.JoinRatePerSourceMin, hookLimiterKeys),
		slots:     newHookSlots(joinConcurrency, joinQueue, hookSlotWait)}
}

func (b *joinBounds) Allow(r *http.Request) (string, bool) {
	source := clientSource(r, b.trustedHeader)
	return source, b.perSource.allow(source) == limitAllowed
}

func (b *joinBounds) Acquire(ctx context.Context) bool { return b.slots.acquire(ctx) }

func (b *joinBounds) Release() { b.slots.release() }
