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
		slots := max(int(g.pingEvery/guardTick), 1)
		g.hub.setPingSlots(slots)
		var last int64 // the last tick (of the clock's) whose slot was pinged
		startstop.Tick(ctx, guardTick, func(now time.Time) {
			g.peers.closeHelloLate(now)
			for _, sess := range g.pusher.stalled(now, g.stall) {
				g.peers.closeSlowConsumerLater(sess.ws, "pushes not read")
			}
			// Slots follow the clock, so late ticks never stretch the ping period past the
			// pong deadline: the slots of ticks that came late are pinged now.
			tick := time.Now().UnixNano() / int64(guardTick)
			if last == 0 {
				last = tick - 1
			}
			from := max(last+1, tick-int64(slots)+1)
			for t := from; t <= tick; t++ {
				g.hub.ping(int(t%int64(slots)), now)
			}
			last = tick
		})
	})
}
