package broker

import (
	"context"
	"sync"

	"github.com/claudemesh/broker/broker/startstop"
)

// service is the start/stop base every background part of the broker embeds.
type service struct{ startstop.Base }

func (s *service) start(ctx context.Context, loop func(context.Context)) error {
	return s.Run(ctx, loop)
}

// queue collects work from many goroutines for one loop that takes it all at once: every item
// that arrived while the previous batch was being handled goes into the next one. The
// recorder, the ender and the pusher are built on it.
type queue[T any] struct {
	mu    sync.Mutex
	items []T
	wake  chan struct{}
}

func newQueue[T any]() *queue[T] { return &queue[T]{wake: make(chan struct{}, 1)} }

// add queues items and wakes the loop.
func (q *queue[T]) add(items ...T) {
	q.mu.Lock()
	q.items = append(q.items, items...)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// len is how many items are queued.
func (q *queue[T]) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items)
}

// take returns everything queued.
func (q *queue[T]) take() []T {
	q.mu.Lock()
	defer q.mu.Unlock()
	items := q.items
	q.items = nil
	return items
}

// putBack returns items that could not be handled to the front of the queue, for a retry.
func (q *queue[T]) putBack(items []T) {
	q.mu.Lock()
	q.items = append(items, q.items...)
	q.mu.Unlock()
}
