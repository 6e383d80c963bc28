package main

import (
	"context"
	"io"
	"log/slog"
	"math"
	"os"
	"runtime/debug"
	"testing"

	"github.com/stretchr/testify/require"
)

// A replica started without GOMEMLIMIT gets a soft memory limit below the machine's memory, so
// a connect storm's raised collection target runs the collector harder near it instead of
// growing the heap into the kernel's OOM killer; an operator's GOMEMLIMIT is left alone.
func TestTuneGCSetsASoftMemoryLimitUnlessGiven(t *testing.T) {
	prev := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(prev) })
	t.Setenv("GOGC", "100") // the target is the operator's: no tuner goroutine to outlive the test
	t.Setenv("AUTOMEMLIMIT", "")
	require.NoError(t, os.Unsetenv("AUTOMEMLIMIT")) // restored by t.Setenv's cleanup
	t.Setenv("GOMEMLIMIT", "")
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	debug.SetMemoryLimit(math.MaxInt64)
	tuneGC(ctx, logger)
	limit := debug.SetMemoryLimit(-1)
	require.Less(t, limit, int64(math.MaxInt64), "a limit is set")
	require.Greater(t, limit, int64(64<<20), "a share of the machine's memory, not a token amount")

	debug.SetMemoryLimit(math.MaxInt64)
	t.Setenv("GOMEMLIMIT", "1GiB") // the runtime read it at start; here only the broker's reading matters
	tuneGC(ctx, logger)
	require.Equal(t, int64(math.MaxInt64), debug.SetMemoryLimit(-1), "the operator's setting stands")
}
