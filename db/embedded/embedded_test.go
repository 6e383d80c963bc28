//go:build unix

package embedded

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
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

// startCluster starts a cluster in dir and stops it at the end of the test (a no-op if the test
// already did).
func startCluster(t *testing.T, cfg Config) *Cluster {
	t.Helper()
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

// A postmaster still running from an earlier run (its owner died without Stop) is stopped and
// replaced.
func TestTakeOverLivePostmaster(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()

	old := startCluster(t, Config{DataDir: dir})
	oldPID := old.proc.pid

	c := startCluster(t, Config{DataDir: dir})
	require.NotEqual(t, oldPID, c.proc.pid)
	require.True(t, waitClosed(ctx, old.proc.exited, testTimeout), "earlier postmaster still running")
	requireGone(t, oldPID)

	conn := connect(t, c.URL())
	require.NoError(t, conn.Ping(ctx))
	require.NoError(t, conn.Close(ctx))

	require.NoError(t, old.Stop(ctx), "its postmaster exited cleanly after a fast shutdown")
	require.NoError(t, c.Stop(ctx))
}

func TestStalePIDFile(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()
	c := startCluster(t, Config{DataDir: dir})
	require.NoError(t, c.Stop(ctx))

	dead := exec.Command("true")
	require.NoError(t, dead.Run())

	for _, tc := range []struct {
		name    string
		content string
	}{
		{"dead pid", fmt.Sprintf("%d\n%s\n", dead.Process.Pid, dir)},
		// Our own pid: alive, but not a postgres working in dir (a recycled pid).
		{"unrelated live pid", fmt.Sprintf("%d\n%s\n", os.Getpid(), dir)},
		{"empty file", ""},
	} {
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

func TestStartRejects(t *testing.T) {
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
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port

	_, err = Start(testContext(t), Config{DataDir: t.TempDir(), Port: port, Logger: testLogger(t)})
	require.ErrorContains(t, err, "could not create any TCP/IP sockets", "the error carries the postgres log")
}

// helperEnv makes the test binary act as a process that starts a cluster and then waits to be
// killed; see TestParentDeathStopsPostmaster.
const helperEnv = "EMBEDDED_TEST_HELPER_DATA_DIR"

func TestHelperProcess(t *testing.T) {
	dir := os.Getenv(helperEnv)
	if dir == "" {
		t.Skip("helper for TestParentDeathStopsPostmaster")
	}
	c, err := Start(context.Background(), Config{DataDir: dir})
	require.NoError(t, err)
	fmt.Printf("pid=%d\n", c.proc.pid)
	select {} // until killed
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
	helper := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHelperProcess$")
	helper.Env = append(os.Environ(), helperEnv+"="+dir)
	stdout, err := helper.StdoutPipe()
	require.NoError(t, err)
	helper.Stderr = t.Output()
	require.NoError(t, helper.Start())

	var pid int
	scanner := bufio.NewScanner(stdout)
	for scanner.Scan() {
		if _, err := fmt.Sscanf(scanner.Text(), "pid=%d", &pid); err == nil {
			break
		}
	}
	require.NotZero(t, pid, "helper did not report a postmaster pid")
	require.True(t, alive(pid))

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

	require.NoError(t, makeReachable(data, acct, testLogger(t)))
	for _, tc := range []struct {
		path string
		want os.FileMode
	}{{a, 0o701}, {b, 0o751}} {
		fi, err := os.Stat(tc.path)
		require.NoError(t, err)
		require.Equal(t, tc.want, fi.Mode().Perm(), tc.path)
	}
	fi, err := os.Stat(data)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), "the data dir itself is chowned, not opened up")
}

func TestReadPIDFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "postmaster.pid")
	require.NoError(t, os.WriteFile(p, []byte("1234\n/data\n"), 0o600))
	pid, err := readPIDFile(p)
	require.NoError(t, err)
	require.Equal(t, 1234, pid)

	require.NoError(t, os.WriteFile(p, []byte("\n"), 0o600))
	_, err = readPIDFile(p)
	require.Error(t, err)

	_, err = readPIDFile(filepath.Join(dir, "missing"))
	require.True(t, errors.Is(err, os.ErrNotExist))
}
