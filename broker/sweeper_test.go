package broker

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
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

// The deleting sweep runs beside the tick: with it held up (seconds of pages clearing a
// backlog), the sweeps of every tick go on; the grace sweep among them ends a dead node's
// sessions on time.
func TestDeletingSweepDoesNotHoldUpTheTick(t *testing.T) {
	t.Parallel()
	pool := dbtest.PoolFor(t, dbtest.URL(t))
	m := newMetrics()
	held, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	w := &sweeper{store: store.New(pool, "t"), signals: signals{nodeID: "t"}, log: slog.New(slog.DiscardHandler), metrics: m,
		every: 20 * time.Millisecond,
		expire: func(ctx context.Context) {
			once.Do(func() { close(held) })
			select {
			case <-release:
			case <-ctx.Done():
			}
		}}
	require.NoError(t, w.Start(context.Background()))
	t.Cleanup(func() {
		close(release)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = w.Stop(ctx)
	})
	select {
	case <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("the deleting sweep did not start")
	}
	m.DeliveriesPending.Set(-1)
	dbtest.WaitFor(t, 5*time.Second, "the tick's sweeps going on (the pending gauge, every fifth tick)", func() bool {
		return testutil.ToFloat64(m.DeliveriesPending) >= 0
	})
}
