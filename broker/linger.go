package broker

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Closing a TCP socket whose receive queue holds unread bytes, or that receives bytes after
// close, makes the kernel answer with a reset, and a reset drops what the broker's side still
// had queued for the peer (and, on some stacks, what the peer had not read yet). A session the
// broker closes (slow consumer, kick, drain) can have pushes queued there, and the client
// typically still writes (a pong, its close frame): an abrupt close would drop those pushes. For
// a client without client_ack they are not lost (kernelack.go: only what its TCP acknowledged is
// recorded as delivered), but they come again at its next connection, after a reconnect's delay,
// and as duplicates of any it did get. So a session's connection is closed the way HTTP servers
// close theirs: shut the write side (the FIN follows what is queued), read and discard until the
// client closes or lingerWait passes, then close. Only connections that said hello linger
// (marked by lingerOnClose): a socket that never did has nothing of ours to lose, and must not
// take the slots.
//
// A client still reading what was queued for it when lingerWait passes (a slow link, a busy
// machine, megabytes of pushes) keeps the socket while its kernel's queue for the peer shrinks,
// lingerWait at a time up to lingerMax: closed under it, a pong or close frame it then sends is
// answered with a reset. For its first lingerIdle it keeps the socket while anything is queued
// for it, read or not: a client closed for not reading (4008) has by definition stopped for a
// while, and one that resumed a few seconds later (a collector, a loaded machine, a laptop
// waking) would get the rest only at its next connection.
const (
	lingerWait = 2 * time.Second
	lingerIdle = 10 * time.Second
	lingerMax  = 30 * time.Second
	// maxLingering bounds the sockets kept past their close, so that clients opening and
	// getting closed in a loop cannot make the replica hold a socket each for lingerWait;
	// past it, a socket is closed at once, as before. They come out of fdReserve.
	maxLingering = 128
)

// lingerer owns the connections that are lingering: at most maxLingering; stop waits for
// them within its grace, then cuts the rest.
type lingerer struct {
	wait time.Duration
	idle time.Duration // lingerIdle unless set (tests)
	max  time.Duration // lingerMax unless set (tests)
	mu   sync.Mutex
	open map[*lingerConn]struct{}
	done bool
	cut  int // connections stop cut before they ended on their own
	// extended counts the waits given to clients still reading (tests).
	extended int
	wg       sync.WaitGroup
	// acking: connections whose pushes wait for the client's TCP to acknowledge them, and
	// whether their poller runs (kernelack.go).
	acking  map[*lingerConn]struct{}
	polling bool
}

func newLingerer(wait time.Duration) *lingerer {
	return &lingerer{wait: wait, idle: lingerIdle, max: lingerMax, open: map[*lingerConn]struct{}{}}
}

// wrap returns c able to close with a linger when it is a plain TCP connection; others (TLS,
// whose CloseWrite waits behind a stalled write) are returned as they are.
func (l *lingerer) wrap(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	return &lingerConn{Conn: tc, tcp: tc, l: l}
}

// lingerOnClose makes c (a connection from wrap) linger when it is closed.
func lingerOnClose(c net.Conn) {
	if lc, ok := c.(*lingerConn); ok {
		lc.lingers.Store(true)
	}
}

// admit takes c into the lingering set, or reports that it must close at once.
func (l *lingerer) admit(c *lingerConn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.done || len(l.open) >= maxLingering {
		return false
	}
	l.open[c] = struct{}{}
	l.wg.Add(1)
	return true
}

func (l *lingerer) release(c *lingerConn) {
	l.mu.Lock()
	delete(l.open, c)
	l.mu.Unlock()
	l.wg.Done()
}

// stop closes any connection closed from now on at once, waits up to grace for the lingering
// ones to end (their clients reading the last pushes and the close frame), then cuts the rest;
// it returns when their goroutines are gone.
func (l *lingerer) stop(grace time.Duration) {
	l.mu.Lock()
	l.done = true
	l.mu.Unlock()
	ended := make(chan struct{})
	go func() {
		l.wg.Wait()
		close(ended)
	}()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-ended:
		return
	case <-t.C:
	}
	l.mu.Lock()
	for c := range l.open {
		_ = c.Conn.SetReadDeadline(time.Now()) // the drain sees its deadline and closes
		l.cut++
	}
	l.mu.Unlock()
	<-ended
}

// lingerCount reports how many connections are lingering (tests).
func (l *lingerer) lingerCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.open)
}

// lingerConn is a WebSocket's TCP connection whose Close lingers once lingerOnClose marked it.
// After Close, the WebSocket's own reader gets net.ErrClosed at once, as with a plain close,
// and its writer too (a write already blocked gets EPIPE); only the drain goroutine still
// reads the socket.
type lingerConn struct {
	net.Conn
	tcp     *net.TCPConn
	l       *lingerer
	lingers atomic.Bool
	closing atomic.Bool
	once    sync.Once
	// deadlines orders the WebSocket's own read deadlines (a pong pushes it out) before
	// Close's, so none can undo the wake-up of the reader or the drain's limit.
	deadlines sync.Mutex
	// reading is held across each read of the socket by the WebSocket's reader, so that the
	// drain starts only once that read has returned, and is the socket's only reader after.
	reading    sync.Mutex
	coalescing // frames written back to back go out in one write (coalesce.go)
	kernelAcks // pushes to a client that does not ack, until its TCP acknowledges them
}

func (c *lingerConn) Read(b []byte) (int, error) {
	if c.closing.Load() {
		return 0, c.closed()
	}
	c.reading.Lock()
	defer c.reading.Unlock()
	if c.closing.Load() {
		return 0, c.closed()
	}
	n, err := c.Conn.Read(b)
	if err != nil && c.closing.Load() {
		err = c.closed() // the deadline Close set to wake this read, not the client's doing
	}
	return n, err
}

// closed reports the close to the WebSocket's reader once Close, which may run on another
// goroutine (the write pump after a close frame, a slow consumer's close), is done: the reader
// then ends the session, whose end releases every push not recorded by then, and Close records
// those the client's TCP acknowledged (kernelack.go). Close waits for nothing the reader holds.
func (c *lingerConn) closed() error {
	c.once.Do(func() {}) // closing is set inside Close's Do: this waits for it to return
	return net.ErrClosed
}

func (c *lingerConn) Write(b []byte) (int, error) {
	if c.closing.Load() {
		return 0, net.ErrClosed
	}
	return c.coalesce(b)
}

func (c *lingerConn) SetReadDeadline(t time.Time) error {
	return c.setUnlessClosing(c.Conn.SetReadDeadline, t)
}

// SetWriteDeadline is refused once Close has begun, so that a control frame's write (gorilla
// sets its own deadline) cannot extend the one Close gives held-back bytes.
func (c *lingerConn) SetWriteDeadline(t time.Time) error {
	return c.setUnlessClosing(c.Conn.SetWriteDeadline, t)
}

// setUnlessClosing sets a deadline in the order Close sets its own, refusing once it has.
func (c *lingerConn) setUnlessClosing(set func(time.Time) error, t time.Time) error {
	c.deadlines.Lock()
	defer c.deadlines.Unlock()
	if c.closing.Load() {
		return net.ErrClosed
	}
	return set(t)
}

func (c *lingerConn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}

func (c *lingerConn) Close() error {
	var err error
	c.once.Do(func() {
		c.deadlines.Lock()
		defer c.deadlines.Unlock()
		c.closing.Store(true)
		c.flushOnClose()
		if !c.lingers.Load() || !c.l.admit(c) {
			c.finishAcks()
			err = c.Conn.Close()
			return
		}
		// What the client acknowledged is recorded before the session's end (which follows
		// the reader's wake-up below) releases the rest, and before the FIN, which the kernel
		// counts as unacknowledged until the client acknowledges it (with a delayed ACK): after
		// it, a push that was the last bytes sent could never be confirmed here.
		c.confirmAcks()
		// Shutting the write side wakes a write blocked on a full buffer (EPIPE); the deadline
		// in the past wakes the WebSocket's reader.
		if err = c.tcp.CloseWrite(); err != nil {
			c.finishAcks()
			_ = c.Conn.Close()
			c.l.release(c)
			return
		}
		_ = c.Conn.SetReadDeadline(time.Now())
		go c.drain()
	})
	return err
}

// drain reads and discards until the client closes, an error, or lingerWait, then closes.
func (c *lingerConn) drain() {
	defer c.l.release(c)
	c.reading.Lock() // the WebSocket reader's last read has returned
	defer c.reading.Unlock()
	c.l.mu.Lock()
	if !c.l.done {
		_ = c.Conn.SetReadDeadline(time.Now().Add(c.l.wait))
	}
	c.l.mu.Unlock()
	start, queued := time.Now(), unsentBytes(c.tcp)
	buf := make([]byte, 512)
	for {
		_, err := c.Conn.Read(buf)
		if err == nil {
			continue
		}
		if !isTimeout(err) || !c.l.extend(c, start, &queued) {
			break
		}
	}
	c.finishAcks()
	_ = c.Conn.Close()
}

// extend gives a lingering connection another wait while the kernel still holds bytes for the
// client: within lingerIdle of the close whether it reads or not, after that only if it took
// some since the last look; until lingerMax, and never once stop began.
func (l *lingerer) extend(c *lingerConn, start time.Time, queued *int) bool {
	n := unsentBytes(c.tcp)
	progress := n > 0 && (n < *queued || time.Since(start) < l.idle)
	*queued = n
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.done || !progress || time.Since(start) >= l.max {
		return false
	}
	_ = c.Conn.SetReadDeadline(time.Now().Add(l.wait))
	l.extended++
	return true
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
