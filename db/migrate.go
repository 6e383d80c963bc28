package db

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/claudemesh/broker/migrations"
)

// migrationLockID is the advisory lock that serializes replicas migrating at once. It is our
// own number, not goose's default, so another goose user on the same server never blocks us.
const migrationLockID = 0x636c6d7368 // "clmsh"

// VersionTable is goose's bookkeeping table. It lives outside the claudemesh schema because
// goose creates it before the first migration creates the schema.
const VersionTable = "claudemesh_goose_db_version"

// Migrator runs the embedded migrations.
type Migrator struct {
	db       *sql.DB
	provider *goose.Provider
}

// NewMigrator opens a dedicated database/sql handle (goose needs one) for url.
func NewMigrator(url string, logger *slog.Logger) (*Migrator, error) {
	cc, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, parseError(url, err)
	}
	// DATABASE_URL may carry the replicas' pool settings (pool_max_conns, ...).
	sqlDB := stdlib.OpenDB(*WithoutPoolSettings(cc))
	locker, err := lock.NewPostgresSessionLocker(
		lock.WithLockID(migrationLockID),
		// Poll every second, for up to five minutes: a racing replica waits, it doesn't fail.
		lock.WithLockTimeout(1, 300),
	)
	if err != nil {
		_ = sqlDB.Close()
		return nil, fmt.Errorf("migration locker: %w", err)
	}
	opts := []goose.ProviderOption{
		goose.WithSessionLocker(locker),
		goose.WithTableName(VersionTable),
		goose.WithDisableGlobalRegistry(true),
		// Numbers are handed out per change, so one merged later can be below one a release
		// already applied (00062 and 00063 after 00064): apply it, don't refuse the release.
		goose.WithAllowOutofOrder(true),
	}
	if logger != nil {
		opts = append(opts, goose.WithSlog(logger), goose.WithVerbose(true))
	}
	p, err := goose.NewProvider(goose.DialectPostgres, sqlDB, migrations.FS, opts...)
	if err != nil {
		_ = sqlDB.Close()
		return nil, fmt.Errorf("migration provider: %w", err)
	}
	return &Migrator{db: sqlDB, provider: p}, nil
}

// Up applies every pending migration.
func (m *Migrator) Up(ctx context.Context) error {
	if _, err := m.provider.Up(ctx); err != nil {
		return fmt.Errorf("migrate up: %w", err)
	}
	return nil
}

// Down rolls back the newest applied migration.
func (m *Migrator) Down(ctx context.Context) error {
	if _, err := m.provider.Down(ctx); err != nil {
		return fmt.Errorf("migrate down: %w", err)
	}
	return nil
}

// DownAll rolls back every applied migration.
func (m *Migrator) DownAll(ctx context.Context) error {
	if _, err := m.provider.DownTo(ctx, 0); err != nil {
		return fmt.Errorf("migrate down: %w", err)
	}
	return nil
}

// MigrationStatus is one migration and whether it is applied.
type MigrationStatus struct {
	Version int64
	Name    string
	Applied bool
}

// Status lists every migration with its state.
func (m *Migrator) Status(ctx context.Context) ([]MigrationStatus, error) {
	st, err := m.provider.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("migrate status: %w", err)
	}
	out := make([]MigrationStatus, 0, len(st))
	for _, s := range st {
		out = append(out, MigrationStatus{
			Version: s.Source.Version,
			Name:    s.Source.Path,
			Applied: s.State == goose.StateApplied,
		})
	}
	return out, nil
}

// SchemaVersions returns the newest migration applied to the database at url and the newest
// this binary carries; the first is the larger when a newer release migrated the database.
// It takes no lock: it never waits for a migration in progress.
func SchemaVersions(ctx context.Context, url string) (applied, known int64, err error) {
	m, err := NewMigrator(url, nil)
	if err != nil {
		return 0, 0, err
	}
	defer m.Close()
	applied, known, err = m.provider.GetVersions(ctx)
	if err != nil {
		return 0, 0, fmt.Errorf("schema version: %w", err)
	}
	return applied, known, nil
}

// Close releases the migration connection.
func (m *Migrator) Close() error { return m.db.Close() }

// Migrate is the one-call form used at start-up: open, apply, close.
func Migrate(ctx context.Context, url string, logger *slog.Logger) error {
	m, err := NewMigrator(url, logger)
	if err != nil {
		return err
	}
	defer m.Close()
	return m.Up(ctx)
}
