package dbtest

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// WaitFor polls cond until it holds or the deadline passes, then fails the test with msg.
// Tests wait on conditions, never on fixed sleeps.
func WaitFor(t testing.TB, deadline time.Duration, msg string, cond func() bool) {
	t.Helper()
	WaitForExplained(t, deadline, msg, cond, nil)
}

// WaitForExplained is WaitFor whose failure also reports explain(): the state that says why
// the condition did not hold, for a failure too rare to reproduce at will.
func WaitForExplained(t testing.TB, deadline time.Duration, msg string, cond func() bool, explain func() string) {
	t.Helper()
	end := time.Now().Add(deadline)
	delay := time.Millisecond
	for {
		if cond() {
			return
		}
		if time.Now().After(end) {
			if explain != nil {
				t.Fatalf("timed out after %s waiting for: %s\n%s", deadline, msg, explain())
			}
			t.Fatalf("timed out after %s waiting for: %s", deadline, msg)
		}
		time.Sleep(delay)
		delay = min(delay*2, 50*time.Millisecond)
	}
}

// Logger returns a logger that writes through t.Log, so a failing test shows its logs and a
// passing one stays quiet. Records logged after the test ends are dropped.
func Logger(t testing.TB) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	level := slog.LevelDebug
	if _, ok := t.(*testing.B); ok {
		level = slog.LevelInfo // benchmarks measure the production log level
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// Context returns a context cancelled when the test ends.
func Context(t testing.TB) context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return ctx
}
