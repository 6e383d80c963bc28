package broker

import (
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
)

// The expiry sweep's parts do not wait on each other: with the delivery table held (a long
// statement, a lock, or a backlog past the deadline), the signatures, hook signals, gone
// nodes and ended presences are still deleted. They were all skipped behind the expiry, and
// stayed forever once it outgrew its deadline.
func TestExpirySweepPartsRunOnTheirOwn(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	m := newMetrics()
	w := &sweeper{store: store.New(pool, "t"), log: slog.New(slog.DiscardHandler), metrics: m, taskTimeout: time.Second}
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.seen_signature (signature, expires_at) VALUES ('old', now() - interval '1 hour')`)
	require.NoError(t, err)

	holder := dbtest.ConnFor(t, url)
	_, err = holder.Exec(ctx, `BEGIN; LOCK TABLE claudemesh.delivery IN EXCLUSIVE MODE`)
	require.NoError(t, err)
	w.sweepExpired(ctx)
	var n int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.seen_signature`).Scan(&n))
	require.Zero(t, n, "the expired signature deleted while deliveries were held")
	_, err = holder.Exec(ctx, `ROLLBACK`)
	require.NoError(t, err)
}
