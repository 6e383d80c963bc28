// Package gcburst owns the process's garbage-collection target while it runs: a low target
// (little memory per idle session) that rises while the process allocates fast, as in a
// connect storm, and comes back down when the allocation calms.
//
// A replica's memory is mostly idle sessions, so its target is low (50 %: the heap grows half
// its live size between collections). But in a storm the live heap itself grows with every
// session, and at 50 % the collector runs several times a second, each time marking every
// session's buffers and goroutine stacks: in a 10,000-session connect on 2 cores it took 44 %
// of the replicas' CPU (BENCHMARKS.md, stop 44), CPU the hellos and Postgres needed. At a
// higher target it runs a few times in all. The cost is memory while the burst lasts: the heap
// may grow to (1 + Burst/100) times its live size (the soft memory limit cmd/broker sets, or an
// operator's GOMEMLIMIT, caps it), and it is given back to the system when the burst ends.
package gcburst

import (
	"context"
	"log/slog"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Tuner sets the collector's target: Base while calm, Burst while the process allocates fast.
type Tuner struct {
	Base, Burst int // GC percents
	// Hot: the allocation rate, as collections a second the Base target would take, at which
	// the Burst target starts; Calm: the rate under which it ends, once it has lasted Hold.
	Hot, Calm float64
	Hold      time.Duration
	Every     time.Duration // how often the rates are read
	Log       *slog.Logger
}

// New is a Tuner with the broker's settings: the low target of an idle replica, raised eight
// times while the allocation would take more than two collections a second.
func New(base int, log *slog.Logger) *Tuner {
	return &Tuner{Base: base, Burst: 8 * base, Hot: 2, Calm: 0.5, Hold: 3 * time.Second,
		Every: 250 * time.Millisecond, Log: log}
}

// state is what the tuner decides from: its setting, when it last saw the process hot and its
// last reading.
type state struct {
	burst  bool
	hotAt  time.Time
	allocs uint64 // bytes allocated in all, at the last reading
	readAt time.Time
}

// next is the decision, apart from the runtime: from a reading (bytes allocated in all, the
// live heap), the new state.
func (t *Tuner) next(s state, allocs, live uint64, now time.Time) state {
	out := state{burst: s.burst, hotAt: s.hotAt, allocs: allocs, readAt: now}
	if s.readAt.IsZero() || !now.After(s.readAt) || allocs < s.allocs {
		return out // a first reading: no rate yet
	}
	perSecond := float64(allocs-s.allocs) / now.Sub(s.readAt).Seconds()
	// The collections a second the Base target would take: it collects each time the heap
	// has grown by Base % of what was live (a small heap counted as 1 MiB: a near-empty
	// process allocating a little is not in a storm).
	room := float64(max(live, 1<<20)) * float64(t.Base) / 100
	rate := perSecond / room
	switch {
	case rate >= t.Hot:
		out.burst, out.hotAt = true, now
	case rate >= t.Calm && s.burst:
		out.hotAt = now // still busy: the burst goes on
	case s.burst && now.Sub(s.hotAt) >= t.Hold:
		out.burst = false
	}
	return out
}

// Run reads the allocation rate every t.Every and sets the target, until ctx ends; it leaves
// the Base target set.
func (t *Tuner) Run(ctx context.Context) {
	samples := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}, {Name: "/gc/heap/live:bytes"}}
	tick := time.NewTicker(t.Every)
	defer tick.Stop()
	var s state
	debug.SetGCPercent(t.Base)
	defer debug.SetGCPercent(t.Base)
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			metrics.Read(samples)
			if samples[0].Value.Kind() != metrics.KindUint64 || samples[1].Value.Kind() != metrics.KindUint64 {
				return // a runtime without these: the Base target stays
			}
			n := t.next(s, samples[0].Value.Uint64(), samples[1].Value.Uint64(), now)
			if n.burst != s.burst {
				target := t.Base
				if n.burst {
					target = t.Burst
				}
				debug.SetGCPercent(target)
				if !n.burst {
					// The heap the burst let grow goes back now, not at the scavenger's pace (tens
					// of seconds): one collection, once a storm is over.
					debug.FreeOSMemory()
				}
				if t.Log != nil {
					t.Log.Debug("garbage-collection target set", "percent", target, "burst", n.burst)
				}
			}
			s = n
		}
	}
}
