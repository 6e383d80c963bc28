// Package dbtest is the test harness: it gives each test its own freshly migrated database,
// cloned from a template so a test pays milliseconds, not a migration run. The server is
// TEST_DATABASE_URL or DATABASE_URL when set, else one throwaway cluster started for the test
// binary from the machine's Postgres binaries. It also routes logs to t.Log and waits on
// conditions with a deadline, so tests never sleep.
package dbtest

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/embedded"
	"github.com/claudemesh/broker/migrations"
)

var (
	serverOnce sync.Once
	serverURL  string
	serverErr  error
	cluster    *embedded.Cluster
	clusterDir string

	templateOnce sync.Once
	templateName string
	templateErr  error
)

// Main runs the tests, fails the run when a goroutine outlives them (goleak: a service that
// does not stop, a socket left open), and stops the throwaway cluster, if one was started.
// Call it from TestMain: `func TestMain(m *testing.M) { dbtest.Main(m) }`.
func Main(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(LeakOptions()...); err != nil {
			fmt.Fprintf(os.Stderr, "dbtest: goroutines outlived the tests: %v\n", err)
			code = 1
		}
	}
	if cluster != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := cluster.Stop(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "dbtest: stop cluster: %v\n", err)
		}
		cancel()
		_ = os.RemoveAll(clusterDir)
	}
	os.Exit(code)
}

// LeakOptions are the goroutines goleak tolerates at the end of a test binary: none of ours.
// Closed pools finish their background goroutines asynchronously, so goleak retries for a
// while before it reports (its default).
func LeakOptions() []goleak.Option {
	return []goleak.Option{
		// The throwaway cluster's process reaper lives until Main stops the cluster.
		goleak.IgnoreTopFunction("os/exec.(*Cmd).Wait"),
		goleak.IgnoreAnyFunction("github.com/claudemesh/broker/db/embedded.(*Cluster).launch.func1"),
	}
}

// ServerURL is the URL of the server tests run against (the admin database, not a test one).
func ServerURL(t testing.TB) string {
	t.Helper()
	serverOnce.Do(func() {
		for _, env := range []string{"TEST_DATABASE_URL", "DATABASE_URL"} {
			if v := os.Getenv(env); v != "" {
				serverURL = v
				return
			}
		}
		clusterDir, serverErr = os.MkdirTemp("", "claudemesh-test-pg-")
		if serverErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cluster, serverErr = embedded.Start(ctx, embedded.Config{DataDir: clusterDir, Database: "postgres"})
		if serverErr == nil {
			serverURL = cluster.URL()
		}
	})
	if serverErr != nil {
		t.Fatalf("dbtest: no Postgres server (set DATABASE_URL, or install Postgres binaries): %v", serverErr)
	}
	return serverURL
}

// PrivateCluster starts a throwaway cluster for this test alone, its database migrated, and
// stops it when the test ends: for a test that changes the server itself (crashes it, changes
// a server-wide setting), which would take every other test's database with it. cfg starts it
// again on the same data directory.
func PrivateCluster(t testing.TB) (pg *embedded.Cluster, cfg embedded.Config) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cfg = embedded.Config{DataDir: t.TempDir(), Logger: Logger(t)}
	pg, err := embedded.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("dbtest: private cluster: %v", err)
	}
	// A crash the test made is reported by Stop: not a failure of the test.
	t.Cleanup(func() { _ = pg.Stop(context.Background()) })
	// Warnings only: the migrations' statements would fill the test's log.
	quiet := slog.New(slog.NewTextHandler(&testWriter{t: t}, &slog.HandlerOptions{Level: slog.LevelWarn})) // used only here
	if err := db.Migrate(ctx, pg.URL(), quiet); err != nil {
		t.Fatalf("dbtest: migrate private cluster: %v", err)
	}
	return pg, cfg
}

// URL creates a fresh, fully migrated database for this test and returns its URL. The
// database is dropped when the test ends.
func URL(t testing.TB) string {
	t.Helper()
	base := ServerURL(t)
	tmpl := template(t, base)
	name := "cmt_" + randomHex(8)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := withAdmin(ctx, base, func(conn *pgx.Conn) error {
		return cloneDatabase(ctx, conn, tmpl, name)
	}); err != nil {
		t.Fatalf("dbtest: create database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := withAdmin(ctx, base, func(conn *pgx.Conn) error {
			_, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
			return err
		}); err != nil {
			t.Logf("dbtest: drop database %s: %v", name, err)
		}
	})
	return withDatabase(base, name)
}

// EmptyURL creates a fresh database with no schema at all (for migration tests).
func EmptyURL(t testing.TB) string {
	t.Helper()
	base := ServerURL(t)
	name := "cmt_" + randomHex(8)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := withAdmin(ctx, base, func(conn *pgx.Conn) error {
		_, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
		return err
	}); err != nil {
		t.Fatalf("dbtest: create database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = withAdmin(ctx, base, func(conn *pgx.Conn) error {
			_, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
			return err
		})
	})
	return withDatabase(base, name)
}

// Pool returns a pool on a fresh database for this test, closed when the test ends.
func Pool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	return PoolFor(t, URL(t))
}

// PoolFor opens a pool on url, closed when the test ends. Several pools on one URL stand in
// for several replicas.
func PoolFor(t testing.TB, dbURL string) *pgxpool.Pool {
	t.Helper()
	pool, err := db.NewPool(context.Background(), dbURL, db.PoolConfig{MaxConns: 8, AppName: "claudemesh-test"})
	if err != nil {
		t.Fatalf("dbtest: pool: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// template returns the name of a database holding the current migrations, creating it once
// per server. Its name carries a hash of the migration files, so a changed migration gets a
// new template instead of a stale one.
func template(t testing.TB, base string) string {
	t.Helper()
	templateOnce.Do(func() {
		sum, err := migrationsHash()
		if err != nil {
			templateErr = err
			return
		}
		templateName = "cmtmpl_" + sum
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		templateErr = withAdmin(ctx, base, func(conn *pgx.Conn) error {
			// Test binaries of several packages run at once against one server: one builds.
			if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(7364827)"); err != nil {
				return err
			}
			defer conn.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock(7364827)") //nolint:errcheck
			var exists bool
			if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", templateName).Scan(&exists); err != nil {
				return err
			}
			if exists {
				return nil
			}
			// Build under a temporary name and rename when complete, so a failed run never
			// leaves a half-migrated template behind.
			building := templateName + "_b" + randomHex(3)
			if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{building}.Sanitize()); err != nil {
				return err
			}
			if err := db.Migrate(ctx, withDatabase(base, building), nil); err != nil {
				_, _ = conn.Exec(ctx, "DROP DATABASE "+pgx.Identifier{building}.Sanitize()+" WITH (FORCE)")
				return err
			}
			return retryBusy(ctx, func() error {
				_, err := conn.Exec(ctx, "ALTER DATABASE "+pgx.Identifier{building}.Sanitize()+" RENAME TO "+pgx.Identifier{templateName}.Sanitize())
				return err
			})
		})
	})
	if templateErr != nil {
		t.Fatalf("dbtest: template database: %v", templateErr)
	}
	return templateName
}

func cloneDatabase(ctx context.Context, conn *pgx.Conn, tmpl, name string) error {
	return retryBusy(ctx, func() error {
		_, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()+" TEMPLATE "+pgx.Identifier{tmpl}.Sanitize())
		return err
	})
}

// retryBusy retries while Postgres says the source database is in use: a connection that
// just closed can linger for a few milliseconds on the server.
func retryBusy(ctx context.Context, f func() error) error {
	delay := 5 * time.Millisecond
	for {
		err := f()
		var pgErr *pgconn.PgError
		if err == nil || !errors.As(err, &pgErr) || pgErr.Code != "55006" {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(delay):
		}
		delay = min(delay*2, 200*time.Millisecond)
	}
}

func withAdmin(ctx context.Context, base string, f func(*pgx.Conn) error) error {
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return f(conn)
}

// withDatabase returns base with its database name replaced.
func withDatabase(base, name string) string {
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		panic(fmt.Sprintf("dbtest: DATABASE_URL must be a postgres:// URL, got %q", db.Redact(base)))
	}
	u.Path = "/" + name
	return u.String()
}

func migrationsHash() (string, error) {
	h := sha256.New()
	err := fs.WalkDir(migrations.FS, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(migrations.FS, path)
		if err != nil {
			return err
		}
		h.Write([]byte(path))
		h.Write(b)
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("hash migrations: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
