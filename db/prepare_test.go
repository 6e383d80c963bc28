package db_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
)

// A pool given statements to prepare hands out connections on which their first use is one
// round trip, not two (prepare, then run), having run none of them: a replica far from the
// primary pays no extra round trip when its pool grows or replaces a connection.
func TestPoolPreparesOnConnectWithoutRunning(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	fixture := dbtest.PoolFor(t, url)
	_, err := fixture.Exec(ctx, `CREATE TABLE prepared_on_connect (x int)`)
	require.NoError(t, err)
	const insert = `INSERT INTO prepared_on_connect VALUES ($1)`
	const count = `SELECT count(*) FROM prepared_on_connect`
	rows := func() (n int) {
		require.NoError(t, fixture.QueryRow(ctx, count).Scan(&n))
		return n
	}

	for _, tc := range []struct {
		name    string
		prepare []string
		flights int64
	}{
		{"none", nil, 2},
		{"listed", []string{"BEGIN", insert, "COMMIT"}, 1},
		// A connection string asking for another mode (a transaction pooler's): nothing.
		{"simple protocol", []string{"BEGIN", insert}, 1},
		// One that cannot be prepared (a schema not migrated yet) takes the others with it;
		// the connection still works: pgx drops what the failed flight left, then prepares
		// on first use.
		{"one fails", []string{`SELECT * FROM no_such_table`, insert}, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			proxy := dbtest.NewProxy(t, url)
			poolURL := proxy.URL(url)
			if tc.name == "simple protocol" {
				poolURL = withQuery(t, poolURL, "default_query_exec_mode", "simple_protocol")
			}
			pool, err := db.NewPool(ctx, poolURL, db.PoolConfig{MaxConns: 1, Prepare: tc.prepare})
			require.NoError(t, err)
			t.Cleanup(pool.Close)
			conn, err := pool.Acquire(ctx)
			require.NoError(t, err)
			defer conn.Release()
			before := rows()
			require.Equal(t, byte('I'), conn.Conn().PgConn().TxStatus(), "at rest, not inside a transaction")
			n := proxy.Count(func() {
				_, err := conn.Exec(ctx, insert, 1)
				require.NoError(t, err)
			}).Statement
			require.Equal(t, tc.flights, n, "round trips of the statement's first use")
			require.Equal(t, before+1, rows(), "only the insert above ran")
		})
	}
}

// Preparing a replica's request path takes no lock on a table: with every table of the schema
// held exclusively (an ALTER TABLE, a VACUUM FULL), a new connection is still handed out at
// once, and queries that do not touch those tables go on.
func TestPreparingTheRequestPathWaitsOnNoTable(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	holder := dbtest.ConnFor(t, url)
	var tables string
	require.NoError(t, holder.QueryRow(ctx, `SELECT string_agg(format('%I.%I', schemaname, tablename), ', ')
		FROM pg_tables WHERE schemaname = 'claudemesh'`).Scan(&tables))
	_, err := holder.Exec(ctx, "BEGIN; LOCK TABLE "+tables+" IN ACCESS EXCLUSIVE MODE")
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = holder.Exec(context.Background(), "ROLLBACK") })

	pool, err := db.NewPool(ctx, url, db.PoolConfig{MaxConns: 1, Prepare: db.RequestPath})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	actx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	var one int
	require.NoError(t, pool.QueryRow(actx, `SELECT 1`).Scan(&one), "a new connection waited on a locked table")
}
