package broker

import (
	"sync"
	"time"
)

// A push to a session that does not ack counts as delivered once it was written to the socket
// (the contract). Written here means the client's TCP acknowledged its last byte, not that our
// kernel took it: bytes still in our send queue when the socket closes (a client that stopped
// reading, closed 4008 and gone before the linger ended; more than maxLingering closing at
// once; a replica stopping) never reach the client, and a push recorded as delivered when the
// kernel took it was lost for good. So such a push waits here, at its place in the stream,
// until the kernel's count of unacknowledged bytes (SIOCOUTQ) falls below it. At the close, what
// is confirmed is recorded first (the session's end then releases the rest to pending, to come
// again at the next connection with the same messageId); what the client acknowledges while the
// socket lingers is recorded then, which spares the next connection a duplicate unless it was
// already pushed there. What reached the client's kernel and was never read (its process died)
// is lost: only client_ack covers that.
//
// Cost: one ioctl per connection with pushes waiting, every ackPollEvery; a connection whose
// client acknowledges nothing is looked at less and less often, down to every ackPollMax.
const (
	ackPollEvery = 10 * time.Millisecond
	ackPollMax   = 320 * time.Millisecond
)

// kernelAcks is a lingerConn's pushes written and not yet acknowledged by the client's TCP.
type kernelAcks struct {
	ackMu   sync.Mutex
	unacked []unackedPush // in stream order
	record  func(int64)
	watched bool // in the lingerer's acking set
	done    bool // closed: nothing more is confirmed
	gap     time.Duration
	next    time.Time // the poller's next look
}

// unackedPush is a delivery whose frame ends at byte end of the stream.
type unackedPush struct {
	id, end int64
}

// awaitAck queues delivery id, whose frame ends at byte end, until the client acknowledges it.
func (c *lingerConn) awaitAck(id, end int64, record func(int64)) {
	c.ackMu.Lock()
	defer c.ackMu.Unlock()
	if c.done {
		return // closed: its session's end releases it to pending
	}
	c.unacked = append(c.unacked, unackedPush{id: id, end: end})
	c.record = record
	if !c.watched {
		c.watched = true
		c.gap, c.next = ackPollEvery, time.Time{}
		c.l.watch(c)
	}
}

// confirmLocked records the pushes the client's TCP has acknowledged, and reports how many.
// Under ackMu, with the socket open.
func (c *lingerConn) confirmLocked() int {
	sent := c.sent.Load() // before the kernel's count: a write between makes acked smaller, never larger
	q := unsentBytes(c.tcp)
	if q < 0 {
		q = 0 // the kernel can't tell (not Linux): taken by it counts, as before
	}
	acked := sent - int64(q)
	n := 0
	for n < len(c.unacked) && c.unacked[n].end <= acked {
		c.record(c.unacked[n].id)
		n++
	}
	switch {
	case n == len(c.unacked) && cap(c.unacked) > 64:
		// A client that stopped reading had one waiting per frame in the send queue
		// (thousands): a backlog's memory goes with it, not with the session's life.
		c.unacked = nil
	case n > 0:
		c.unacked = append(c.unacked[:0], c.unacked[n:]...)
	}
	return n
}

// confirmAcks records what the client has acknowledged so far.
func (c *lingerConn) confirmAcks() {
	c.ackMu.Lock()
	defer c.ackMu.Unlock()
	if !c.done && len(c.unacked) > 0 {
		c.confirmLocked()
	}
}

// finishAcks records what the client has acknowledged, just before the socket closes; the rest
// is never recorded. Called before the close, so that the session's end (which follows it)
// releases only what did not arrive.
func (c *lingerConn) finishAcks() {
	c.ackMu.Lock()
	defer c.ackMu.Unlock()
	if c.done {
		return
	}
	if len(c.unacked) > 0 {
		c.confirmLocked()
	}
	c.done, c.unacked = true, nil
	if c.watched {
		c.watched = false
		c.l.unwatch(c)
	}
}

// watch adds c to the connections whose pushes wait for the client's TCP, and starts the
// poller if it is not running. Under c.ackMu.
func (l *lingerer) watch(c *lingerConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.acking == nil {
		l.acking = map[*lingerConn]struct{}{}
	}
	l.acking[c] = struct{}{}
	if !l.polling {
		l.polling = true
		go l.pollAcks()
	}
}

// unwatch removes c. Under c.ackMu.
func (l *lingerer) unwatch(c *lingerConn) {
	l.mu.Lock()
	delete(l.acking, c)
	l.mu.Unlock()
}

// pollAcks looks at the watched connections every ackPollEvery, until none is left.
func (l *lingerer) pollAcks() {
	t := time.NewTicker(ackPollEvery)
	defer t.Stop()
	var conns []*lingerConn
	for now := range t.C {
		l.mu.Lock()
		if len(l.acking) == 0 {
			l.polling = false
			l.mu.Unlock()
			return
		}
		conns = conns[:0]
		for c := range l.acking {
			conns = append(conns, c)
		}
		l.mu.Unlock()
		for _, c := range conns {
			c.pollAck(now)
		}
		clear(conns) // no connection is kept past its turn
	}
}

// pollAck confirms what c's client acknowledged, if its turn has come; one that acknowledged
// nothing waits twice as long for the next look, up to ackPollMax.
func (c *lingerConn) pollAck(now time.Time) {
	c.ackMu.Lock()
	defer c.ackMu.Unlock()
	if c.done || !c.watched || now.Before(c.next) {
		return
	}
	if c.confirmLocked() > 0 {
		c.gap = ackPollEvery
	} else {
		c.gap = min(2*c.gap, ackPollMax)
	}
	c.next = now.Add(c.gap - ackPollEvery/2) // the tick that comes a gap later
	if len(c.unacked) == 0 {
		c.watched = false
		c.l.unwatch(c)
	}
}
