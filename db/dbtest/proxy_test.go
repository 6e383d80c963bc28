package dbtest

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/pgproxy"
)

func TestMain(m *testing.M) { Main(m) }

func TestProxyCutRestorePool(t *testing.T) {
	t.Parallel()
	ctx := Context(t)
	url := URL(t)
	proxy := NewProxy(t, url)
	pool := PoolFor(t, proxy.URL(url))
	require.NoError(t, pool.Ping(ctx))

	proxy.Cut()
	WaitFor(t, 10*time.Second, "pool fails while cut", func() bool {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		return pool.Ping(pctx) != nil
	})
	proxy.Restore()
	WaitFor(t, 10*time.Second, "pool works after restore", func() bool { return pool.Ping(ctx) == nil })
}

func TestProxyCountsOneConnection(t *testing.T) {
	t.Parallel()
	ctx := Context(t)
	url := URL(t)
	proxy := NewProxyWith(t, url, pgproxy.Config{Delay: 5 * time.Millisecond})
	conn := ConnFor(t, proxy.URL(url))

	var n int
	start := time.Now()
	f := proxy.Count(func() { require.NoError(t, conn.QueryRow(ctx, "SELECT 1").Scan(&n)) })
	require.GreaterOrEqual(t, time.Since(start), 2*2*5*time.Millisecond, "two flights, each 5ms each way")
	require.Equal(t, pgproxy.Flights{Statement: 2}, f, "prepare, then execute")
	require.Equal(t, int64(2), proxy.ConnFlights(conn).Statement)

	proxy.SetDelay(0)
	proxy.Exclude(conn)
	require.Equal(t, pgproxy.Flights{}, proxy.Count(func() { require.NoError(t, conn.Ping(ctx)) }))
	require.Equal(t, int64(3), proxy.ConnFlights(conn).Statement)
	require.Len(t, proxy.Pgproxy().Conns(), 1)
}
