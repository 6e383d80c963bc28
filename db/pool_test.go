package db_test

import (
	"fmt"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
)

// backends counts the server connections open under an application name.
func backends(t *testing.T, counter *pgxpool.Pool, appName string) int {
	t.Helper()
	var n int
	require.NoError(t, counter.QueryRow(dbtest.Context(t),
		`SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, appName).Scan(&n))
	return n
}

// A replica's pool opens its spare connections before anything asks for them, and keeps them
// spare as it is used: a burst finds them open instead of connecting on its requests' path.
func TestPoolKeepsSpareConnectionsOpen(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	counter := dbtest.Pool(t)
	pool, err := db.NewPool(ctx, dbtest.URL(t), db.PoolConfig{MaxConns: 6, MinIdle: 2, AppName: "spare-test"})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	dbtest.WaitFor(t, 10*time.Second, "two spare connections opened unasked", func() bool { return backends(t, counter, "spare-test") == 2 })

	held, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer held.Release()
	dbtest.WaitFor(t, 15*time.Second, "two spare beside the one in use", func() bool { return backends(t, counter, "spare-test") == 3 })

	// Connections do not all reach their lifetime together: each gets its own, spread over
	// half the lifetime again. The spares are the floor, so none is closed for being idle.
	require.Equal(t, time.Hour/2, pool.Config().MaxConnLifetimeJitter)
	require.Equal(t, int32(2), pool.Config().MinConns)
}

// withQuery is u with the query parameters kv (pairs) set.
func withQuery(t *testing.T, u string, kv ...string) string {
	t.Helper()
	p, err := url.Parse(u)
	require.NoError(t, err)
	q := p.Query()
	for i := 0; i < len(kv); i += 2 {
		q.Set(kv[i], kv[i+1])
	}
	p.RawQuery = q.Encode()
	return p.String()
}

// DATABASE_URL's pool settings are the operator's and win over the broker's defaults, in a
// URL or a key=value string, read as Postgres's own parser reads them.
func TestPoolSettingsInTheURLWin(t *testing.T) {
	t.Parallel()
	base := dbtest.URL(t)
	u, err := url.Parse(base)
	require.NoError(t, err)
	pw, _ := u.User.Password()
	dsn := fmt.Sprintf("host=%s port=%s user=%s password='%s' dbname=%s sslmode=disable",
		u.Hostname(), u.Port(), u.User.Username(), pw, u.Path[1:])

	for name, tc := range map[string]struct {
		conn             string
		maxConns, minIdl int32
		jitter           time.Duration
	}{
		"url": {conn: withQuery(t, base, "pool_max_conns", "3", "pool_min_idle_conns", "0",
			"pool_max_conn_lifetime_jitter", "1m"), maxConns: 3, minIdl: 0, jitter: time.Minute},
		"key=value with spaces": {conn: dsn + " pool_max_conns = 3", maxConns: 3, minIdl: 2, jitter: 30 * time.Minute},
		"a setting's name quoted in a value is not the setting": {
			conn: dsn + " application_name='x pool_max_conns=3'", maxConns: 6, minIdl: 2, jitter: 30 * time.Minute},
	} {
		t.Run(name, func(t *testing.T) {
			pool, err := db.NewPool(dbtest.Context(t), tc.conn, db.PoolConfig{MaxConns: 6, MinIdle: 2, AppName: "url-test"})
			require.NoError(t, err)
			t.Cleanup(pool.Close)
			c := pool.Config()
			require.Equal(t, tc.maxConns, c.MaxConns)
			require.Equal(t, tc.minIdl, c.MinIdleConns)
			require.Equal(t, tc.jitter, c.MaxConnLifetimeJitter)
		})
	}
}

// The replicas' pool settings in DATABASE_URL do not reach Postgres from the migrations'
// connection, which would refuse them ("unrecognized configuration parameter").
func TestMigrationsTakeAURLWithPoolSettings(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	m, err := db.NewMigrator(withQuery(t, dbtest.EmptyURL(t), "pool_max_conns", "8", "pool_min_idle_conns", "1"), dbtest.Logger(t))
	require.NoError(t, err)
	defer m.Close()
	require.NoError(t, m.Up(ctx))
}
