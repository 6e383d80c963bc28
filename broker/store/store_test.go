package store_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

// A send batch whose answer never came must not be refused as if it had not committed: the
// committer tells these cases apart by OutcomeUnknown, against a real Postgres.
func TestOutcomeUnknown(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)

	// Postgres answered with an error: the statement rolled back.
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, "SELECT 1/0")
	require.Error(t, err)
	require.False(t, store.OutcomeUnknown(err), "a Postgres error: rolled back, known")

	// No connection at all: nothing was sent.
	_, err = pgx.Connect(ctx, "postgres://postgres@127.0.0.1:1/none?sslmode=disable&connect_timeout=2")
	require.Error(t, err)
	require.False(t, store.OutcomeUnknown(err), "refused connection: never sent, known")

	// The statement ran past the deadline: it may still commit.
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	_, err = conn.Exec(short, "SELECT pg_sleep(5)")
	require.Error(t, err)
	require.True(t, store.OutcomeUnknown(err), "deadline while it ran: unknown (%v)", err)

	// The connection broke while the statement ran (a proxy between us and Postgres cut).
	proxy := dbtest.NewProxy(t, url)
	pool := dbtest.PoolFor(t, url)
	victim, err := pgx.Connect(ctx, proxy.URL(url))
	require.NoError(t, err)
	pid := victim.PgConn().PID()
	done := make(chan error, 1)
	go func() { _, err := victim.Exec(ctx, "SELECT pg_sleep(5)"); done <- err }()
	dbtest.WaitFor(t, 5*time.Second, "the statement running", func() bool {
		var n int
		_ = pool.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", pid).Scan(&n)
		return n == 1
	})
	proxy.Cut()
	err = <-done
	_ = victim.Close(context.Background())
	require.Error(t, err)
	require.True(t, store.OutcomeUnknown(err), "connection lost mid-statement: unknown (%v)", err)
}
