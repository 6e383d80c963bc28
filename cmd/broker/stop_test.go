//go:build unix

package main

import (
	"errors"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker"
	"github.com/claudemesh/broker/db/dbtest"
)

// hungServe starts `broker serve` on a database behind a proxy, waits until it is healthy and
// then makes Postgres stop answering (every byte held an hour, connections left open): the
// outage in which stopping a replica used to overrun its drain deadline.
func hungServe(t *testing.T, bin string, drain int) (*exec.Cmd, *lockedBuffer, *exited) {
	t.Helper()
	dbURL := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, dbURL)
	port := freePort(t)
	cmd, out, ex := startServe(t, bin, []string{"DATABASE_URL=" + proxy.URL(dbURL), "BROKER_PORT=" + strconv.Itoa(port),
		"DRAIN_TIMEOUT_SECONDS=" + strconv.Itoa(drain), "LOG_LEVEL=info", "BROKER_HOST=127.0.0.1"}, "--no-migrate")
	dbtest.WaitFor(t, time.Minute, "serve healthy", func() bool { return health(port) == http.StatusOK })
	proxy.SetDelay(time.Hour)
	return cmd, out, ex
}

// exited is closed, with Wait's error, when the process has exited.
type exited struct {
	done chan struct{}
	err  error
}

// waitExit waits up to d for the process to exit and returns its exit code.
func waitExit(t *testing.T, ex *exited, d time.Duration) int {
	t.Helper()
	select {
	case <-ex.done:
		var ee *exec.ExitError
		if errors.As(ex.err, &ee) {
			return ee.ExitCode()
		}
		require.NoError(t, ex.err)
		return 0
	case <-time.After(d):
		t.Fatalf("broker did not exit within %s", d)
		return -1
	}
}

// With Postgres not answering, SIGTERM still ends the process within DRAIN_TIMEOUT_SECONDS plus
// the stop margin (the bound the platforms' kill timeouts are set by), saying what it gave up
// on; and a second SIGTERM during the drain ends it at once, with a line saying so.
func TestStopWhenPostgresHangs(t *testing.T) {
	if testing.Short() {
		t.Skip("drives real broker processes; skipped in -short")
	}
	bin := buildBroker(t, t.TempDir())

	t.Run("bounded by the drain deadline", func(t *testing.T) {
		const drain = 2
		cmd, out, exited := hungServe(t, bin, drain)
		t0 := time.Now()
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		// Within the bound, plus what a loaded 2-core machine may take to end a process.
		code := waitExit(t, exited, drain*time.Second+broker.StopMargin+3*time.Second)
		t.Logf("exited %d after %s", code, time.Since(t0))
		require.Contains(t, out.String(), "shutting down")
		if code != 0 {
			require.Contains(t, out.String(), "stop cut at the deadline", "a stop that did not finish says so")
		}
	})

	t.Run("second signal", func(t *testing.T) {
		cmd, out, exited := hungServe(t, bin, 120)
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		// The heartbeat's last statement alone holds the stop for 3 s against this Postgres.
		dbtest.WaitFor(t, 30*time.Second, "the drain under way", func() bool { return strings.Contains(out.String(), "shutting down") })
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		code := waitExit(t, exited, 10*time.Second)
		require.Equal(t, 128+int(syscall.SIGTERM), code)
		require.Contains(t, out.String(), "second signal: exiting now")
	})
}
