package pgproxy_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/db/pgproxy"
)

// These tests measure what pgx operations cost in flights against a real server; the package
// documentation quotes the numbers. dbtest's URLs use sslmode=disable, so the proxy can read
// the startup exchange and every flight is Startup or Statement.

func stmt(n int64) pgproxy.Flights { return pgproxy.Flights{Statement: n} }

func TestPgxFlights(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)

	var conn *pgx.Conn
	f := proxy.Count(func() { conn = dbtest.ConnFor(t, proxy.URL(url)) })
	require.Zero(t, f.Statement, "connecting runs no statement")
	require.Zero(t, f.Opaque)
	require.GreaterOrEqual(t, f.Startup, int64(1), "startup and authentication")
	t.Logf("connect: %+v", f)

	var n int
	query := func(sql string, args ...any) func() {
		return func() { require.NoError(t, conn.QueryRow(ctx, sql, args...).Scan(&n)) }
	}

	// The default exec mode (cache statement) prepares a new SQL text first: Parse/Describe/Sync,
	// then Bind/Execute/Sync.
	require.Equal(t, stmt(2), proxy.Count(query("SELECT $1::int + 1", 1)), "cold: prepare, then execute")
	require.Equal(t, stmt(1), proxy.Count(query("SELECT $1::int + 1", 2)), "warm: one flight")
	require.Equal(t, stmt(1), proxy.Count(query("SELECT $1::int + 1", 3)))
	require.Equal(t, 4, n)

	// Query without arguments still goes through the statement cache; Exec without arguments
	// uses the simple protocol.
	require.Equal(t, stmt(2), proxy.Count(query("SELECT 7")))
	require.Equal(t, stmt(1), proxy.Count(query("SELECT 7")))
	require.Equal(t, stmt(1), proxy.Count(func() { _, err := conn.Exec(ctx, "SELECT 8"); require.NoError(t, err) }))
	require.Equal(t, stmt(1), proxy.Count(func() { _, err := conn.Exec(ctx, "SELECT 8"); require.NoError(t, err) }))

	// The other exec modes never prepare a named statement.
	require.Equal(t, stmt(1), proxy.Count(query("SELECT $1::int", pgx.QueryExecModeExec, 5)), "exec: unnamed Parse/Bind/Execute/Sync")
	require.Equal(t, stmt(1), proxy.Count(query("SELECT $1::int", pgx.QueryExecModeSimpleProtocol, 5)))
	require.Equal(t, stmt(2), proxy.Count(query("SELECT $1::int", pgx.QueryExecModeDescribeExec, 5)), "describe-exec: describe every time")
	require.Equal(t, stmt(2), proxy.Count(query("SELECT $1::int", pgx.QueryExecModeDescribeExec, 5)))

	// A batch pipelines its statements up to one Sync.
	batch := func() {
		b := &pgx.Batch{}
		b.Queue("SELECT $1::int * 10", 1)
		b.Queue("SELECT $1::text", "two")
		b.Queue("SELECT now()")
		require.NoError(t, conn.SendBatch(ctx, b).Close())
	}
	require.Equal(t, stmt(2), proxy.Count(batch), "cold batch: one flight prepares all three, one runs them")
	require.Equal(t, stmt(1), proxy.Count(batch), "warm batch of 3: one flight")

	// An explicit transaction: BEGIN and COMMIT are a flight each (simple protocol).
	tx := func() {
		require.NoError(t, pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			return tx.QueryRow(ctx, "SELECT $1::int + 1", 1).Scan(&n)
		}))
	}
	require.Equal(t, stmt(3), proxy.Count(tx), "BEGIN; SELECT (warm); COMMIT")

	// A failed statement costs its flight; pgx does not retry.
	require.Equal(t, stmt(1), proxy.Count(func() { _, err := conn.Exec(ctx, "SELECT nope"); require.Error(t, err) }))

	// Closing sends Terminate: not a statement.
	before := proxy.Flights()
	require.NoError(t, conn.Close(ctx))
	dbtest.WaitFor(t, 10*time.Second, "terminate counted", func() bool {
		return proxy.Flights().Sub(before) == pgproxy.Flights{Startup: 1}
	})
}

// testPool opens a pool through the proxy; shouldPing replaces pgxpool's "idle over 1s".
func testPool(t *testing.T, url string, shouldPing bool) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(url)
	require.NoError(t, err)
	cfg.MaxConns = 1
	cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return shouldPing }
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

func TestPoolFlights(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	var n int
	op := func(pool *pgxpool.Pool) func() {
		return func() { require.NoError(t, pool.QueryRow(ctx, "SELECT $1::int", 1).Scan(&n)) }
	}

	pool := testPool(t, proxy.URL(url), false)
	f := proxy.Count(op(pool))
	require.Equal(t, int64(2), f.Statement, "a new connection: prepare and execute; its startup counts apart")
	require.GreaterOrEqual(t, f.Startup, int64(1))
	require.Equal(t, stmt(1), proxy.Count(op(pool)), "acquire of an idle connection adds nothing")

	// pgxpool pings a connection idle for more than a second before handing it out.
	pinging := testPool(t, proxy.URL(url), true)
	require.NoError(t, pinging.Ping(ctx)) // connect and warm up outside the count
	proxy.Count(op(pinging))
	require.Equal(t, stmt(2), proxy.Count(op(pinging)), "ping on acquire, then the query")
}

func TestDelayAddsToEveryRoundTrip(t *testing.T) {
	t.Parallel()
	const delay = 20 * time.Millisecond
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	conn := dbtest.ConnFor(t, proxy.URL(url))
	var n int
	require.NoError(t, conn.QueryRow(ctx, "SELECT $1::int", 1).Scan(&n)) // prepared while fast

	proxy.SetDelay(delay)
	var took time.Duration
	f := proxy.Count(func() {
		start := time.Now()
		require.NoError(t, conn.QueryRow(ctx, "SELECT $1::int", 2).Scan(&n))
		took = time.Since(start)
	})
	require.Equal(t, stmt(1), f)
	require.GreaterOrEqual(t, took, 2*delay, "one round trip: the delay each way")

	// A pipeline of many statements is still one flight, so one round trip of delay.
	b := &pgx.Batch{}
	for i := range 200 {
		b.Queue("SELECT $1::int", i)
	}
	f = proxy.Count(func() {
		start := time.Now()
		require.NoError(t, conn.SendBatch(ctx, b).Close())
		took = time.Since(start)
	})
	require.Equal(t, stmt(1), f)
	require.GreaterOrEqual(t, took, 2*delay)
	t.Logf("batch of 200 with %s each way: %s", delay, took)

	// A new connection pays the delay for every flight of its startup too.
	var conn2 *pgx.Conn
	start := time.Now()
	f = proxy.Count(func() { conn2 = dbtest.ConnFor(t, proxy.URL(url)) })
	require.GreaterOrEqual(t, time.Since(start), time.Duration(f.Startup)*2*delay)
	require.NoError(t, conn2.Ping(ctx))
}

func TestExcludeFixtureConnection(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	fixture := dbtest.ConnFor(t, proxy.URL(url))
	conn := dbtest.ConnFor(t, proxy.URL(url))
	proxy.Exclude(fixture)

	f := proxy.Count(func() {
		_, err := fixture.Exec(ctx, "SELECT 1")
		require.NoError(t, err)
		_, err = conn.Exec(ctx, "SELECT 2")
		require.NoError(t, err)
	})
	require.Equal(t, stmt(1), f, "only conn counts")
	require.Equal(t, int64(1), proxy.ConnFlights(fixture).Statement, "the fixture keeps its own count")
	require.Equal(t, int64(1), proxy.ConnFlights(conn).Statement)
}

func TestCutDropsPgxConnections(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	conn := dbtest.ConnFor(t, proxy.URL(url))
	require.NoError(t, conn.Ping(ctx))
	require.Len(t, proxy.Pgproxy().Conns(), 1)

	proxy.Cut()
	require.Error(t, conn.Ping(ctx), "the open connection is gone")
	dbtest.WaitFor(t, 10*time.Second, "no connection through the proxy", func() bool {
		return len(proxy.Pgproxy().Conns()) == 0
	})
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err := pgx.Connect(cctx, proxy.URL(url))
	require.Error(t, err, "new connections are refused while cut")

	proxy.Restore()
	require.NoError(t, dbtest.ConnFor(t, proxy.URL(url)).Ping(ctx))
}

func TestCancelRequestCountsAsStartup(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	conn := dbtest.ConnFor(t, proxy.URL(url))

	before := proxy.Flights()
	qctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	_, err := conn.Exec(qctx, "SELECT pg_sleep(30)")
	require.Error(t, err)
	// pgx gives up on the connection: it sends a CancelRequest on a new connection (through
	// the proxy: it dials the address of its own connection), then the old connection's lone
	// Terminate. Both are startup flights, never statements; the Terminate may already be
	// counted when the cancel is first seen (the window between them is short under load).
	dbtest.WaitFor(t, 10*time.Second, "cancel request counted", func() bool {
		d := proxy.Flights().Sub(before)
		return d.Startup >= 1 && d.Statement == 1
	})
	d := proxy.Flights().Sub(before)
	require.LessOrEqual(t, d.Startup, int64(2), "the cancel request and the Terminate: %+v", d)
	require.Equal(t, int64(1), d.Statement, "the cancelled statement only: %+v", d)
}
