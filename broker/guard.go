package broker

import (
	"context"
	"time"

	"github.com/claudemesh/broker/broker/startstop"
)

// guard enforces the local deadlines with one ticker for the whole replica (no timer per
// socket): hellos that did not come in time, and sessions that stopped reading. A session
// whose push window stayed full without a single write for StallTimeout is closed with 4008
// and what was claimed for it goes back to pending; the timeout is shorter than writeWait so
// the close frame can still get out to a peer that reads slowly.
type guard struct {
	service
	peers  *peers
	pusher *pusher
	stall  time.Duration
}

// Start checks four times a second until Stop.
func (g *guard) Start(ctx context.Context) error {
	return g.start(ctx, func(ctx context.Context) {
		startstop.Tick(ctx, 250*time.Millisecond, func(now time.Time) {
			g.peers.closeHelloLate(now)
			for _, sess := range g.pusher.stalled(now, g.stall) {
				go g.peers.closeSlowConsumer(sess.ws, "pushes not read") // its close frame may wait up to a second
			}
		})
	})
}
