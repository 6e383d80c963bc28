// Package startstop is the lifecycle every long-running part of a replica shares: Start runs
// one loop on a goroutine until Stop or until Start's context ends; Stop cancels the loop and
// waits for it (or for its own context), and may be called again to keep waiting. Safe before
// Start and twice. The broker's services and pgbus's listener and heartbeat embed it.
package startstop

import (
	"context"
	"errors"
	"sync"
	"time"
)

// ErrStarted is returned by a second Start.
var ErrStarted = errors.New("already started")

// Base is embedded by a service; its zero value is ready.
type Base struct {
	mu     sync.Mutex
	cancel context.CancelFunc
	done   chan struct{}
}

// Run starts loop in the background, once.
func (b *Base) Run(ctx context.Context, loop func(context.Context)) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done != nil {
		return ErrStarted
	}
	ctx, b.cancel = context.WithCancel(ctx)
	b.done = make(chan struct{})
	done := b.done
	go func() {
		defer close(done)
		loop(ctx)
	}()
	return nil
}

// Stop ends the loop and waits for it to return or for ctx.
func (b *Base) Stop(ctx context.Context) error {
	b.mu.Lock()
	cancel, done := b.cancel, b.done
	b.mu.Unlock()
	if done == nil {
		return nil
	}
	cancel()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Tick calls f every interval until ctx ends (the first call after one interval).
func Tick(ctx context.Context, interval time.Duration, f func(now time.Time)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			f(now)
		}
	}
}
