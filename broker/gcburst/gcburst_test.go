package gcburst

import (
	"context"
	"runtime/metrics"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The decision: a replica allocating little keeps its low target; one allocating many times
// its live heap a second gets the high one at once, keeps it while it stays busy, and goes
// back to the low one only once it has been calm for Hold.
func TestTargetRisesInAStormAndFallsWhenCalm(t *testing.T) {
	tu := New(50, nil)
	const live = 100 << 20 // a replica of a few thousand sessions
	at := time.Unix(1000, 0)
	var s state
	var allocs uint64
	read := func(perSecond uint64, after time.Duration) bool {
		at = at.Add(after)
		allocs += perSecond * uint64(after) / uint64(time.Second)
		s = tu.next(s, allocs, live, at)
		return s.burst
	}
	require.False(t, read(0, 0), "a first reading decides nothing")
	for range 20 {
		// Idle sessions: pings, a message now and then; 10 MB a second is a collection every 5 s.
		require.False(t, read(10<<20, 250*time.Millisecond), "calm: the low target stays")
	}
	require.True(t, read(500<<20, 250*time.Millisecond), "a storm: ten collections a second at 50 %")
	for range 20 {
		require.True(t, read(60<<20, 250*time.Millisecond), "still busy (more than half a collection a second): it goes on")
	}
	require.True(t, read(1<<20, 2*time.Second), "calm for less than Hold: it goes on")
	require.False(t, read(1<<20, 1500*time.Millisecond), "calm for Hold: the low target is back")
	require.True(t, read(500<<20, 250*time.Millisecond), "and rises again at the next storm")
}

// A small process (a near-empty heap) allocating a little is not in a storm: its rate is
// counted against 1 MiB at least.
func TestSmallHeapIsNotAStorm(t *testing.T) {
	tu := New(50, nil)
	at := time.Unix(1000, 0)
	s := tu.next(state{}, 0, 64<<10, at)
	s = tu.next(s, 256<<10, 64<<10, at.Add(time.Second))
	require.False(t, s.burst)
}

// Run, in a real process: allocating fast raises the runtime's target, and when Run ends the
// low target is set again.
func TestRunSetsTheRuntimeTarget(t *testing.T) {
	tu := &Tuner{Base: 50, Burst: 400, Hot: 2, Calm: 0.5, Hold: 50 * time.Millisecond, Every: 5 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); tu.Run(ctx) }()
	gogc := func() uint64 {
		s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
		metrics.Read(s)
		return s[0].Value.Uint64()
	}
	var sink [][]byte
	deadline := time.Now().Add(20 * time.Second)
	for gogc() != 400 {
		require.True(t, time.Now().Before(deadline), "the target never rose while allocating")
		for range 1000 {
			sink = append(sink, make([]byte, 4096))
		}
		if len(sink) > 20000 {
			sink = sink[:0]
		}
	}
	cancel()
	<-done
	require.Equal(t, uint64(50), gogc(), "Run leaves the low target set")
}
