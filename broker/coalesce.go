package broker

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// A session's frames leave its write pump one WebSocket frame, one write(2), at a time; under
// load that made the pumps' writes a fifth of the CPU of the Go benchmark's process (both
// replicas and their clients) at saturation. While the pump has more frames queued right behind
// the one it is writing, that frame waits in a buffer and the last of the run is written with
// it: one write for the run (4 % of the same profile; BENCHMARKS.md).
//
// A push written to a session that does not ack is delivered once it reaches the socket: one
// held back is recorded when its bytes are written (whenWritten), and one lost with a failed
// write is not, so it goes back to pending when the session ends.
const (
	// coalesceMax bounds the bytes held back for one connection.
	coalesceMax = 64 << 10
	// coalesceWait is how long held-back bytes wait at most when the frames said to be queued
	// behind them never come (their session closed meanwhile, say).
	coalesceWait = 2 * time.Millisecond
)

// coalesceBufs holds the buffers of connections between runs, so an idle session keeps none.
var coalesceBufs = sync.Pool{New: func() any { b := make([]byte, 0, 16<<10); return &b }}

// coalescing is a lingerConn's write side: what it holds back and why.
type coalescing struct {
	// behind says whether the write pump has frames queued behind the one being written; nil
	// until the connection's session is known (coalesceFor).
	behind atomic.Pointer[func() bool]
	mu     sync.Mutex
	buf    *[]byte // held-back bytes; nil when none
	err    error   // a failed write of held-back bytes: the stream is broken from there
	timer  *time.Timer
	// held are the deliveries in buf to record as written once it is (whenWritten).
	held   []int64
	record func(int64)
}

// whenWritten calls record(id) once the frame the write pump just reported written has reached
// the socket: now, unless its bytes are held back.
func whenWritten(c net.Conn, id int64, record func(int64)) {
	if lc, ok := c.(*lingerConn); ok {
		lc.mu.Lock()
		if lc.buf != nil {
			lc.held = append(lc.held, id)
			lc.record = record
			lc.mu.Unlock()
			return
		}
		lc.mu.Unlock()
	}
	record(id)
}

// coalesceFor makes c (a connection from lingerer.wrap) hold frames back while behind reports
// more queued after them.
func coalesceFor(c net.Conn, behind func() bool) {
	if lc, ok := c.(*lingerConn); ok {
		lc.behind.Store(&behind)
	}
}

// coalesce writes b, or holds it back while more frames are queued behind it.
func (c *lingerConn) coalesce(b []byte) (int, error) {
	behind := c.behind.Load()
	if behind == nil {
		return c.Conn.Write(b)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	held := 0
	if c.buf != nil {
		held = len(*c.buf)
	}
	if held+len(b) <= coalesceMax && (*behind)() {
		if c.buf == nil {
			c.buf = coalesceBufs.Get().(*[]byte)
			if c.timer == nil {
				c.timer = time.AfterFunc(coalesceWait, c.flushLate)
			} else {
				c.timer.Reset(coalesceWait)
			}
		}
		*c.buf = append(*c.buf, b...)
		return len(b), nil
	}
	if c.buf == nil {
		return c.Conn.Write(b)
	}
	*c.buf = append(*c.buf, b...)
	if err := c.flushLocked(); err != nil {
		return 0, err
	}
	return len(b), nil
}

// flushLocked writes what is held back, under the write deadline the pump set last.
func (c *lingerConn) flushLocked() error {
	if c.buf == nil {
		return nil
	}
	c.timer.Stop()
	_, err := c.Conn.Write(*c.buf)
	*c.buf = (*c.buf)[:0]
	if cap(*c.buf) <= coalesceMax*2 {
		coalesceBufs.Put(c.buf)
	}
	c.buf = nil
	if err != nil {
		c.err = err
	} else {
		for _, id := range c.held {
			c.record(id)
		}
	}
	c.held = c.held[:0]
	return err
}

// flushLate writes held-back bytes whose followers did not come within coalesceWait (also
// while Close runs: its own flush skips a write in progress).
func (c *lingerConn) flushLate() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		_ = c.flushLocked()
	}
}

// flushOnClose writes what is held back before the connection closes (the close frame is
// among it, or follows it), giving up after a moment: what is lost comes again at the
// session's next connection, unacked or still pending for one that does not (its record is dropped). A
// write in progress has the bytes already, or fails; Close
// must not wait for it (it wakes such a write).
func (c *lingerConn) flushOnClose() {
	if !c.mu.TryLock() {
		return
	}
	defer c.mu.Unlock()
	if c.buf == nil || c.err != nil {
		return
	}
	_ = c.Conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	_ = c.flushLocked()
}
