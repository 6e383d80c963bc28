//go:build unix

package embedded

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

const (
	// defaultStartTimeout bounds Start when ctx has no deadline. Crash recovery after an
	// unclean stop replays WAL before the server accepts connections, so it is generous.
	defaultStartTimeout = 2 * time.Minute
	// fastShutdownTimeout is how long Stop waits after SIGINT before escalating.
	fastShutdownTimeout = 30 * time.Second
	// immediateShutdownTimeout is how long Stop waits after SIGQUIT before SIGKILL.
	immediateShutdownTimeout = 10 * time.Second
	// killTimeout is how long we wait for SIGKILLed processes to disappear.
	killTimeout = 10 * time.Second
	// maxPortAttempts bounds retries when an auto-picked port is taken between picking it and
	// the postmaster binding it.
	maxPortAttempts = 5
	// maxLogSize rotates postgres.log to postgres.log.1 at start once it grows past this.
	maxLogSize = 16 << 20
	// logFileName is the postmaster's stdout/stderr, inside the data directory.
	logFileName = "postgres.log"
)

// Cluster is a running private PostgreSQL cluster. Create it with Start; end it with Stop.
//
// A Cluster either owns its postmaster (it started it, holds the data directory's lock and
// stops it in Stop) or is attached to one another process owns (proc and lock are nil; Stop
// leaves the postmaster alone). An owned postmaster that exits before Stop is reported through
// Died and Err.
type Cluster struct {
	log      *slog.Logger
	binDir   string
	dataDir  string // absolute, symlinks resolved: compared with /proc/<pid>/cwd
	port     int
	database string
	acct     *account // the unprivileged user postgres runs as; nil when we are not root
	logPath  string
	logFile  *os.File
	proc     *postmaster

	// ownMu guards serving, lock and stopping, so that the postmaster's exit, the end of a
	// successful start and the beginning of Stop cannot miss each other.
	ownMu sync.Mutex
	// serving is our postmaster once Start succeeded; lock is the data directory's flock, held
	// while serving runs. Both are nil when attached.
	serving *postmaster
	lock    *dirLock
	// stopping is set once Stop has begun: from then on the postmaster's exit is expected.
	stopping bool

	// died is closed, after diedErr is set, when our postmaster exits without Stop.
	died    chan struct{}
	diedErr *UnexpectedExitError

	// ownerPID and attachedPID name the owning process and its postmaster when attached.
	ownerPID    int
	attachedPID int

	stopOnce sync.Once
	stopErr  error
}

// postmaster is one started postgres process.
type postmaster struct {
	cmd    *exec.Cmd
	pid    int
	exited chan struct{} // closed once the process has been reaped
	err    error         // cmd.Wait's result; read only after exited is closed
	reaped bool          // guarded by Cluster.ownMu
	// logOffset is where this start's output begins in the log file.
	logOffset int64
}

// Start initializes cfg.DataDir if it holds no cluster yet, starts a postmaster on 127.0.0.1,
// waits until it accepts connections and creates cfg.Database if missing. The postmaster runs
// in its own process group and is not tied to ctx: ctx bounds only the start itself. The caller
// must call Stop.
//
// If another live process already runs the cluster in cfg.DataDir, Start never touches it: with
// cfg.Attach it returns a Cluster attached to it (waiting, within ctx or two minutes, until it
// accepts connections), otherwise an *InUseError. See the package doc for how ownership is
// decided.
//
// When the process runs as root, Start chowns DataDir (recursively) to the unprivileged user it
// runs postgres as, and adds the world search bit (o+x, not read) to any parent directory that
// user could not traverse, logging each change.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("embedded postgres: Config.DataDir is required")
	}
	if cfg.Port < 0 || cfg.Port > 65535 {
		return nil, fmt.Errorf("embedded postgres: invalid port %d", cfg.Port)
	}
	database := cfg.Database
	if database == "" {
		database = DefaultDatabase
	}
	// 63 bytes is PostgreSQL's identifier limit (NAMEDATALEN-1); longer names are truncated
	// silently, which would make URL point at a database that does not exist.
	if len(database) > 63 || strings.ContainsRune(database, 0) {
		return nil, fmt.Errorf("embedded postgres: invalid database name %q", database)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = discardLogger()
	}

	acct, err := unprivilegedAccount()
	if err != nil {
		return nil, err
	}
	dataDir, err := makeDataDir(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	binDir, err := binDirFor(dataDir)
	if err != nil {
		return nil, err
	}
	c := &Cluster{
		log:      logger.With("data_dir", dataDir),
		binDir:   binDir,
		dataDir:  dataDir,
		database: database,
		acct:     acct,
		logPath:  filepath.Join(dataDir, logFileName),
		died:     make(chan struct{}),
	}
	lock, err := openDirLock(dataDir)
	if err != nil {
		return nil, err
	}
	waitCtx := ctx
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		waitCtx, cancel = context.WithTimeout(ctx, defaultStartTimeout)
		defer cancel()
	}
	delay := 10 * time.Millisecond
	waiting := false
	for {
		owned, err := lock.tryLock()
		if err != nil {
			lock.close()
			return nil, err
		}
		var ownerPID int
		if owned {
			err := c.startOwned(ctx, cfg.Port)
			var inUse *InUseError
			if !errors.As(err, &inUse) {
				if err != nil {
					lock.close()
					return nil, err
				}
				c.takeOwnership(lock)
				return c, nil
			}
			// A live process runs a postmaster here without taking the lock.
			lock.unlock()
			ownerPID = inUse.OwnerPID
		} else {
			ownerPID = readOwnerFile(dataDir)
		}

		pf, _ := readPIDFile(filepath.Join(dataDir, pidFileName))
		if !cfg.Attach {
			lock.close()
			e := &InUseError{DataDir: dataDir, OwnerPID: ownerPID}
			if pf.ready() && alive(pf.pid) {
				e.URL = connURL(pf.port, database)
			}
			return nil, e
		}
		attachErr := c.attach(waitCtx, ownerPID, pf)
		if attachErr == nil {
			lock.close()
			return c, nil
		}
		if !waiting {
			c.log.Info("embedded postgres is run by another process; waiting until it accepts connections",
				"owner_pid", ownerPID, "reason", attachErr)
			waiting = true
		}
		if !sleepCtx(waitCtx, delay) {
			lock.close()
			return nil, fmt.Errorf("embedded postgres in %s is run by %s but does not accept connections: %w (last error: %v)",
				dataDir, ownerName(ownerPID), waitCtx.Err(), attachErr)
		}
		delay = min(2*delay, 250*time.Millisecond)
	}
}

// startOwned initializes or prepares the data directory and starts our postmaster; the caller
// holds the data directory's lock. An *InUseError means a live process runs a postmaster there
// without the lock; nothing was changed then.
func (c *Cluster) startOwned(ctx context.Context, port int) error {
	if c.acct != nil {
		if err := makeReachable(c.dataDir, c.acct, c.log); err != nil {
			return fmt.Errorf("prepare data dir: %w", err)
		}
	}
	var initdbOutput []byte
	if _, err := os.Stat(filepath.Join(c.dataDir, "PG_VERSION")); errors.Is(err, fs.ErrNotExist) {
		if initdbOutput, err = c.initdb(ctx); err != nil {
			return err
		}
	} else if err != nil {
		return fmt.Errorf("prepare data dir: %w", err)
	} else {
		if err := c.prepareExisting(ctx); err != nil {
			return err
		}
	}

	if err := c.writeOwnerFile(); err != nil {
		return err
	}
	if err := c.openLog(initdbOutput); err != nil {
		c.removeOwnerFile()
		return err
	}
	if err := c.startPostmaster(ctx, port); err != nil {
		c.closeLog()
		c.removeOwnerFile()
		return err
	}
	return nil
}

// takeOwnership hands the data directory's lock to the started cluster. It is released as soon
// as the postmaster has been reaped, by Stop or because it died, and before its exited channel
// closes: whoever sees our postmaster gone (Stop's caller, a Start in this process) finds the
// directory free.
func (c *Cluster) takeOwnership(lock *dirLock) {
	c.ownMu.Lock()
	defer c.ownMu.Unlock()
	c.lock = lock
	if c.proc.reaped {
		// It died between accepting connections and now: report it like any later death.
		c.releaseLocked()
		c.diedLocked(c.proc)
		return
	}
	c.serving = c.proc
}

// postmasterExited runs once p has been reaped, before p.exited closes.
func (c *Cluster) postmasterExited(p *postmaster) {
	c.ownMu.Lock()
	defer c.ownMu.Unlock()
	p.reaped = true
	if c.serving == p {
		c.releaseLocked()
		if !c.stopping {
			c.diedLocked(p)
		}
	}
}

// diedLocked reports that our serving postmaster p exited without Stop: nothing else would
// notice, and whoever uses the database would fail on every query from now on.
func (c *Cluster) diedLocked(p *postmaster) {
	e := &UnexpectedExitError{
		DataDir: c.dataDir,
		PID:     p.pid,
		How:     describeExit(p.err),
		LogFile: c.logPath,
		LogTail: c.logLines(p.logOffset, 5),
	}
	c.log.Error("embedded postgres exited unexpectedly", "pid", e.PID, "exit", e.How, "log_file", e.LogFile)
	c.diedErr = e
	close(c.died)
}

// describeExit says how a process ended, from cmd.Wait's result.
func describeExit(err error) string {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		if err != nil {
			return err.Error()
		}
		return "exit status 0"
	}
	if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return fmt.Sprintf("killed by signal %d (%v)", int(ws.Signal()), ws.Signal())
	}
	return fmt.Sprintf("exit status %d", ee.ExitCode())
}

// Died returns a channel that is closed when the postmaster this Cluster started exits while
// Stop has not been called: it was killed, crashed or was shut down by someone else. Err then
// says how. For an attached cluster the channel never closes (its owner watches it).
func (c *Cluster) Died() <-chan struct{} {
	if c.proc == nil {
		return nil
	}
	return c.died
}

// Err returns an *UnexpectedExitError once Died is closed, and nil before.
func (c *Cluster) Err() error {
	select {
	case <-c.Died():
		return c.diedErr
	default:
		return nil
	}
}

// releaseLocked removes owner.pid and then releases the lock. The file goes first: once the lock
// is free, the next owner writes its own.
func (c *Cluster) releaseLocked() {
	if c.lock == nil {
		return
	}
	c.removeOwnerFile()
	c.lock.close()
	c.lock, c.serving = nil, nil
}

// URL returns the connection string of the cluster's database, as
// postgres://postgres@127.0.0.1:PORT/DATABASE?sslmode=disable.
func (c *Cluster) URL() string { return c.urlFor(c.database) }

func (c *Cluster) urlFor(database string) string { return connURL(c.port, database) }

func connURL(port int, database string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User(superuser),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		Path:     "/" + database,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// Stop shuts the cluster down. An attached cluster is left running for its owner; Stop only
// forgets it. An owned cluster gets a fast shutdown (SIGINT: sessions aborted, shutdown checkpoint
// written), escalating to an immediate shutdown (SIGQUIT) and then SIGKILL of the postmaster and
// its children if it does not exit within its timeout or ctx ends first. It returns once the
// postmaster has exited, so no process of this cluster remains. It is safe to call more than
// once and concurrently; later calls wait for the first and return its result. The error is
// non-nil only if the postmaster could not be ended, or had already died on its own.
func (c *Cluster) Stop(ctx context.Context) error {
	if c == nil {
		return nil
	}
	c.stopOnce.Do(func() { c.stopErr = c.stop(ctx) })
	return c.stopErr
}

func (c *Cluster) stop(ctx context.Context) error {
	if c.proc == nil {
		c.log.Info("leaving embedded postgres running for the process that owns it",
			"owner_pid", c.ownerPID, "pid", c.attachedPID)
		return nil
	}
	defer c.closeLog()
	c.ownMu.Lock()
	c.stopping = true
	died := c.diedErr != nil
	c.ownMu.Unlock()
	p := c.proc
	if died {
		// Its death is reported just before exited closes: a Stop right after Died must not
		// take it for a running postmaster and report a clean stop.
		<-p.exited
	}
	select {
	case <-p.exited:
		if p.err != nil {
			return fmt.Errorf("stop postgres: it had already exited: %w; %s", p.err, c.logTail(0))
		}
		c.log.Warn("embedded postgres had already exited before Stop", "pid", p.pid)
		return nil
	default:
	}
	began := time.Now()
	if err := c.endOwn(ctx, p); err != nil {
		// Still running, so the lock stays held: nobody may start a second postmaster here.
		return err
	}
	c.log.Info("embedded postgres stopped", "pid", p.pid, "elapsed", time.Since(began).Round(time.Millisecond))
	return nil
}

// initdb creates a new cluster in the (empty) data directory.
func (c *Cluster) initdb(ctx context.Context) ([]byte, error) {
	entries, err := os.ReadDir(c.dataDir)
	if err != nil {
		return nil, fmt.Errorf("initdb: %w", err)
	}
	if len(entries) > 0 {
		return nil, fmt.Errorf("initdb: data dir %s is not empty but holds no cluster (no PG_VERSION); "+
			"remove it or choose another DataDir", c.dataDir)
	}
	if c.acct != nil {
		if err := chownTree(c.dataDir, c.acct); err != nil {
			return nil, fmt.Errorf("initdb: %w", err)
		}
	}
	c.log.Info("initializing embedded postgres data directory", "bin_dir", c.binDir, "run_as", c.runAsName())
	began := time.Now()
	cmd := exec.CommandContext(ctx, filepath.Join(c.binDir, "initdb"),
		"-D", c.dataDir,
		"-A", "trust", // loopback-only throwaway cluster; see the package doc
		"-U", superuser,
		"-E", "UTF8",
		"--no-locale", // C locale: identical sorting everywhere, no dependency on installed locales
	)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	c.prepareCmd(cmd)
	// initdb runs postgres in bootstrap mode as a child: on cancel kill the whole process group
	// (Setpgid made initdb its leader) so nothing keeps writing while we clean up.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = killTimeout
	if err := cmd.Run(); err != nil {
		// initdb cleans up after its own failures but not after being killed; a half-built
		// directory with PG_VERSION would later be "reused" and never start, so empty it. It was
		// empty before, so nothing of the caller's is lost.
		if rmErr := removeContents(c.dataDir); rmErr != nil {
			c.log.Warn("could not clean up after failed initdb", "err", rmErr)
		}
		if ctxErr := ctx.Err(); ctxErr != nil {
			err = ctxErr
		}
		return nil, fmt.Errorf("initdb: %w: %s", err, lastLines(out.String(), 15))
	}
	c.log.Info("embedded postgres data directory initialized", "elapsed", time.Since(began).Round(time.Millisecond))
	return out.Bytes(), nil
}

// prepareExisting makes an existing cluster startable: no postmaster from an earlier run left
// holding the directory, and ownership and mode as postgres demands them.
func (c *Cluster) prepareExisting(ctx context.Context) error {
	// First, so nothing is changed in a directory a live process turns out to be using.
	if err := c.clearLeftover(ctx); err != nil {
		return err
	}
	if c.acct != nil {
		// A directory first used by another account (or restored by root) must belong to the
		// user postgres runs as, or the server refuses to start.
		if err := chownTree(c.dataDir, c.acct); err != nil {
			return fmt.Errorf("prepare data dir: %w", err)
		}
	}
	fi, err := os.Stat(c.dataDir)
	if err != nil {
		return fmt.Errorf("prepare data dir: %w", err)
	}
	// postgres accepts only 0700 or 0750 on its data directory.
	if perm := fi.Mode().Perm(); perm&0o027 != 0 {
		if err := os.Chmod(c.dataDir, perm&^0o027); err != nil {
			return fmt.Errorf("prepare data dir: %w", err)
		}
	}
	return nil
}

// openLog opens (and if large, rotates) the postmaster's log file, which lives inside the data
// directory and so can only be created after initdb, which demands an empty directory.
func (c *Cluster) openLog(initdbOutput []byte) error {
	if fi, err := os.Stat(c.logPath); err == nil && fi.Size() > maxLogSize {
		if err := os.Rename(c.logPath, c.logPath+".1"); err != nil {
			return fmt.Errorf("rotate log: %w", err)
		}
	}
	f, err := os.OpenFile(c.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open log: %w", err)
	}
	if c.acct != nil {
		// Keep the whole data directory owned by one user; postgres itself writes to the log
		// only through the descriptor we hand it.
		if err := f.Chown(int(c.acct.uid), int(c.acct.gid)); err != nil {
			_ = f.Close()
			return fmt.Errorf("open log: %w", err)
		}
	}
	if len(initdbOutput) > 0 {
		_, _ = fmt.Fprintf(f, "---- initdb %s ----\n%s", time.Now().Format(time.RFC3339), initdbOutput)
	}
	c.logFile = f
	return nil
}

func (c *Cluster) closeLog() {
	if c.logFile != nil {
		_ = c.logFile.Close()
		c.logFile = nil
	}
}

// startPostmaster launches postgres and waits until it accepts connections, retrying when an
// auto-picked port was taken in the meantime or when orphaned backends of a crashed earlier
// postmaster are still on their way out.
func (c *Cluster) startPostmaster(ctx context.Context, fixedPort int) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultStartTimeout)
		defer cancel()
	}
	began := time.Now()
	backoff := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		port := fixedPort
		if port == 0 {
			p, err := freePort()
			if err != nil {
				return fmt.Errorf("start postgres: pick port: %w", err)
			}
			port = p
		}
		c.port = port
		offset := c.logSize()
		_, _ = fmt.Fprintf(c.logFile, "---- embedded: starting postgres on 127.0.0.1:%d at %s ----\n",
			port, time.Now().Format(time.RFC3339))
		p, err := c.launch(port, offset)
		if err != nil {
			return err
		}
		c.proc = p
		conn, err := c.waitReady(ctx, p)
		if err == nil {
			err = c.ensureDatabase(ctx, conn)
			closeCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = conn.Close(closeCtx)
			cancel()
			if err != nil {
				_ = c.endOwn(context.Background(), p)
				return err
			}
			c.log.Info("embedded postgres started", "pid", p.pid, "port", port, "database", c.database,
				"run_as", c.runAsName(), "log_file", c.logPath, "elapsed", time.Since(began).Round(time.Millisecond))
			return nil
		}

		select {
		case <-p.exited:
		default:
			// Still running but not ready in time (or ctx ended): do not leave it behind.
			_ = c.endOwn(context.Background(), p)
			return fmt.Errorf("start postgres: %w; %s", err, c.logTail(offset))
		}
		tail := c.logTail(offset)
		switch {
		case fixedPort == 0 && attempt < maxPortAttempts && isBindFailure(tail):
			c.log.Info("embedded postgres port taken before it could bind; retrying on another", "port", port)
			continue
		case strings.Contains(tail, "pre-existing shared memory block"):
			// Backends of a killed postmaster still hold its shared memory; they exit on their
			// own once they notice their postmaster is gone.
			c.log.Info("orphaned backends of an earlier postgres still running; waiting for them to exit")
			if !sleepCtx(ctx, backoff) {
				return fmt.Errorf("start postgres: %w; %s", ctx.Err(), tail)
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		return fmt.Errorf("start postgres: %w; %s", err, tail)
	}
}

// launch starts the postmaster as a child in its own process group; its output goes to the log
// from logOffset on.
func (c *Cluster) launch(port int, logOffset int64) (*postmaster, error) {
	cmd := exec.Command(filepath.Join(c.binDir, "postgres"),
		"-D", c.dataDir,
		"-p", strconv.Itoa(port),
		// Settings go on the command line rather than into postgresql.conf so the port (and
		// anything else) can change from one start to the next.
		"-c", "listen_addresses=127.0.0.1",
		// No Unix socket: the default directory (/var/run/postgresql) is often missing or not
		// writable by the user we run as, and TCP on loopback is all we use.
		"-c", "unix_socket_directories=",
		// Test suites and several replicas connect at once.
		"-c", "max_connections=200",
		// Everything goes to stderr, which is our log file, whatever the conf file says.
		"-c", "logging_collector=off",
		"-c", "log_destination=stderr",
	)
	cmd.Stdout, cmd.Stderr = c.logFile, c.logFile
	c.prepareCmd(cmd)
	setParentDeathSignal(cmd.SysProcAttr)

	p := &postmaster{cmd: cmd, exited: make(chan struct{}), logOffset: logOffset}
	started := make(chan error, 1)
	go func() {
		// The parent-death signal (Linux) fires when the thread that forked the child exits,
		// not the process; keep this goroutine on its thread until the postmaster is reaped so
		// the runtime cannot retire that thread under a running postgres.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		c.postmasterExited(p)
		close(p.exited)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	p.pid = cmd.Process.Pid
	return p, nil
}

// prepareCmd sets what initdb and postgres have in common.
func (c *Cluster) prepareCmd(cmd *exec.Cmd) {
	// Both resolve their own path via getcwd(); the caller's working directory may not be
	// readable by the user they run as (e.g. /root), so run them from the data directory.
	cmd.Dir = c.dataDir
	cmd.Env = childEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group: a Ctrl-C in the terminal reaches only us, and we stop postgres in
		// order (after the broker has drained) instead of it dying under live sessions.
		Setpgid: true,
	}
	if c.acct != nil {
		// No supplementary groups: dropping root's groups is part of dropping root.
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: c.acct.uid, Gid: c.acct.gid, Groups: []uint32{}}
	}
}

// childEnv is our environment without PG* variables: postgres reads some of them (PGPORT,
// PGDATA, ...) and the caller's client settings must not leak into the server.
func childEnv() []string {
	env := os.Environ()
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, "PG") {
			out = append(out, kv)
		}
	}
	return out
}

// waitReady polls until the postmaster accepts a connection to the "postgres" database,
// it exits, or ctx ends.
func (c *Cluster) waitReady(ctx context.Context, p *postmaster) (*pgx.Conn, error) {
	connString := c.urlFor("postgres")
	delay := 10 * time.Millisecond
	var lastErr error
	for {
		select {
		case <-p.exited:
			return nil, fmt.Errorf("postgres exited during startup: %v", p.err)
		default:
		}
		attemptCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		// Give up on the attempt as soon as the postmaster dies: if it failed to bind because
		// something else listens on the port, that something may accept and never answer.
		go func() {
			select {
			case <-p.exited:
				cancel()
			case <-attemptCtx.Done():
			}
		}()
		conn, err := pgx.Connect(attemptCtx, connString)
		cancel()
		if err == nil {
			return conn, nil
		}
		lastErr = err
		timer := time.NewTimer(delay)
		select {
		case <-p.exited:
			timer.Stop()
			return nil, fmt.Errorf("postgres exited during startup: %v", p.err)
		case <-ctx.Done():
			timer.Stop()
			return nil, fmt.Errorf("wait for postgres: %w (last error: %v)", ctx.Err(), lastErr)
		case <-timer.C:
		}
		delay = min(2*delay, 250*time.Millisecond)
	}
}

// ensureDatabase creates c.database if it does not exist.
func (c *Cluster) ensureDatabase(ctx context.Context, conn *pgx.Conn) error {
	var exists bool
	err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", c.database).Scan(&exists)
	if err != nil {
		return fmt.Errorf("create database %q: %w", c.database, err)
	}
	if exists {
		return nil
	}
	_, err = conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{c.database}.Sanitize())
	var pgErr *pgconn.PgError
	// 42P04 duplicate_database / 23505 unique_violation: someone created it concurrently.
	if errors.As(err, &pgErr) && (pgErr.Code == "42P04" || pgErr.Code == "23505") {
		return nil
	}
	if err != nil {
		return fmt.Errorf("create database %q: %w", c.database, err)
	}
	c.log.Info("embedded postgres database created", "database", c.database)
	return nil
}

// endOwn stops a postmaster we started and returns once it has been reaped.
func (c *Cluster) endOwn(ctx context.Context, p *postmaster) error {
	return c.endPostmaster(ctx, p.pid,
		// Process.Signal cannot hit a recycled pid: it knows when the child has been reaped.
		func(sig syscall.Signal) { _ = p.cmd.Process.Signal(sig) },
		func(ctx context.Context, d time.Duration) bool { return waitClosed(ctx, p.exited, d) })
}

// endPostmaster stops the postmaster pid and everything it started: fast shutdown, then
// immediate shutdown, then SIGKILL. gone waits up to d (or until ctx ends) for the postmaster to
// be gone. The error is non-nil only if it survived SIGKILL.
func (c *Cluster) endPostmaster(ctx context.Context, pid int, signal func(syscall.Signal), gone func(context.Context, time.Duration) bool) error {
	signal(syscall.SIGINT) // fast shutdown
	if gone(ctx, fastShutdownTimeout) {
		return nil
	}
	c.log.Warn("embedded postgres fast shutdown did not finish; sending SIGQUIT (immediate shutdown)",
		"pid", pid, "ctx_err", ctx.Err())
	// Immediate shutdown skips the checkpoint; the next start replays WAL. The postmaster
	// takes its children down with it.
	signal(syscall.SIGQUIT)
	if gone(context.Background(), immediateShutdownTimeout) {
		return nil
	}
	c.log.Warn("embedded postgres immediate shutdown did not finish; killing its processes", "pid", pid)
	// Freeze the postmaster so it forks nothing new, collect its children (each is in its own
	// session, so a process-group kill would miss them), then kill them all.
	signal(syscall.SIGSTOP)
	children := childPIDs(pid)
	signal(syscall.SIGKILL)
	for _, child := range children {
		_ = syscall.Kill(child, syscall.SIGKILL)
	}
	if !gone(context.Background(), killTimeout) {
		return fmt.Errorf("stop postgres: pid %d still running after SIGKILL", pid)
	}
	waitUntil(context.Background(), killTimeout, func() bool {
		for _, child := range children {
			if alive(child) {
				return false
			}
		}
		return true
	})
	return nil
}

// runAsName names the OS user postgres runs as, for logs.
func (c *Cluster) runAsName() string {
	if c.acct != nil {
		return c.acct.name
	}
	if u, err := user.Current(); err == nil {
		return u.Username
	}
	return strconv.Itoa(os.Geteuid())
}

func (c *Cluster) logSize() int64 {
	if fi, err := os.Stat(c.logPath); err == nil {
		return fi.Size()
	}
	return 0
}

// logTail returns the end of the postmaster log written since offset, for error messages.
func (c *Cluster) logTail(offset int64) string {
	s, err := c.readLog(offset)
	if err != nil {
		return err.Error()
	}
	return "postgres log " + c.logPath + ":\n" + lastLines(s, 15)
}

// logLines returns the last n lines of the postmaster log written since offset, or "".
func (c *Cluster) logLines(offset int64, n int) string {
	s, err := c.readLog(offset)
	if err != nil {
		return ""
	}
	return lastLines(s, n)
}

// readLog returns at most the last 4 KiB of the postmaster log written since offset.
func (c *Cluster) readLog(offset int64) (string, error) {
	f, err := os.Open(c.logPath)
	if err != nil {
		return "", fmt.Errorf("no postgres log: %w", err)
	}
	defer f.Close()
	const maxTail = 4 << 10
	if fi, err := f.Stat(); err == nil && fi.Size()-offset > maxTail {
		offset = fi.Size() - maxTail
	}
	b, err := io.ReadAll(io.NewSectionReader(f, offset, maxTail))
	if err != nil {
		return "", fmt.Errorf("read postgres log: %w", err)
	}
	return string(b), nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func isBindFailure(log string) bool {
	return strings.Contains(log, "could not create any TCP/IP sockets") ||
		strings.Contains(log, "Address already in use")
}

// freePort asks the kernel for a free loopback port. Another process may take it before the
// postmaster binds it; startPostmaster retries when that happens.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// makeDataDir creates dir if needed and returns its absolute path with symlinks resolved.
func makeDataDir(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("data dir: %w", err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return "", fmt.Errorf("data dir: %w", err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return "", fmt.Errorf("data dir: %w", err)
	}
	return real, nil
}

func removeContents(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		errs = append(errs, os.RemoveAll(filepath.Join(dir, e.Name())))
	}
	return errors.Join(errs...)
}

// waitClosed reports whether ch is closed within d, giving up early when ctx ends.
func waitClosed(ctx context.Context, ch <-chan struct{}, d time.Duration) bool {
	select {
	case <-ch:
		return true
	default:
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ch:
		return true
	case <-ctx.Done():
		return false
	case <-timer.C:
		return false
	}
}

// waitUntil polls cond until it holds, d passes or ctx ends; it reports whether cond held.
// Used for processes that are not our children, whose exit we cannot wait on.
func waitUntil(ctx context.Context, d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	delay := 5 * time.Millisecond
	for {
		if cond() {
			return true
		}
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		if !sleepCtx(ctx, min(delay, left)) {
			return cond()
		}
		delay = min(2*delay, 100*time.Millisecond)
	}
}

// sleepCtx waits for d or until ctx ends; it reports whether the full d passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-timer.C:
		return true
	}
}
