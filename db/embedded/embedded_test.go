//go:build unix

package embedded

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testTimeout bounds every start, query and stop in these tests.
const testTimeout = 2 * time.Minute

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// needBinaries skips t when this machine has no PostgreSQL server binaries and the suite is
// pointed at a server (TEST_DATABASE_URL or DATABASE_URL), for which `make test` installs
// none. Otherwise missing binaries fail the test.
func needBinaries(t *testing.T) {
	t.Helper()
	_, err := FindBinDir()
	if errors.Is(err, ErrNoBinaries) && (os.Getenv("TEST_DATABASE_URL") != "" || os.Getenv("DATABASE_URL") != "") {
		t.Skipf("needs the PostgreSQL server binaries: %v", err)
	}
}

// startCluster starts a cluster in dir and stops it at the end of the test (a no-op if the test
// already did).
func startCluster(t *testing.T, cfg Config) *Cluster {
	t.Helper()
	needBinaries(t)
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	c, err := Start(testContext(t), cfg)
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		_ = c.Stop(ctx)
	})
	return c
}

func connect(t *testing.T, connString string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(testContext(t), connString)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

// requireGone asserts that pid no longer exists at all (not even as a zombie): our own
// postmaster has been reaped by Stop, and its children by the postmaster before it exited.
func requireGone(t *testing.T, pid int) {
	t.Helper()
	err := syscall.Kill(pid, 0)
	require.ErrorIs(t, err, syscall.ESRCH, "process %d still exists", pid)
}

func TestFindBinDir(t *testing.T) {
	needBinaries(t)
	dir, err := FindBinDir()
	require.NoError(t, err)
	require.True(t, filepath.IsAbs(dir), dir)
	for _, name := range []string{"initdb", "postgres"} {
		require.True(t, isExecutable(filepath.Join(dir, name)), "%s in %s", name, dir)
	}
}

func TestFindBinDirNone(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	old := debianBinGlob
	debianBinGlob = filepath.Join(t.TempDir(), "*", "bin")
	t.Cleanup(func() { debianBinGlob = old })

	_, err := FindBinDir()
	require.ErrorIs(t, err, ErrNoBinaries)
	require.ErrorContains(t, err, "sudo apt-get install postgresql")
	require.ErrorContains(t, err, "make ensure-postgres")
}

func TestNewestDebianBinDir(t *testing.T) {
	root := t.TempDir()
	for _, v := range []string{"9.6", "15", "13", "16"} {
		bin := filepath.Join(root, v, "bin")
		require.NoError(t, os.MkdirAll(bin, 0o755))
		if v == "16" {
			continue // incomplete install: no server binaries, must be skipped
		}
		for _, name := range []string{"initdb", "postgres"} {
			require.NoError(t, os.WriteFile(filepath.Join(bin, name), []byte("#!/bin/sh\n"), 0o755))
		}
	}
	old := debianBinGlob
	debianBinGlob = filepath.Join(root, "*", "bin")
	t.Cleanup(func() { debianBinGlob = old })

	require.Equal(t, filepath.Join(root, "15", "bin"), newestDebianBinDir())
}

// fakeBinDir makes dir/initdb and dir/postgres, a postgres that reports version.
func fakeBinDir(t *testing.T, dir, version string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "initdb"), []byte("#!/bin/sh\nexit 1\n"), 0o755))
	script := fmt.Sprintf("#!/bin/sh\necho 'postgres (PostgreSQL) %s (Debian %s-1)'\n", version, version)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "postgres"), []byte(script), 0o755))
}

// A data directory runs only with binaries of the version that created it: after an upgrade
// the older ones, still installed, are used; when they are missing the error says what to do.
func TestBinDirForDataDirVersion(t *testing.T) {
	root := t.TempDir()
	fakeBinDir(t, filepath.Join(root, "9.6", "bin"), "9.6.24")
	fakeBinDir(t, filepath.Join(root, "13", "bin"), "13.16")
	fakeBinDir(t, filepath.Join(root, "16", "bin"), "16.4")
	onPath := filepath.Join(t.TempDir(), "bin")
	fakeBinDir(t, onPath, "17.2") // e.g. a newer build in /usr/local
	t.Setenv("PATH", onPath)
	old := debianBinGlob
	debianBinGlob = filepath.Join(root, "*", "bin")
	t.Cleanup(func() { debianBinGlob = old })

	dataDir := t.TempDir()
	dir, err := binDirFor(dataDir)
	require.NoError(t, err)
	require.Equal(t, onPath, dir, "a new cluster gets FindBinDir's choice")

	for version, want := range map[string]string{
		"17":  onPath,
		"16":  filepath.Join(root, "16", "bin"),
		"13":  filepath.Join(root, "13", "bin"),
		"9.6": filepath.Join(root, "9.6", "bin"),
	} {
		require.NoError(t, os.WriteFile(filepath.Join(dataDir, "PG_VERSION"), []byte(version+"\n"), 0o600))
		dir, err := binDirFor(dataDir)
		require.NoError(t, err, version)
		require.Equal(t, want, dir, version)
	}

	require.NoError(t, os.WriteFile(filepath.Join(dataDir, "PG_VERSION"), []byte("14\n"), 0o600))
	_, err = binDirFor(dataDir)
	require.ErrorContains(t, err, fmt.Sprintf("data directory %s was created by PostgreSQL 14, but the server binaries installed are PostgreSQL 17 (%s)", dataDir, onPath))
	require.ErrorContains(t, err, "\n  install PostgreSQL 14's server binaries (Debian/Ubuntu: `sudo apt-get install postgresql-14`), or\n")
	require.ErrorContains(t, err, fmt.Sprintf("\n  move %s away to start with a fresh, empty one (it holds the broker's data", dataDir))

	// No binaries at all: still ErrNoBinaries, saying which version is needed.
	t.Setenv("PATH", t.TempDir())
	debianBinGlob = filepath.Join(t.TempDir(), "*", "bin")
	_, err = binDirFor(dataDir)
	require.ErrorIs(t, err, ErrNoBinaries)
	require.ErrorContains(t, err, "needs PostgreSQL 14")
}

// Start on a data directory of a PostgreSQL version whose binaries are not installed fails
// with what to do, and leaves the directory as it was.
func TestStartOnDataDirOfMissingVersion(t *testing.T) {
	needBinaries(t)
	t.Parallel()
	dir := t.TempDir()
	// No machine has this version: the installed binaries never match.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "PG_VERSION"), []byte("99\n"), 0o600))
	_, err := Start(testContext(t), Config{DataDir: dir, Logger: testLogger(t)})
	require.ErrorContains(t, err, "was created by PostgreSQL 99, but the server binaries installed are PostgreSQL ")
	require.ErrorContains(t, err, "sudo apt-get install postgresql-99")
	require.ErrorContains(t, err, "it holds the broker's data")
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, entries, 1, "only PG_VERSION")
}

func TestLifecycle(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	dir := filepath.Join(t.TempDir(), "nested", "data") // created by Start

	c := startCluster(t, Config{DataDir: dir})
	u, err := url.Parse(c.URL())
	require.NoError(t, err)
	require.Equal(t, "postgres", u.Scheme)
	require.Equal(t, "postgres", u.User.Username())
	require.Equal(t, "127.0.0.1", u.Hostname())
	require.NotEqual(t, "5432", u.Port())
	require.Equal(t, "/"+DefaultDatabase, u.Path)
	require.Equal(t, "sslmode=disable", u.RawQuery)

	conn := connect(t, c.URL())
	var db, role string
	require.NoError(t, conn.QueryRow(ctx, "SELECT current_database(), current_user").Scan(&db, &role))
	require.Equal(t, DefaultDatabase, db)
	require.Equal(t, "postgres", role)
	_, err = conn.Exec(ctx, "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('survives restart')")
	require.NoError(t, err)
	require.NoError(t, conn.Close(ctx))

	pid := c.proc.pid
	if os.Geteuid() == 0 {
		// postgres refuses root; it must run as the unprivileged account.
		fi, err := os.Stat("/proc/" + strconv.Itoa(pid))
		require.NoError(t, err)
		require.NotZero(t, fi.Sys().(*syscall.Stat_t).Uid, "postmaster runs as root")
	}
	children := childPIDs(pid)
	require.NotEmpty(t, children, "postmaster has no children (checkpointer, walwriter, ...)")

	require.NoError(t, c.Stop(ctx))
	requireGone(t, pid)
	for _, child := range children {
		requireGone(t, child)
	}
	require.NoError(t, c.Stop(ctx), "second Stop")

	// Same directory again: data is reused, not re-initialized.
	c2 := startCluster(t, Config{DataDir: dir})
	conn2 := connect(t, c2.URL())
	var v string
	require.NoError(t, conn2.QueryRow(ctx, "SELECT v FROM kept").Scan(&v))
	require.Equal(t, "survives restart", v)
	require.NoError(t, conn2.Close(ctx))

	log, err := os.ReadFile(filepath.Join(dir, logFileName))
	require.NoError(t, err)
	require.Contains(t, string(log), "database system is ready to accept connections")

	// Concurrent and repeated Stop calls all return once the cluster is gone.
	pid2 := c2.proc.pid
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range errs {
		wg.Go(func() { errs[i] = c2.Stop(ctx) })
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	requireGone(t, pid2)
}

func TestFixedPortAndDatabaseName(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	port, err := freePort()
	require.NoError(t, err)
	const name = "other db-Ünï"

	c := startCluster(t, Config{DataDir: t.TempDir(), Port: port, Database: name})
	u, err := url.Parse(c.URL())
	require.NoError(t, err)
	require.Equal(t, strconv.Itoa(port), u.Port())

	conn := connect(t, c.URL())
	var db string
	require.NoError(t, conn.QueryRow(ctx, "SELECT current_database()").Scan(&db))
	require.Equal(t, name, db)
	require.NoError(t, conn.Close(ctx))
	require.NoError(t, c.Stop(ctx))
}

// A postmaster killed with SIGKILL leaves postmaster.pid behind and, for a moment, orphaned
// backends holding its shared memory; the next start must cope with both.
func TestRestartAfterCrash(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()

	c := startCluster(t, Config{DataDir: dir})
	conn := connect(t, c.URL()) // an open session leaves an orphaned backend behind
	_, err := conn.Exec(ctx, "CREATE TABLE crash (v int); INSERT INTO crash VALUES (42)")
	require.NoError(t, err)

	require.NoError(t, c.proc.cmd.Process.Kill())
	require.True(t, waitClosed(ctx, c.proc.exited, testTimeout))
	require.FileExists(t, filepath.Join(dir, "postmaster.pid"))

	c2 := startCluster(t, Config{DataDir: dir})
	conn2 := connect(t, c2.URL())
	var v int
	require.NoError(t, conn2.QueryRow(ctx, "SELECT v FROM crash").Scan(&v))
	require.Equal(t, 42, v)
	require.NoError(t, conn2.Close(ctx))

	err = c.Stop(ctx)
	require.Error(t, err, "Stop of a cluster whose postmaster died must report it")
	require.Equal(t, err, c.Stop(ctx), "Stop returns the same result every time")
	require.NoError(t, c2.Stop(ctx))
}

// A postmaster that dies under its owner (kill -9, a crash) is reported at once through Died
// and Err, with an ERROR log saying how, where the data and the log are; Stop never counts as
// dying.
func TestUnexpectedExitIsReported(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()
	var logs lockedBuffer
	c := startCluster(t, Config{DataDir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	require.NoError(t, c.Err())
	pid := c.proc.pid

	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	select {
	case <-c.Died():
	case <-ctx.Done():
		t.Fatal("the postmaster's death was not reported")
	}
	var exit *UnexpectedExitError
	require.ErrorAs(t, c.Err(), &exit)
	realDir, err := filepath.EvalSymlinks(dir)
	require.NoError(t, err)
	require.Equal(t, pid, exit.PID)
	require.Equal(t, "killed by signal 9 (killed)", exit.How)
	require.Equal(t, realDir, exit.DataDir)
	require.Equal(t, filepath.Join(realDir, logFileName), exit.LogFile)
	require.ErrorContains(t, c.Err(), fmt.Sprintf("embedded postgres in %s (pid %d) exited unexpectedly: killed by signal 9", realDir, pid))
	logged := logs.String()
	require.Contains(t, logged, `level=ERROR msg="embedded postgres exited unexpectedly"`)
	require.Contains(t, logged, `exit="killed by signal 9 (killed)"`)
	require.Contains(t, logged, "log_file="+exit.LogFile)
	require.Contains(t, logged, "data_dir="+realDir)
	require.Error(t, c.Stop(ctx), "Stop still reports that it had died")

	// A stop is no death.
	c2 := startCluster(t, Config{DataDir: dir})
	require.NoError(t, c2.Stop(ctx))
	select {
	case <-c2.Died():
		t.Fatalf("Stop reported as a death: %v", c2.Err())
	default:
	}
	require.NoError(t, c2.Err())

	// An attached cluster leaves watching to its owner.
	owner := startCluster(t, Config{DataDir: dir})
	attached := startCluster(t, Config{DataDir: dir, Attach: true})
	require.Nil(t, attached.Died())
	require.NoError(t, attached.Err())
	require.NoError(t, attached.Stop(ctx))
	require.NoError(t, owner.Stop(ctx))
}

// lockedBuffer collects what a logger writes from other goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// A second Start on a directory whose cluster this process already runs never stops it: without
// Attach it reports who runs it, with Attach it shares it, and the attached Stop leaves it up.
func TestSecondStartAttaches(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()
	owner := startCluster(t, Config{DataDir: dir})
	ownerPID := owner.proc.pid

	_, err := Start(ctx, Config{DataDir: dir, Logger: testLogger(t)})
	var inUse *InUseError
	require.ErrorAs(t, err, &inUse)
	require.Equal(t, os.Getpid(), inUse.OwnerPID)
	require.Equal(t, owner.URL(), inUse.URL)
	require.ErrorContains(t, err, fmt.Sprintf("already run by process %d at %s", os.Getpid(), owner.URL()))

	for _, database := range []string{"", "second db"} {
		c := startCluster(t, Config{DataDir: dir, Attach: true, Database: database})
		require.Nil(t, c.proc, "attached, not started")
		conn := connect(t, c.URL())
		var db string
		require.NoError(t, conn.QueryRow(ctx, "SELECT current_database()").Scan(&db))
		require.Equal(t, cmp.Or(database, DefaultDatabase), db, "the database is created when missing")
		require.NoError(t, conn.Close(ctx))

		require.NoError(t, c.Stop(ctx))
		require.NoError(t, c.Stop(ctx), "second Stop")
		requireServing(t, owner.URL(), ownerPID)
	}

	require.NoError(t, owner.Stop(ctx))
	requireGone(t, ownerPID)
	// The owner gave the directory up: the next Start owns it.
	c := startCluster(t, Config{DataDir: dir})
	require.NotNil(t, c.proc)
	require.NoError(t, c.Stop(ctx))
}

// Several processes starting on a fresh directory at once: one initializes and owns it, the
// others wait for it and attach.
func TestConcurrentStartsShareOneCluster(t *testing.T) {
	needBinaries(t)
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()
	clusters := make([]*Cluster, 3)
	errs := make([]error, len(clusters))
	var wg sync.WaitGroup
	for i := range clusters {
		wg.Go(func() {
			clusters[i], errs[i] = Start(ctx, Config{DataDir: dir, Attach: true, Logger: testLogger(t)})
		})
	}
	wg.Wait()
	var owner *Cluster
	for i, c := range clusters {
		require.NoError(t, errs[i])
		if c.proc != nil {
			require.Nil(t, owner, "two owners")
			owner = c
		}
	}
	require.NotNil(t, owner)
	t.Cleanup(func() { _ = owner.Stop(context.Background()) })
	for _, c := range clusters {
		require.Equal(t, owner.URL(), c.URL())
		if c != owner {
			require.NoError(t, c.Stop(ctx))
		}
	}
	requireServing(t, owner.URL(), owner.proc.pid)
	require.NoError(t, owner.Stop(ctx))
}

// The cluster of another live process: attached to, never stopped; once that process dies its
// postmaster goes too and the directory is free for a new owner.
func TestAttachToAnotherProcess(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()
	helper, pid := startHelperOwner(t, dir)

	_, err := Start(ctx, Config{DataDir: dir, Logger: testLogger(t)})
	var inUse *InUseError
	require.ErrorAs(t, err, &inUse)
	require.Equal(t, helper.Process.Pid, inUse.OwnerPID, "named from owner.pid")
	require.NotEmpty(t, inUse.URL)

	c := startCluster(t, Config{DataDir: dir, Attach: true})
	require.Equal(t, inUse.URL, c.URL())
	require.Equal(t, helper.Process.Pid, c.ownerPID)
	conn := connect(t, c.URL())
	require.NoError(t, conn.Ping(ctx))
	require.NoError(t, conn.Close(ctx))
	require.NoError(t, c.Stop(ctx))
	requireServing(t, c.URL(), pid)

	if runtime.GOOS != "linux" {
		return // no parent-death signal: the orphan would stay for postgres to refuse
	}
	require.NoError(t, helper.Process.Kill())
	_ = helper.Wait()
	c2 := startCluster(t, Config{DataDir: dir})
	require.NotNil(t, c2.proc, "the dead owner's lock is free")
	require.False(t, alive(pid))
	require.NoError(t, c2.Stop(ctx))
}

// A postmaster whose owner died and that is still running (no parent-death signal: another
// operating system, an older binary) is a leftover: the next Start stops it and takes over.
func TestLeftoverOfDeadOwnerIsStopped(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("identifying a leftover postmaster needs /proc")
	}
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()
	c := startCluster(t, Config{DataDir: dir})
	require.NoError(t, c.Stop(ctx))

	orphan := launchPostgres(t, dir, true)
	st, ok := readProcStat(orphan)
	require.True(t, ok)
	require.NotEqual(t, os.Getpid(), st.ppid, "reparented")

	c = startCluster(t, Config{DataDir: dir})
	require.NotEqual(t, orphan, c.proc.pid)
	require.False(t, alive(orphan), "the leftover was stopped")
	requireServing(t, c.URL(), c.proc.pid)
	require.NoError(t, c.Stop(ctx))
}

// A postmaster started by a live process that holds no lock (an older broker binary) is not a
// leftover: it is attached to or reported, never stopped.
func TestLockFreePostmasterOfLiveParentIsNotStopped(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("identifying the postmaster's parent needs /proc")
	}
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()
	c := startCluster(t, Config{DataDir: dir})
	require.NoError(t, c.Stop(ctx))

	pid := launchPostgres(t, dir, false)
	_, err := Start(ctx, Config{DataDir: dir, Logger: testLogger(t)})
	var inUse *InUseError
	require.ErrorAs(t, err, &inUse)
	require.Equal(t, os.Getpid(), inUse.OwnerPID, "its parent")
	require.NotEmpty(t, inUse.URL)

	c = startCluster(t, Config{DataDir: dir, Attach: true})
	require.Nil(t, c.proc)
	require.NoError(t, c.Stop(ctx))
	requireServing(t, inUse.URL, pid)
}

// requireServing asserts that postmaster pid is alive and url accepts connections.
func requireServing(t *testing.T, url string, pid int) {
	t.Helper()
	require.True(t, alive(pid), "postmaster %d is gone", pid)
	conn := connect(t, url)
	require.NoError(t, conn.Ping(testContext(t)))
	require.NoError(t, conn.Close(testContext(t)))
}

// launchPostgres starts a postmaster on dir (initialized by an earlier Start) without Start, so
// without the lock: as a child of this process, or, with orphan, as an orphan in a session of
// its own, the way one whose owner died is left. It returns the postmaster's pid once it is
// ready and stops it at the end of the test if it still runs.
func launchPostgres(t *testing.T, dir string, orphan bool) int {
	t.Helper()
	needBinaries(t)
	ctx := testContext(t)
	binDir, err := FindBinDir()
	require.NoError(t, err)
	acct, err := unprivilegedAccount()
	require.NoError(t, err)
	realDir, err := filepath.EvalSymlinks(dir)
	require.NoError(t, err)
	port, err := freePort()
	require.NoError(t, err)
	args := []string{"-D", realDir, "-p", strconv.Itoa(port), "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="}

	var cmd *exec.Cmd
	if orphan {
		// The shell backgrounds postgres and exits at once.
		cmd = exec.Command("/bin/sh", append([]string{"-c", `"$@" >/dev/null 2>&1 </dev/null & echo $!`, "sh",
			filepath.Join(binDir, "postgres")}, args...)...)
	} else {
		cmd = exec.Command(filepath.Join(binDir, "postgres"), args...)
	}
	(&Cluster{dataDir: realDir, acct: acct}).prepareCmd(cmd)
	if orphan {
		cmd.SysProcAttr.Setpgid, cmd.SysProcAttr.Setsid = false, true
	}

	var pid int
	if orphan {
		out, err := cmd.Output()
		require.NoError(t, err)
		pid, err = strconv.Atoi(strings.TrimSpace(string(out)))
		require.NoError(t, err)
	} else {
		require.NoError(t, cmd.Start())
		pid = cmd.Process.Pid
		exited := make(chan struct{})
		go func() { _ = cmd.Wait(); close(exited) }()
		t.Cleanup(func() {
			_ = cmd.Process.Signal(syscall.SIGINT)
			<-exited
		})
	}
	if orphan {
		t.Cleanup(func() {
			if owns, _ := ownsDataDir(pid, realDir); owns {
				_ = syscall.Kill(pid, syscall.SIGINT)
				waitUntil(context.Background(), testTimeout, func() bool { return !alive(pid) })
			}
		})
	}
	require.True(t, waitUntil(ctx, testTimeout, func() bool {
		pf, err := readPIDFile(filepath.Join(realDir, pidFileName))
		return err == nil && pf.pid == pid && pf.status == "ready"
	}), "postgres %d did not become ready", pid)
	return pid
}

func TestStalePIDFile(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()
	c := startCluster(t, Config{DataDir: dir})
	require.NoError(t, c.Stop(ctx))

	dead := exec.Command("true")
	require.NoError(t, dead.Run())

	type stale struct {
		name    string
		content string
	}
	cases := []stale{
		{"dead pid", fmt.Sprintf("%d\n%s\n", dead.Process.Pid, dir)},
		// Our own pid: alive, but not a postgres working in dir (a recycled pid).
		{"unrelated live pid", fmt.Sprintf("%d\n%s\n", os.Getpid(), dir)},
		{"empty file", ""},
	}
	if runtime.GOOS == "linux" {
		// A postmaster killed along with its owner and not reaped by its new parent (an init
		// that never reaps) stays a zombie, which postgres's own check counts as running.
		cases = append(cases, stale{"unreaped pid", fmt.Sprintf("%d\n%s\n", zombie(t), dir)})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			require.NoError(t, os.WriteFile(filepath.Join(dir, "postmaster.pid"), []byte(tc.content), 0o600))
			c := startCluster(t, Config{DataDir: dir})
			conn := connect(t, c.URL())
			require.NoError(t, conn.Ping(ctx))
			require.NoError(t, conn.Close(ctx))
			require.NoError(t, c.Stop(ctx))
		})
	}
}

// zombie returns the pid of a child of this process that has exited and that nobody reaps
// until the test ends (Linux: it waits for the state /proc shows). It runs as the user postgres
// runs as, like a dead postmaster: postgres takes a pid it may not signal (EPERM) for stale.
func zombie(t *testing.T) int {
	t.Helper()
	acct, err := unprivilegedAccount()
	require.NoError(t, err)
	cmd := exec.Command("true")
	if acct != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: acct.uid, Gid: acct.gid, Groups: []uint32{}}}
	}
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Wait() })
	pid := cmd.Process.Pid
	require.True(t, waitUntil(testContext(t), testTimeout, func() bool {
		st, ok := readProcStat(pid)
		return ok && st.state == 'Z'
	}), "child %d did not exit", pid)
	return pid
}

func TestStartRejects(t *testing.T) {
	needBinaries(t)
	ctx := testContext(t)
	_, err := Start(ctx, Config{})
	require.ErrorContains(t, err, "DataDir is required")

	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "precious.txt"), []byte("x"), 0o600))
	_, err = Start(ctx, Config{DataDir: dir})
	require.ErrorContains(t, err, "not empty")
	require.FileExists(t, filepath.Join(dir, "precious.txt"))

	_, err = Start(ctx, Config{DataDir: t.TempDir(), Database: string(make([]byte, 64))})
	require.ErrorContains(t, err, "invalid database name")
}

// A start cancelled during initdb must not leave a half-initialized directory that later
// starts would mistake for a cluster.
func TestCancelledInitdbLeavesEmptyDir(t *testing.T) {
	needBinaries(t)
	t.Parallel()
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		// Cancel as soon as initdb has started writing.
		waitUntil(context.Background(), testTimeout, func() bool {
			entries, _ := os.ReadDir(dir)
			return len(entries) > 0
		})
		cancel()
	}()
	c, err := Start(ctx, Config{DataDir: dir, Logger: testLogger(t)})
	<-watched
	if err == nil {
		require.NoError(t, c.Stop(context.Background()))
		t.Skip("initdb finished before the cancel landed")
	}
	require.ErrorIs(t, err, context.Canceled)
	if !strings.HasPrefix(err.Error(), "initdb:") {
		t.Skipf("cancelled after initdb: %v", err)
	}
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Empty(t, entries)
}

func TestPortInUse(t *testing.T) {
	needBinaries(t)
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port

	_, err = Start(testContext(t), Config{DataDir: t.TempDir(), Port: port, Logger: testLogger(t)})
	require.ErrorContains(t, err, "could not create any TCP/IP sockets", "the error carries the postgres log")
}

// helperEnv makes the test binary act as a process that starts a cluster and then waits to be
// killed; see startHelperOwner.
const helperEnv = "EMBEDDED_TEST_HELPER_DATA_DIR"

func TestHelperProcess(t *testing.T) {
	dir := os.Getenv(helperEnv)
	if dir == "" {
		t.Skip("helper for startHelperOwner")
	}
	c, err := Start(context.Background(), Config{DataDir: dir})
	require.NoError(t, err)
	fmt.Printf("pid=%d\n", c.proc.pid)
	select {} // until killed
}

// startHelperOwner runs TestHelperProcess in a child process that owns a cluster in dir and
// returns it with its postmaster's pid. The child is killed at the end of the test.
func startHelperOwner(t *testing.T, dir string) (*exec.Cmd, int) {
	t.Helper()
	needBinaries(t)
	helper := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	helper.Env = append(os.Environ(), helperEnv+"="+dir)
	stdout, err := helper.StdoutPipe()
	require.NoError(t, err)
	helper.Stderr = t.Output()
	require.NoError(t, helper.Start())
	t.Cleanup(func() {
		_ = helper.Process.Kill()
		_ = helper.Wait()
	})

	var pid int
	scanner := bufio.NewScanner(stdout)
	for scanner.Scan() {
		if _, err := fmt.Sscanf(scanner.Text(), "pid=%d", &pid); err == nil {
			break
		}
	}
	require.NotZero(t, pid, "helper did not report a postmaster pid")
	require.True(t, alive(pid))
	return helper, pid
}

// If the owning process dies without Stop (kill -9, a test binary timing out), the kernel's
// parent-death signal makes the postmaster shut down instead of lingering.
func TestParentDeathStopsPostmaster(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("parent-death signal is Linux-only")
	}
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()
	helper, pid := startHelperOwner(t, dir)

	require.NoError(t, helper.Process.Kill())
	_ = helper.Wait()
	require.True(t, waitUntil(ctx, testTimeout, func() bool { return !alive(pid) }), "postmaster %d outlived its parent", pid)
	// A fast shutdown removes postmaster.pid; a crash would leave it.
	require.True(t, waitUntil(ctx, testTimeout, func() bool {
		_, err := os.Stat(filepath.Join(dir, "postmaster.pid"))
		return errors.Is(err, os.ErrNotExist)
	}))
}

func TestCanSearch(t *testing.T) {
	acct := &account{name: "pg", uid: 101, gid: 104}
	for _, tc := range []struct {
		mode     uint32
		uid, gid uint32
		want     bool
	}{
		{0o700, 0, 0, false},
		{0o701, 0, 0, true},
		{0o710, 0, 104, true},
		{0o701, 0, 104, false}, // group class applies, and it has no x
		{0o700, 101, 0, true},
		{0o077, 101, 104, false}, // owner class applies, and it has no x
		{0o755, 0, 0, true},
	} {
		require.Equal(t, tc.want, canSearch(tc.mode, tc.uid, tc.gid, acct), "%+v", tc)
	}
}

func TestMakeReachable(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	acct, err := unprivilegedAccount()
	require.NoError(t, err)
	root := t.TempDir()
	a := filepath.Join(root, "a")
	b := filepath.Join(a, "b")
	data := filepath.Join(b, "data")
	require.NoError(t, os.MkdirAll(data, 0o700))
	require.NoError(t, os.Chmod(a, 0o700))
	require.NoError(t, os.Chmod(b, 0o750))

	var logs lockedBuffer
	require.NoError(t, makeReachable(data, acct, slog.New(slog.NewTextHandler(&logs, nil))))
	for _, tc := range []struct {
		path     string
		was      string
		want     os.FileMode
		wantText string
	}{{a, "0700", 0o701, "0701"}, {b, "0750", 0o751, "0751"}} {
		fi, err := os.Stat(tc.path)
		require.NoError(t, err)
		require.Equal(t, tc.want, fi.Mode().Perm(), tc.path)
		// Each change is a warning naming the directory and both modes.
		require.Regexp(t, `level=WARN msg="added search permission for others \(o\+x\) to a parent of the data directory[^"]*" `+
			`path=`+regexp.QuoteMeta(tc.path)+` run_as=\S+ old_mode=`+tc.was+` new_mode=`+tc.wantText+`\n`, logs.String())
	}
	require.NotContains(t, logs.String(), "path="+data+" ", "the data dir itself is not opened up")
	fi, err := os.Stat(data)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), "the data dir itself is chowned, not opened up")
}

func TestReadPIDFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "postmaster.pid")
	require.NoError(t, os.WriteFile(p, []byte("1234\n/data\n"), 0o600))
	pf, err := readPIDFile(p)
	require.NoError(t, err)
	require.Equal(t, pidFile{pid: 1234}, pf)
	require.False(t, pf.ready(), "no port yet")

	// As PostgreSQL 10+ writes it; the status line is padded.
	require.NoError(t, os.WriteFile(p, []byte("1234\n/data\n1700000000\n5433\n\n127.0.0.1\n  5433001     32769\nready   \n"), 0o600))
	pf, err = readPIDFile(p)
	require.NoError(t, err)
	require.Equal(t, pidFile{pid: 1234, port: 5433, status: "ready"}, pf)
	require.True(t, pf.ready())
	pf.status = "stopping"
	require.False(t, pf.ready())

	require.NoError(t, os.WriteFile(p, []byte("\n"), 0o600))
	_, err = readPIDFile(p)
	require.Error(t, err)

	_, err = readPIDFile(filepath.Join(dir, "missing"))
	require.True(t, errors.Is(err, os.ErrNotExist))
}
