package broker

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/dbtest"
)

// logLines is a log sink a test counts lines in while the server writes.
type logLines struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

// matching returns the lines that contain every one of parts.
func (l *logLines) matching(parts ...string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for line := range strings.Lines(l.buf.String()) {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

// A failure that repeats on every request or tick logs its first line, then one line per
// interval that counts the ones left out; each kind of line on its own.
func TestRepeatedFailuresAreSummarized(t *testing.T) {
	m := newMetrics()
	now := time.Unix(1_000_000, 0)
	m.logged.now = func() time.Time { return now }
	lines := &logLines{}
	log := slog.New(slog.NewTextHandler(lines, nil))
	down := errors.New("connection refused")

	for range 1000 {
		m.warnRepeated(log, "hello failed", "err", down)
		m.warnRepeated(log, "request failed", "err", down)
		m.backgroundError(log, "claim", down)
	}
	require.Len(t, lines.matching(`msg="hello failed"`, "connection refused"), 1, "the first failure is logged, with its error")
	require.Len(t, lines.matching(`msg="request failed"`), 1, "another message is not held back by the first")
	require.Len(t, lines.matching(`msg="claim failed"`), 1)

	now = now.Add(repeatLogEvery - time.Millisecond)
	m.warnRepeated(log, "hello failed", "err", down)
	require.Len(t, lines.matching(`msg="hello failed"`), 1, "still within the interval")

	now = now.Add(time.Millisecond)
	m.warnRepeated(log, "hello failed", "err", down)
	m.backgroundError(log, "claim", down)
	require.Len(t, lines.matching(`msg="hello failed"`, "suppressed_since_last=1000"), 1, "the next interval's line counts those left out")
	require.Len(t, lines.matching(`msg="claim failed"`, "suppressed_since_last=999"), 1)
	require.Len(t, lines.matching(`msg="hello failed"`), 2)
}

// Peers reconnecting to a replica cut off from Postgres do not each add a line to its log.
func TestHelloFailuresDuringOutageAreSummarized(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	c := &testCluster{t: t, url: url, pool: dbtest.PoolFor(t, url)}
	lines := &logLines{}
	srv, err := NewServer(Config{NodeID: "n0", DrainTimeout: 2 * time.Second}, dbtest.PoolFor(t, proxy.URL(url)), slog.New(slog.NewTextHandler(lines, nil)))
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() {
		proxy.Restore()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Stop(ctx)
	})
	dbtest.WaitFor(t, 10*time.Second, "listener connected", srv.BusConnected)
	c.nodes = []*Server{srv}
	m := c.mesh(0)
	alice := m.member("alice")

	proxy.Cut()
	const attempts = 20
	for range attempts {
		_, err := m.tryDial(0, alice)
		require.Error(t, err, "no hello succeeds without Postgres")
	}
	dbtest.WaitFor(t, 10*time.Second, "the failures counted", func() bool {
		return testutilCounter(srv.metrics.ConnRejected.WithLabelValues("internal")) >= attempts
	})
	require.Len(t, lines.matching(`msg="hello failed"`), 1, "one line for %d failed hellos", attempts)
}
