package broker

import (
	"context"
	"time"

	"github.com/claudemesh/broker/broker/startstop"
)

// guard enforces the local deadlines and sends the pings with one ticker for the whole
// replica (no timer per socket): hellos that did not come in time, sessions that stopped
// reading, and every session's ping each pingPeriod. A session whose push window stayed full
// without a single write for StallTimeout is closed with 4008 and what was claimed for it goes
// back to pending; the timeout is shorter than writeWait so the close frame can still get out
// to a peer that reads slowly.
type guard struct {
	service
	peers  *peers
	pusher *pusher
	hub    *hub
	stall  time.Duration
	// pingEvery is the ping period (pingPeriod); each tick pings the sessions of one of the
	// period's slots.
	pingEvery time.Duration
}

// guardTick is the guard's period.
const guardTick = 250 * time.Millisecond

// Start checks four times a second until Stop.
func (g *guard) Start(ctx context.Context) error {
	return g.start(ctx, func(ctx context.Context) {
		slot, slots := 0, max(int(g.pingEvery/guardTick), 1)
		g.hub.setPingSlots(slots)
		startstop.Tick(ctx, guardTick, func(now time.Time) {
			g.peers.closeHelloLate(now)
			for _, sess := range g.pusher.stalled(now, g.stall) {
				go g.peers.closeSlowConsumer(sess.ws, "pushes not read") // its close frame may wait up to a second
			}
			g.hub.ping(slot, now)
			slot = (slot + 1) % slots
		})
	})
}
