package db_test

import (
	"net/url"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
)

// backends counts the server connections open under an application name.
func backends(t *testing.T, appName string) int {
	t.Helper()
	var n int
	require.NoError(t, dbtest.Pool(t).QueryRow(dbtest.Context(t),
		`SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, appName).Scan(&n))
	return n
}

// A replica's pool opens its spare connections before anything asks for them, and keeps them
// spare as it is used: a burst finds them open instead of connecting on its requests' path.
func TestPoolKeepsSpareConnectionsOpen(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool, err := db.NewPool(ctx, dbtest.URL(t), db.PoolConfig{MaxConns: 6, MinIdle: 2, AppName: "spare-test"})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	dbtest.WaitFor(t, 10*time.Second, "two spare connections opened unasked", func() bool { return backends(t, "spare-test") == 2 })

	held, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer held.Release()
	dbtest.WaitFor(t, 15*time.Second, "two spare beside the one in use", func() bool { return backends(t, "spare-test") == 3 })

	// Connections do not all reach their lifetime together: each gets its own, spread over
	// half the lifetime again.
	require.Equal(t, time.Hour/2, pool.Config().MaxConnLifetimeJitter)
}

// DATABASE_URL's pool settings are the operator's and win over the broker's defaults.
func TestPoolSettingsInTheURLWin(t *testing.T) {
	t.Parallel()
	u, err := url.Parse(dbtest.URL(t))
	require.NoError(t, err)
	q := u.Query()
	q.Set("pool_max_conns", "3")
	q.Set("pool_min_idle_conns", "0")
	q.Set("pool_max_conn_lifetime_jitter", "1m")
	u.RawQuery = q.Encode()
	pool, err := db.NewPool(dbtest.Context(t), u.String(), db.PoolConfig{MaxConns: 6, MinIdle: 2, AppName: "url-test"})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	c := pool.Config()
	require.Equal(t, int32(3), c.MaxConns)
	require.Equal(t, int32(0), c.MinIdleConns)
	require.Equal(t, time.Minute, c.MaxConnLifetimeJitter)
}
