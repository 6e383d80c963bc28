//go:build unix

package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
)

// startServe runs `broker serve` with env added to ours and its output collected.
func startServe(t *testing.T, bin string, env []string, args ...string) (*exec.Cmd, *lockedBuffer, *exited) {
	t.Helper()
	return startServeIn(t, bin, append(os.Environ(), env...), args...)
}

// startServeIn is startServe with env as the whole environment (embeddedEnv: no DATABASE_URL).
func startServeIn(t *testing.T, bin string, env []string, args ...string) (*exec.Cmd, *lockedBuffer, *exited) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"serve"}, args...)...)
	cmd.Env = env
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start())
	ex := &exited{done: make(chan struct{})}
	go func() { ex.err = cmd.Wait(); close(ex.done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-ex.done
		if t.Failed() {
			t.Logf("broker serve output:\n%s", out)
		}
	})
	return cmd, out, ex
}

func TestServeStartUp(t *testing.T) {
	if testing.Short() {
		t.Skip("drives real broker processes; skipped in -short")
	}
	bin := buildBroker(t, t.TempDir())

	// SIGTERM while serve waits for its database is a stop that was asked for, not a failure.
	t.Run("stopped while waiting for Postgres", func(t *testing.T) {
		nobody := freePort(t) // nothing listens there: every migration attempt fails
		cmd, out, ex := startServe(t, bin, []string{
			fmt.Sprintf("DATABASE_URL=postgres://postgres@127.0.0.1:%d/x?sslmode=disable", nobody),
			"BROKER_PORT=" + strconv.Itoa(freePort(t)), "LOG_LEVEL=info"})
		dbtest.WaitFor(t, 30*time.Second, "a migration retry", func() bool {
			return strings.Contains(out.String(), "migrations failed; retrying")
		})
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		require.Equal(t, 0, waitExit(t, ex, 10*time.Second), "a requested stop exits 0")
		require.NotContains(t, out.String(), "context canceled")
		require.NotContains(t, out.String(), "broker: ", "no error printed")
	})

	// An older binary on a schema a newer release migrated starts (a rolling deploy runs it so
	// on purpose) and says which versions it sees.
	t.Run("newer schema", func(t *testing.T) {
		dbURL := dbtest.URL(t)
		ctx := context.Background()
		_, known, err := db.SchemaVersions(ctx, dbURL)
		require.NoError(t, err)
		conn, err := pgx.Connect(ctx, dbURL)
		require.NoError(t, err)
		_, err = conn.Exec(ctx, "INSERT INTO "+db.VersionTable+" (version_id, is_applied) VALUES ($1, true)", known+1)
		require.NoError(t, err)
		require.NoError(t, conn.Close(ctx))

		port := freePort(t)
		cmd, out, ex := startServe(t, bin, []string{"DATABASE_URL=" + dbURL, "BROKER_PORT=" + strconv.Itoa(port), "LOG_LEVEL=info"}, "--no-migrate")
		dbtest.WaitFor(t, time.Minute, "the schema warning", func() bool {
			return strings.Contains(out.String(), "the database schema is newer than this binary")
		})
		require.Contains(t, out.String(), fmt.Sprintf("schema_version=%d binary_schema_version=%d", known+1, known))
		dbtest.WaitFor(t, time.Minute, "serve healthy all the same", func() bool { return health(port) == http.StatusOK })
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		require.Equal(t, 0, waitExit(t, ex, 30*time.Second))
	})

	// Two replicas given one BROKER_NODE_ID would end each other's sessions: the older one
	// stops with an error naming the setting, the newer one serves on.
	t.Run("node id taken by another process", func(t *testing.T) {
		dbURL := dbtest.URL(t)
		env := func(port int) []string {
			return []string{"DATABASE_URL=" + dbURL, "BROKER_PORT=" + strconv.Itoa(port), "BROKER_NODE_ID=twin",
				"NODE_DEAD_AFTER_SECONDS=4", "DRAIN_TIMEOUT_SECONDS=2"}
		}
		first, second := freePort(t), freePort(t)
		_, out, ex := startServe(t, bin, env(first))
		dbtest.WaitFor(t, time.Minute, "the first replica healthy", func() bool { return health(first) == http.StatusOK })
		cmd2, _, ex2 := startServe(t, bin, env(second), "--no-migrate")
		require.Equal(t, 1, waitExit(t, ex, 30*time.Second), "the older replica fails")
		require.Contains(t, out.String(), "BROKER_NODE_ID must be unique")
		dbtest.WaitFor(t, time.Minute, "the newer replica healthy", func() bool { return health(second) == http.StatusOK })
		require.NoError(t, cmd2.Process.Signal(syscall.SIGTERM))
		require.Equal(t, 0, waitExit(t, ex2, 30*time.Second))
	})
}

// Two dev clusters on one DATABASE_URL name their replicas alike (dev-1, ...): the older one
// finds its ids taken and stops, saying why, instead of serving on without a heartbeat.
func TestDevClustersSharingADatabaseStopTheOlder(t *testing.T) {
	t.Setenv("DATABASE_URL", dbtest.URL(t))
	t.Setenv("LOG_LEVEL", "warn")
	t.Setenv("NODE_DEAD_AFTER_SECONDS", "4")
	t.Setenv("DRAIN_TIMEOUT_SECONDS", "2")
	first := freePorts(t, 2)
	t.Setenv("BROKER_PORT", strconv.Itoa(first))
	outA, stopA := startCLI(t, "dev", "--replicas", "1")
	bannerField(t, outA, "load balancer")
	t.Setenv("BROKER_PORT", strconv.Itoa(freePorts(t, 2)))
	outB, stopB := startCLI(t, "dev", "--replicas", "1")
	bannerField(t, outB, "load balancer")
	dbtest.WaitFor(t, time.Minute, "the older cluster's replica gone", func() bool { return health(first+1) == 0 })
	require.ErrorContains(t, stopA(), "BROKER_NODE_ID must be unique")
	require.NoError(t, stopB())
}

// `broker dev` listens where BROKER_HOST says, as `broker serve` does: on loopback its replicas
// take the April clients' unsigned hooks, so they must not be reachable from another machine.
// It listened on every interface whatever BROKER_HOST said, and a cluster started with
// BROKER_HOST=127.0.0.1 took unsigned hooks from the network.
func TestDevOnLoopbackListensOnLoopbackOnly(t *testing.T) {
	other := nonLoopbackIPv4(t)
	t.Setenv("DATABASE_URL", dbtest.URL(t))
	t.Setenv("LOG_LEVEL", "warn")
	t.Setenv("DRAIN_TIMEOUT_SECONDS", "2")
	t.Setenv("BROKER_HOST", "127.0.0.1")
	port := freePorts(t, 2)
	t.Setenv("BROKER_PORT", strconv.Itoa(port))
	out, stop := startCLI(t, "dev", "--replicas", "1")
	require.Equal(t, "ws://127.0.0.1:"+strconv.Itoa(port)+"/ws", bannerField(t, out, "load balancer"))
	dbtest.WaitFor(t, time.Minute, "the cluster healthy on loopback", func() bool { return health(port) == http.StatusOK })
	for _, p := range []int{port, port + 1} { // the load balancer and the replica
		c, err := net.DialTimeout("tcp", net.JoinHostPort(other, strconv.Itoa(p)), 5*time.Second)
		if err == nil {
			c.Close()
		}
		require.Error(t, err, "port %d answers on %s", p, other)
	}
	require.NoError(t, stop())
}

// nonLoopbackIPv4 is an address of this machine other than loopback (a test of what listens
// where needs one).
func nonLoopbackIPv4(t *testing.T) string {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	require.NoError(t, err)
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() {
			return n.IP.String()
		}
	}
	t.Skip("this machine has no address but loopback")
	return ""
}
