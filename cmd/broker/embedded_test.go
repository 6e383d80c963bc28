//go:build unix

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/db/embedded"
)

// The README's flow with DATABASE_URL unset: `broker serve` in one terminal, admin verbs in
// another, both on the embedded Postgres in the same BROKER_DATA_DIR. The verbs use the running
// Postgres and leave it running (they used to stop it, leaving serve degraded); a second serve
// is refused with what to do; once serve has exited, a verb runs its own Postgres and stops it.
func TestEmbeddedPostgresSharedWithAdminVerbs(t *testing.T) {
	if testing.Short() {
		t.Skip("drives real broker and postgres processes; skipped in -short")
	}
	needEmbeddedPostgres(t)
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bin := buildBroker(t, dir)
	dataDir := filepath.Join(dir, "data")
	port := freePort(t)
	env := embeddedEnv(dataDir, port, filepath.Join(dir, "config"))

	serve := exec.Command(bin, "serve")
	serve.Env = env
	logPath := filepath.Join(dir, "serve.log")
	logf, err := os.Create(logPath)
	require.NoError(t, err)
	serve.Stdout, serve.Stderr = logf, logf
	require.NoError(t, serve.Start())
	serveExited := make(chan struct{})
	var serveErr error
	go func() { serveErr = serve.Wait(); logf.Close(); close(serveExited) }()
	t.Cleanup(func() {
		_ = serve.Process.Kill()
		<-serveExited
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("broker serve log:\n%s", b)
		}
	})
	dbtest.WaitFor(t, 2*time.Minute, "serve healthy", func() bool { return health(port) == http.StatusOK })
	postmaster := postmasterPID(t, dataDir)

	// An admin verb attaches to serve's Postgres.
	out, stderr, err := runBroker(ctx, bin, env, "mesh", "create", "--slug", "demo", "--json")
	require.NoError(t, err, "mesh create: %s%s", out, stderr)
	var created struct {
		Mesh membership.Mesh `json:"mesh"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &created), out)
	require.Equal(t, "demo", created.Mesh.Slug)
	require.Contains(t, stderr, "attached to embedded postgres")

	require.Equal(t, http.StatusOK, health(port), "serve still healthy after the verb")
	require.Equal(t, postmaster, postmasterPID(t, dataDir), "the same postmaster serves")
	require.NoError(t, syscall.Kill(postmaster, 0))
	out, stderr, err = runBroker(ctx, bin, env, "mesh", "list")
	require.NoError(t, err, "mesh list: %s%s", out, stderr)
	require.Contains(t, out, "demo")

	// A second serve on the same data directory is refused and says what to do.
	refusedCtx, cancelRefused := context.WithTimeout(ctx, time.Minute) // should it serve instead
	defer cancelRefused()
	out, stderr, err = runBroker(refusedCtx, bin, embeddedEnv(dataDir, freePort(t), filepath.Join(dir, "config")), "serve")
	var exitErr *exec.ExitError
	require.ErrorAs(t, err, &exitErr, "second serve: %s%s", out, stderr)
	require.Contains(t, stderr, fmt.Sprintf("already run by process %d", serve.Process.Pid))
	require.Contains(t, stderr, "DATABASE_URL='postgres://postgres@127.0.0.1:")
	require.Equal(t, http.StatusOK, health(port), "serve still healthy after the refused serve")
	require.Equal(t, postmaster, postmasterPID(t, dataDir))

	// serve stops the Postgres it started.
	require.NoError(t, serve.Process.Signal(syscall.SIGTERM))
	select {
	case <-serveExited:
		require.NoError(t, serveErr, "serve exits cleanly on SIGTERM")
	case <-ctx.Done():
		t.Fatal("serve did not exit")
	}
	dbtest.WaitFor(t, time.Minute, "serve's postmaster gone", func() bool {
		return errors.Is(syscall.Kill(postmaster, 0), syscall.ESRCH)
	})

	// With nobody running it, a verb starts its own Postgres and stops it again.
	out, stderr, err = runBroker(ctx, bin, env, "mesh", "list")
	require.NoError(t, err, "mesh list: %s%s", out, stderr)
	require.Contains(t, out, "demo")
	require.NotContains(t, stderr, "attached to embedded postgres")
	require.NoFileExists(t, filepath.Join(dataDir, "postmaster.pid"), "the verb stopped its own Postgres")
}

// If the embedded Postgres dies under `broker serve` (kill -9, the OOM killer), serve says so
// and exits non-zero at once instead of answering 503 until someone looks; started again, it
// serves on the same data.
func TestServeExitsWhenEmbeddedPostgresDies(t *testing.T) {
	if testing.Short() {
		t.Skip("drives real broker and postgres processes; skipped in -short")
	}
	needEmbeddedPostgres(t)
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bin := buildBroker(t, dir)
	dataDir := filepath.Join(dir, "data")
	port := freePort(t)
	env := embeddedEnv(dataDir, port, filepath.Join(dir, "config"))

	_, stderr, serveExited := startServeIn(t, bin, env)
	dbtest.WaitFor(t, 2*time.Minute, "serve healthy", func() bool { return health(port) == http.StatusOK })
	out, errOut, err := runBroker(ctx, bin, env, "mesh", "create", "--slug", "kept")
	require.NoError(t, err, "mesh create: %s%s", out, errOut)

	postmaster := postmasterPID(t, dataDir)
	require.NoError(t, syscall.Kill(postmaster, syscall.SIGKILL))
	require.Equal(t, 1, waitExit(t, serveExited, time.Minute), "serve kept running without its Postgres, or exited 0")
	realData, err := filepath.EvalSymlinks(dataDir)
	require.NoError(t, err)
	log := stderr.String()
	require.Contains(t, log, `level=ERROR msg="embedded postgres exited unexpectedly"`)
	require.Contains(t, log, fmt.Sprintf("broker: stopping, its database is gone; start the broker again "+
		"(the next start recovers the data directory): embedded postgres in %s (pid %d) exited unexpectedly: killed by signal 9 (killed); "+
		"its log is %s", realData, postmaster, filepath.Join(realData, "postgres.log")))

	// What a supervisor does next.
	out, errOut, err = runBroker(ctx, bin, env, "mesh", "list")
	require.NoError(t, err, "mesh list after the crash: %s%s", out, errOut)
	require.Contains(t, out, "kept")
}

// needEmbeddedPostgres skips t when this machine has no PostgreSQL server binaries and the
// suite is pointed at a server (TEST_DATABASE_URL or DATABASE_URL), for which `make test`
// installs none. Otherwise missing binaries fail the test.
func needEmbeddedPostgres(t *testing.T) {
	t.Helper()
	_, err := embedded.FindBinDir()
	if errors.Is(err, embedded.ErrNoBinaries) && (os.Getenv("TEST_DATABASE_URL") != "" || os.Getenv("DATABASE_URL") != "") {
		t.Skipf("needs the PostgreSQL server binaries: %v", err)
	}
}

// buildBroker builds the broker binary into dir.
func buildBroker(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "broker")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Stderr = os.Stderr
	require.NoError(t, build.Run(), "build the broker binary")
	return bin
}

// embeddedEnv is the environment of a broker on the embedded Postgres in dataDir: ours without
// any database or broker setting that would point it elsewhere.
func embeddedEnv(dataDir string, port int, configDir string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if name == "DATABASE_URL" || strings.HasPrefix(name, "BROKER_") || name == "XDG_CONFIG_HOME" {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "BROKER_DATA_DIR="+dataDir, "BROKER_PORT="+strconv.Itoa(port),
		"XDG_CONFIG_HOME="+configDir, "LOG_LEVEL=info")
}

// runBroker runs one broker command to completion.
func runBroker(ctx context.Context, bin string, env []string, args ...string) (stdout, stderr string, err error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	return out.String(), errOut.String(), err
}

// health returns the status code of GET /health, or 0 when the broker does not answer.
func health(port int) int {
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/health", port))
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// postmasterPID reads the pid on the first line of the data directory's postmaster.pid.
func postmasterPID(t *testing.T, dataDir string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	require.NoError(t, err)
	first, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	require.NoError(t, err)
	return pid
}
