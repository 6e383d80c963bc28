package db_test

import (
	"context"
	"io/fs"
	"strings"
	"sync"
	"testing"
	"testing/fstest"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/migrations"
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

// Migration 00060 hands the session keys bound to a revoked member row to the live row of the
// same key (a key enrolled anew after its revocation): left there, its hellos presenting them
// were refused session_key_taken for good. Another member's bindings stay.
func TestMigrationHandsSessionKeysToTheReadmittedMember(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	url := dbtest.EmptyURL(t)
	m, err := db.NewMigrator(url, dbtest.Logger(t))
	require.NoError(t, err)
	defer m.Close()
	require.NoError(t, m.Up(ctx))
	// Back to just before 00060, where a database of the previous release stands.
	for {
		st, err := m.Status(ctx)
		require.NoError(t, err)
		newest := int64(0)
		for _, s := range st {
			if s.Applied && s.Version > newest {
				newest = s.Version
			}
		}
		if newest < 60 {
			break
		}
		require.NoError(t, m.Down(ctx))
	}
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	key, other := strings.Repeat("a", 64), strings.Repeat("b", 64)
	sk1, sk2, sk3 := strings.Repeat("1", 64), strings.Repeat("2", 64), strings.Repeat("3", 64)
	_, err = conn.Exec(ctx, `
		INSERT INTO claudemesh.mesh (id, slug, name, owner_pubkey) VALUES ('m1', 'demo', 'demo', '`+other+`');
		INSERT INTO claudemesh.member (id, mesh_id, pubkey, display_name, role, revoked_at) VALUES
			('old', 'm1', '`+key+`', 'alice', 'member', now()),
			('new', 'm1', '`+key+`', 'alice', 'member', NULL),
			('bob', 'm1', '`+other+`', 'bob', 'member', NULL);
		INSERT INTO claudemesh.session_key (mesh_id, session_pubkey, member_id) VALUES
			('m1', '`+key+`', 'old'), ('m1', '`+sk1+`', 'old'), ('m1', '`+sk2+`', 'bob'), ('m1', '`+sk3+`', 'new')`)
	require.NoError(t, err)
	require.NoError(t, m.Up(ctx))
	rows, err := conn.Query(ctx, `SELECT session_pubkey, member_id FROM claudemesh.session_key ORDER BY session_pubkey`)
	require.NoError(t, err)
	got := map[string]string{}
	for rows.Next() {
		var k, mem string
		require.NoError(t, rows.Scan(&k, &mem))
		got[k] = mem
	}
	require.NoError(t, rows.Err())
	require.Equal(t, map[string]string{key: "new", sk1: "new", sk2: "bob", sk3: "new"}, got)
}

// Migration numbers are handed out per change, so a change merged later can carry a number
// below one a release already applied: 00062 and 00063 came after 00064. `migrate up` over a
// database of the previous release (everything but those two) applies them. Before, goose
// refused ("2 missing (out-of-order) migrations"): the release could not be deployed.
func TestMigrateUpAppliesNumbersBelowTheApplied(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	url := dbtest.EmptyURL(t)
	previous := fstest.MapFS{}
	entries, err := fs.ReadDir(migrations.FS, ".")
	require.NoError(t, err)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "00062_") || strings.HasPrefix(e.Name(), "00063_") {
			continue
		}
		b, err := fs.ReadFile(migrations.FS, e.Name())
		require.NoError(t, err)
		previous[e.Name()] = &fstest.MapFile{Data: b}
	}
	cc, err := pgx.ParseConfig(url)
	require.NoError(t, err)
	sqlDB := stdlib.OpenDB(*cc)
	defer sqlDB.Close()
	p, err := goose.NewProvider(goose.DialectPostgres, sqlDB, previous,
		goose.WithTableName(db.VersionTable), goose.WithDisableGlobalRegistry(true))
	require.NoError(t, err)
	_, err = p.Up(ctx)
	require.NoError(t, err)

	require.NoError(t, db.Migrate(ctx, url, dbtest.Logger(t)))
	m, err := db.NewMigrator(url, nil)
	require.NoError(t, err)
	defer m.Close()
	st, err := m.Status(ctx)
	require.NoError(t, err)
	for _, s := range st {
		require.True(t, s.Applied, "migration %d applied", s.Version)
	}
	var n int
	require.NoError(t, sqlDB.QueryRowContext(ctx, "SELECT count(*) FROM claudemesh.state_deleted").Scan(&n))
}
