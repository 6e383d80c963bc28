// Command broker runs a claudemesh broker replica (serve), migrates its schema (migrate) and
// administers meshes, members, invites and the audit log.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/KimMachineGun/automemlimit/memlimit"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/cobra"

	"github.com/claudemesh/broker/broker"
	"github.com/claudemesh/broker/broker/gcburst"
	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/embedded"
)

// defaultGCPercent is the broker's garbage-collection target unless GOGC says otherwise. A
// replica's memory is mostly idle sessions (docs/operations.md, "Sizing"): the heap may grow
// half its live size between collections rather than all of it (Go's default), a third less
// memory per idle session. While the process allocates fast (a connect storm) the target is
// raised (broker/gcburst), so that the collector does not take the CPU the storm needs.
const defaultGCPercent = 50

func main() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(defaultGCPercent)
	}
	ctx, cancel := context.WithCancel(context.Background())
	watchSignals(cancel)
	err := newRootCmd().ExecuteContext(ctx)
	if err != nil {
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		fmt.Fprintln(os.Stderr, "broker:", err)
		os.Exit(1)
	}
}

// watchSignals cancels the command's context at the first SIGINT or SIGTERM (a serve drains)
// and ends the process at the second: whoever signals again (Ctrl-C pressed twice, a supervisor
// giving up on the drain) wants it gone now.
func watchSignals(cancel context.CancelFunc) {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sigs
		cancel()
		sig := <-sigs
		code := 1
		if n, ok := sig.(syscall.Signal); ok {
			code = 128 + int(n) // what a shell reports for a process the signal ended
		}
		currentLogger().Error("second signal: exiting now without finishing the stop", "signal", sig.String(), "exit_code", code)
		os.Exit(code)
	}()
}

// tuneGC runs the tuner of the garbage-collection target (broker/gcburst) for a long-running
// command until ctx ends, unless GOGC set the target. First it gives the runtime a soft memory
// limit, unless GOMEMLIMIT set one (or AUTOMEMLIMIT=off): 90 % of the container's memory limit,
// else of the machine's memory. In a burst the heap may grow to five times its live size; on a
// small machine (a 512 MB Fly Machine holding 2,500 sessions) that is past its memory, and the
// limit makes the collector run harder there instead of the kernel killing the replica.
func tuneGC(ctx context.Context, logger *slog.Logger) {
	if _, err := memlimit.Set(memlimit.WithProvider(memlimit.ApplyFallback(memlimit.FromCgroup, memlimit.FromSystem)),
		memlimit.WithLogger(logger)); err != nil {
		logger.Warn("no soft memory limit set: set GOMEMLIMIT", "error", err)
	}
	if os.Getenv("GOGC") == "" {
		go gcburst.New(defaultGCPercent, logger).Run(ctx)
	}
}

// processLogger is the logger loadConfig built, for what happens outside a command.
var processLogger atomic.Pointer[slog.Logger]

func currentLogger() *slog.Logger {
	if l := processLogger.Load(); l != nil {
		return l
	}
	return slog.New(slog.NewTextHandler(os.Stderr, nil))
}

// exitError ends the process with a specific code after the command printed its own output.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "broker",
		Short:         "claudemesh broker: routes end-to-end encrypted messages between Claude Code peers",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newServeCmd(), newMigrateCmd(), newVersionCmd())
	for _, add := range extraCommands {
		root.AddCommand(add())
	}
	return root
}

// extraCommands lets other files of this package register their verbs.
var extraCommands []func() *cobra.Command

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the broker version",
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), broker.Version) },
	}
}

// loadConfig reads the environment and builds the logger; every command starts here.
func loadConfig() (broker.Config, *slog.Logger, error) {
	cfg, err := broker.LoadConfig(os.Getenv)
	if err != nil {
		return cfg, nil, fmt.Errorf("configuration:\n%w", err)
	}
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
	if cfg.LogFormat == "json" {
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	logger := slog.New(h)
	processLogger.Store(logger)
	return cfg, logger, nil
}

// embeddedUse says what a command does when another process already runs the embedded Postgres
// in BROKER_DATA_DIR (see the db/embedded package doc).
type embeddedUse int

const (
	// attachEmbedded: use it and leave it running. For short-lived commands (admin verbs,
	// migrate), which must never stop a running broker's database.
	attachEmbedded embeddedUse = iota
	// ownEmbedded: refuse to start. A long-running replica (serve, dev) attached to another
	// process's Postgres would lose its database whenever that process exits; sharing one is
	// done deliberately, with DATABASE_URL.
	ownEmbedded
)

// database is what openDatabase opened.
type database struct {
	url string
	// died is closed if the embedded Postgres this process started exits on its own; nil (never
	// ready) with DATABASE_URL or an attached cluster. diedErr then says how.
	died    <-chan struct{}
	diedErr func() error
	// stop stops an embedded cluster this process started; it never stops one it attached to.
	stop func()
}

// openDatabase returns the database to use: DATABASE_URL, or the embedded Postgres in
// BROKER_DATA_DIR, started or (with attachEmbedded) attached to.
func openDatabase(ctx context.Context, cfg broker.Config, logger *slog.Logger, use embeddedUse) (database, error) {
	if cfg.DatabaseURL != "" {
		return database{url: cfg.DatabaseURL, diedErr: func() error { return nil }, stop: func() {}}, nil
	}
	logger.Info("DATABASE_URL is unset: using the embedded Postgres", "data_dir", cfg.DataDir)
	c, err := embedded.Start(ctx, embedded.Config{DataDir: cfg.DataDir, Logger: logger, Attach: use == attachEmbedded})
	var inUse *embedded.InUseError
	if errors.As(err, &inUse) {
		return database{}, inUseError(inUse)
	}
	if err != nil {
		return database{}, fmt.Errorf("embedded Postgres: %w", err)
	}
	return database{url: c.URL(), died: c.Died(), diedErr: c.Err, stop: func() {
		stopCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// After a death, Stop only repeats what was already logged.
		if err := c.Stop(stopCtx); err != nil && c.Err() == nil {
			logger.Error("stop embedded Postgres", "err", err)
		}
	}}, nil
}

// inUseError tells the user of a refused serve or dev what to do instead.
func inUseError(e *embedded.InUseError) error {
	owner := "another process"
	if e.OwnerPID > 0 {
		owner = fmt.Sprintf("process %d", e.OwnerPID)
	}
	share := "DATABASE_URL set to its URL (run this again once it is up to see the URL)"
	if e.URL != "" {
		share = fmt.Sprintf("DATABASE_URL='%s'", e.URL)
	}
	return fmt.Errorf("the embedded Postgres in %s is already run by %s (another broker serve or dev?)\n"+
		"  stop %s first, or share its database deliberately with %s and a BROKER_PORT of your own\n"+
		"  (this broker then loses its database whenever %s exits); admin verbs need neither, they use the running Postgres",
		e.DataDir, owner, owner, share, owner)
}

// withDatabase runs f with a database URL and stops an embedded cluster it started afterwards.
// If that cluster dies meanwhile, f's context ends as on SIGTERM and the command fails: a broker
// without its database only answers 503s, and a restart (by its supervisor or the user)
// recovers the data directory.
func withDatabase(cmd *cobra.Command, use embeddedUse, f func(ctx context.Context, url string, cfg broker.Config, logger *slog.Logger) error) error {
	cfg, logger, err := loadConfig()
	if err != nil {
		return err
	}
	pg, err := openDatabase(cmd.Context(), cfg, logger, use)
	if err != nil {
		return err
	}
	defer pg.stop()
	ctx, cancel := context.WithCancel(cmd.Context())
	defer cancel()
	go func() {
		select {
		case <-pg.died:
			cancel()
		case <-ctx.Done():
		}
	}()
	err = f(ctx, pg.url, cfg, logger)
	if died := pg.diedErr(); died != nil {
		// f's own error, if any, only follows from it.
		return fmt.Errorf("stopping, its database is gone; start the broker again (the next start recovers the data directory): %w", died)
	}
	return err
}

func newMigrateCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "migrate", Short: "Apply, roll back or show schema migrations"}
	run := func(f func(context.Context, *db.Migrator, *cobra.Command) error) func(*cobra.Command, []string) error {
		return func(cmd *cobra.Command, _ []string) error {
			return withDatabase(cmd, attachEmbedded, func(ctx context.Context, url string, _ broker.Config, logger *slog.Logger) error {
				m, err := db.NewMigrator(url, logger)
				if err != nil {
					return err
				}
				defer m.Close()
				return f(ctx, m, cmd)
			})
		}
	}
	cmd.AddCommand(
		&cobra.Command{Use: "up", Short: "Apply every pending migration", Args: cobra.NoArgs,
			RunE: run(func(ctx context.Context, m *db.Migrator, _ *cobra.Command) error { return m.Up(ctx) })},
		&cobra.Command{Use: "down", Short: "Roll back the newest migration", Args: cobra.NoArgs,
			RunE: run(func(ctx context.Context, m *db.Migrator, _ *cobra.Command) error { return m.Down(ctx) })},
		&cobra.Command{Use: "status", Short: "List migrations and whether each is applied", Args: cobra.NoArgs,
			RunE: run(func(ctx context.Context, m *db.Migrator, cmd *cobra.Command) error {
				st, err := m.Status(ctx)
				if err != nil {
					return err
				}
				for _, s := range st {
					state := "pending"
					if s.Applied {
						state = "applied"
					}
					fmt.Fprintf(cmd.OutOrStdout(), "%05d  %-8s %s\n", s.Version, state, s.Name)
				}
				return nil
			})},
	)
	return cmd
}

func newServeCmd() *cobra.Command {
	var noMigrate bool
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run a broker replica (HTTP, WebSocket /ws, hooks, health, metrics)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withDatabase(cmd, ownEmbedded, func(ctx context.Context, url string, cfg broker.Config, logger *slog.Logger) error {
				if !noMigrate {
					if err := migrateWithRetry(ctx, url, logger); err != nil {
						return stoppedOr(ctx, err, logger)
					}
				}
				go warnIfSchemaNewer(ctx, url, logger)
				return serve(ctx, url, cfg, logger)
			})
		},
	}
	cmd.Flags().BoolVar(&noMigrate, "no-migrate", false, "do not apply migrations at start (run \"broker migrate up\" as a release step instead)")
	return cmd
}

// migrateWithRetry applies migrations, waiting up to a minute for Postgres to be reachable:
// replicas often start before their database does.
func migrateWithRetry(ctx context.Context, url string, logger *slog.Logger) error {
	deadline := time.Now().Add(time.Minute)
	delay := 500 * time.Millisecond
	for {
		err := db.Migrate(ctx, url, nil)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		logger.Warn("migrations failed; retrying", "err", err, "retry_in", delay)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		delay = min(delay*2, 5*time.Second)
	}
}

// stoppedOr returns err, or nil when it is only the end of a stop that was asked for (SIGTERM
// while the start-up waits for Postgres): a requested stop exits 0.
func stoppedOr(ctx context.Context, err error, logger *slog.Logger) error {
	if ctx.Err() != nil {
		logger.Info("stopped before start-up finished")
		return nil
	}
	return err
}

// warnIfSchemaNewer says, without refusing to start, when the database holds migrations this
// binary does not know: an older replica of a rolling deploy after `migrate up`, expected until
// the rollout reaches it (docs/operations.md, "Upgrades and rolling restarts"), a mistake if it
// lasts. In the background: with --no-migrate and Postgres away, start-up does not wait on it.
func warnIfSchemaNewer(ctx context.Context, url string, logger *slog.Logger) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	applied, known, err := db.SchemaVersions(ctx, url)
	switch {
	case err != nil && ctx.Err() == nil:
		logger.Warn("could not compare the database schema with this binary's migrations", "err", err)
	case err == nil && applied > known:
		logger.Warn("the database schema is newer than this binary: fine while a rolling deploy replaces it, otherwise deploy the release that migrated it",
			"schema_version", applied, "binary_schema_version", known)
	}
}

// namedSQL is what a replica's pool prepares by name: only what PUSH_BEFORE_FLUSH runs.
func namedSQL(cfg broker.Config) []string {
	if cfg.PushBeforeFlush {
		return store.NamedSQL()
	}
	return nil
}

func serve(ctx context.Context, url string, cfg broker.Config, logger *slog.Logger) error {
	tuneGC(ctx, logger)
	pool, err := db.NewPool(ctx, url, db.PoolConfig{MinIdle: db.ReplicaMinIdle, AppName: "claudemesh-broker", Prepare: store.RequestPathSQL(),
		Named: namedSQL(cfg)})
	if err != nil {
		return err
	}
	srv, err := broker.NewServer(cfg, pool, logger)
	if err != nil {
		pool.Close()
		return err
	}
	if err := srv.Start(ctx, net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.Port))); err != nil {
		pool.Close()
		return err
	}
	var fatal error
	select {
	case <-ctx.Done():
	case fatal = <-srv.Fatal():
		// Not asked to stop, but it must (another process took its node id): drain as on
		// SIGTERM, then fail so that the operator (or the supervisor's restarts) sees why.
		logger.Error("stopping", "err", fatal)
	}
	logger.Info("shutting down", "deadline", cfg.DrainTimeout, "at_most", cfg.DrainTimeout+broker.StopMargin)
	err = stopWithin(cfg.DrainTimeout, logger, []*broker.Server{srv}, []*pgxpool.Pool{pool})
	if fatal != nil {
		return errors.Join(fatal, err)
	}
	return err
}

// stopWithin stops the servers (at once, each draining its own sessions) and then closes the
// pools, and returns by drain + broker.StopMargin whatever is still stopping: the promise to
// platforms that SIGKILL after a grace period (docs/operations.md). With Postgres not
// answering, closing a pool waits on each connection's close (pgxpool: up to 15 s each), and a
// service can be stuck in a statement; both are left behind, and said so, rather than waited for.
func stopWithin(drain time.Duration, logger *slog.Logger, servers []*broker.Server, pools []*pgxpool.Pool) error {
	deadline := time.Now().Add(drain)
	hard := time.NewTimer(time.Until(deadline.Add(broker.StopMargin)))
	defer hard.Stop()
	stopCtx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()

	errs := make(chan error, len(servers))
	for _, s := range servers {
		go func() { errs <- s.Stop(stopCtx) }()
	}
	var stopErrs []error
	for range servers {
		select {
		case err := <-errs:
			stopErrs = append(stopErrs, err)
		case <-hard.C:
			logger.Error("stop cut at the deadline: the broker had not finished stopping (Postgres not answering?); exiting anyway",
				"after", drain+broker.StopMargin)
			return exitError{code: 1}
		}
	}
	closed := make(chan struct{})
	go func() {
		for _, p := range pools {
			p.Close()
		}
		close(closed)
	}()
	select {
	case <-closed:
	case <-hard.C:
		logger.Error("stop cut at the deadline: database connections were still closing (Postgres not answering?); exiting anyway",
			"after", drain+broker.StopMargin)
		return exitError{code: 1}
	}
	return errors.Join(stopErrs...)
}
