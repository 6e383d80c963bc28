package db_test

import (
	"context"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

func tableCount(t *testing.T, url string) int {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	var n int
	require.NoError(t, conn.QueryRow(ctx, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'claudemesh'").Scan(&n))
	return n
}

func TestMigrateUpDownUp(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	url := dbtest.EmptyURL(t)
	m, err := db.NewMigrator(url, dbtest.Logger(t))
	require.NoError(t, err)
	defer m.Close()

	require.NoError(t, m.Up(ctx))
	require.Greater(t, tableCount(t, url), 10, "schema tables after up")
	st, err := m.Status(ctx)
	require.NoError(t, err)
	for _, s := range st {
		require.True(t, s.Applied, "migration %d applied", s.Version)
	}

	require.NoError(t, m.DownAll(ctx))
	require.Equal(t, 0, tableCount(t, url), "no schema tables after down")

	require.NoError(t, m.Up(ctx))
	require.Greater(t, tableCount(t, url), 10)
	// Up again is a no-op, not an error.
	require.NoError(t, m.Up(ctx))
}

// Replicas that start together both run `migrate up`; the advisory lock makes one wait.
func TestMigrateConcurrentUp(t *testing.T) {
	t.Parallel()
	url := dbtest.EmptyURL(t)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = db.Migrate(context.Background(), url, nil)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err, "migrator %d", i)
	}
	require.Greater(t, tableCount(t, url), 10)
}

// A database migrated by a newer release shows a version above the binary's newest.
func TestSchemaVersions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	url := dbtest.URL(t)
	applied, known, err := db.SchemaVersions(ctx, url)
	require.NoError(t, err)
	require.Positive(t, known)
	require.Equal(t, known, applied, "migrated by this binary")

	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, "INSERT INTO "+db.VersionTable+" (version_id, is_applied) VALUES ($1, true)", known+1)
	require.NoError(t, err)
	applied, known2, err := db.SchemaVersions(ctx, url)
	require.NoError(t, err)
	require.Equal(t, known, known2)
	require.Equal(t, known+1, applied)
}
