// Package db owns the broker's access to Postgres: the sqlc-generated queries (*.gen.go, never
// edited by hand; regenerate with `make generate`), pool setup and the embedded goose
// migration runner. Generated types stay in the packages that run the queries.
package db

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ErrNotFound is what a query that matched no row returns at this boundary (pgx.ErrNoRows is
// not exposed to callers).
var ErrNotFound = errors.New("not found")

// NotFound maps pgx.ErrNoRows to ErrNotFound and leaves other errors alone.
func NotFound(err error) error {
	if errors.Is(err, pgx.ErrNoRows) {
		return ErrNotFound
	}
	return err
}

// PoolConfig tunes a pool; zero values mean the defaults below. DATABASE_URL's own pool_*
// settings (pool_max_conns, pool_min_idle_conns, pool_max_conn_lifetime_jitter, ...) win over
// these: an operator sizing a fleet's connections sets them there.
type PoolConfig struct {
	MaxConns int32
	// MinIdle connections are kept open beyond those in use, opened in the background: a
	// replica's next burst finds one ready instead of connecting first (TCP, TLS and start-up:
	// several round trips at multi-region distance, and a fresh backend).
	MinIdle int32
	// AppName shows in pg_stat_activity, so an operator can tell replicas apart.
	AppName string
	// Prepare is prepared on every new connection before the pool hands it out, in one round
	// trip (prepareAll): a replica's first use of each on a connection costs no extra one.
	Prepare []string
	// Named is prepared on every new connection too, by name (NamedStatement, Prepared), in
	// one more round trip: statements the store runs below pgx.
	Named []string
}

// idlePing is how long a pooled connection may sit idle before it is pinged on acquire.
const idlePing = 30 * time.Second

// CancelWait is how long a pooled connection waits for Postgres to answer a cancelled
// statement before it is dropped: the cancel request's connection and the answer, a few round
// trips at multi-region distance.
const CancelWait = time.Second

// DefaultMaxConns leaves room for several replicas on a default max_connections=100 server.
const DefaultMaxConns = 16

// ReplicaMinIdle is a replica's spare connections (PoolConfig.MinIdle): two, so a burst that
// needs one or two more than its steady use finds them open; more would hold backends on an
// idle fleet for little.
const ReplicaMinIdle = 2

// NewPool opens a pool. It does not fail when Postgres is down: the broker must start and
// report degraded health, then recover on its own when the database comes back.
func NewPool(ctx context.Context, url string, cfg PoolConfig) (*pgxpool.Pool, error) {
	pc, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, parseError(url, err)
	}
	set, err := poolSettings(url)
	if err != nil {
		return nil, parseError(url, err)
	}
	if !set["pool_max_conns"] {
		pc.MaxConns = DefaultMaxConns
		if cfg.MaxConns > 0 {
			pc.MaxConns = cfg.MaxConns
		}
	}
	// The spares are also the floor (MinConns): above it pgxpool closes a connection idle for
	// 30 minutes, so an idle replica's spares would be closed and reopened every half hour.
	if !set["pool_min_idle_conns"] {
		pc.MinIdleConns = min(cfg.MinIdle, pc.MaxConns)
	}
	if !set["pool_min_conns"] {
		pc.MinConns = min(cfg.MinIdle, pc.MaxConns)
	}
	// Connections opened together (a replica's start, a burst) would all reach their
	// lifetime (an hour) together and be replaced together, each replacement a cold backend
	// that connects, compiles the broker's functions and plans their statements on the
	// request path: a latency spike every hour. Spread over the half hour after.
	if !set["pool_max_conn_lifetime_jitter"] && pc.MaxConnLifetime > 0 {
		pc.MaxConnLifetimeJitter = pc.MaxConnLifetime / 2
	}
	if cfg.AppName != "" {
		pc.ConnConfig.RuntimeParams["application_name"] = cfg.AppName
	}
	// Every statement here is short: JIT compiling one (which Postgres does when a plan's
	// estimated cost is high, estimates being guesses) takes longer than running it.
	pc.ConnConfig.RuntimeParams["jit"] = "off"
	// Short connect timeout: a request waiting on a dead database should fail fast, not hang.
	if pc.ConnConfig.ConnectTimeout == 0 || pc.ConnConfig.ConnectTimeout > 5*time.Second {
		pc.ConnConfig.ConnectTimeout = 5 * time.Second
	}
	pc.HealthCheckPeriod = 5 * time.Second
	// A statement past its context's deadline is cancelled in Postgres (a cancel request), and
	// the connection dropped only if that brings no answer within CancelWait. pgx's default
	// drops the connection at once: the statement runs on in a backend nobody reads (waiting on
	// a lock, holding a connection slot, committing perhaps), and the caller can't know whether
	// it committed, where a cancelled statement is known to have rolled back.
	pc.ConnConfig.BuildContextWatcherHandler = func(c *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.CancelRequestContextWatcherHandler{Conn: c, DeadlineDelay: CancelWait}
	}
	// pgxpool pings a connection idle for more than a second before handing it out: a round
	// trip in front of the operation, which a replica far from the primary pays in full. The
	// health check above finds dead connections in the background; only one idle for long
	// (a NAT or proxy may have dropped it silently) is pinged first.
	// A connection the server ended while it sat idle (pg_terminate_backend, a restart, a
	// crashed server process; not a vanished host, which sends nothing) has its FATAL or its
	// close waiting on the socket: a statement sent on it would
	// fail (a send refused, a hello or /health answered as if the database were down) while the
	// database is up. One non-blocking peek finds it, no round trip; the ping then fails and
	// pgxpool takes the next connection.
	pc.ShouldPing = func(_ context.Context, p pgxpool.ShouldPingParams) bool {
		return p.IdleDuration > idlePing || inputWaiting(p.Conn.PgConn().Conn())
	}
	if len(cfg.Prepare) > 0 || len(cfg.Named) > 0 {
		stmts, named := cfg.Prepare, cfg.Named
		pc.AfterConnect = func(ctx context.Context, conn *pgx.Conn) error {
			if err := prepareAll(ctx, conn, stmts); err != nil {
				return err
			}
			return prepareNamedOnConnect(ctx, conn, named)
		}
	}
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("open pool: %w", err)
	}
	return pool, nil
}

// poolSettings says which of pgxpool's pool_* settings the connection string sets. pgxpool
// reads them from the settings pgconn parses (URL, key=value string, service file, with their
// quoting) and keeps no record of which it found, so they are read the same way here.
func poolSettings(connString string) (map[string]bool, error) {
	cc, err := pgconn.ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	set := map[string]bool{}
	for k := range cc.RuntimeParams {
		if strings.HasPrefix(k, "pool_") {
			set[k] = true
		}
	}
	return set, nil
}

// WithoutPoolSettings is cc without pgxpool's pool_* settings, for a connection opened
// outside a pool: Postgres would refuse them as unknown parameters.
func WithoutPoolSettings(cc *pgx.ConnConfig) *pgx.ConnConfig {
	cc = cc.Copy()
	for k := range cc.RuntimeParams {
		if strings.HasPrefix(k, "pool_") {
			delete(cc.RuntimeParams, k)
		}
	}
	return cc
}

// HelloWaitingSQL is the generated HelloWaiting statement, for a caller that sends it in the
// flight of another statement, after that one's commit (store.Hellos).
const HelloWaitingSQL = helloWaiting
