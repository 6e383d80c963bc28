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
// it: one write for the run (4 % of the same profile; BENCHMARKS.md). Control frames (close,
// ping, pong) are never held: they go out at once, with whatever waits before them.
//
// A push written to a session that does not ack is delivered once the client's TCP has
// acknowledged its bytes (whenWritten, kernelack.go): one held back here has not even reached
// the kernel, and one lost with a failed write never does, so it goes back to pending when the
// session ends.
const (
	// coalesceMax bounds the bytes held back for one connection: frames that were queued for
	// it anyway, a few dozen pushes; a frame that would pass it goes out with the run.
	coalesceMax = 16 << 10
	// coalesceWait is how long held-back bytes wait at most when the frames said to be queued
	// behind them never come (their session closed meanwhile, say).
	coalesceWait = 2 * time.Millisecond
	// closeFlushWait bounds what Close spends on held-back bytes: waiting for a writer that is
	// appending, then the write itself. A socket too full to take them is a client not
	// reading; what it loses comes again (unacked) or stays pending (unrecorded).
	closeFlushWait = 2 * time.Millisecond
)

// coalesceBufs holds the buffers of connections between runs, so an idle session keeps none.
var coalesceBufs = sync.Pool{New: func() any { b := make([]byte, 0, coalesceMax); return &b }}

// coalescing is a lingerConn's write side: what it holds back and why.
type coalescing struct {
	// behind says whether the write pump has frames queued behind the one being written; nil
	// until the connection's session is known (coalesceFor).
	behind atomic.Pointer[func() bool]
	mu     sync.Mutex
	buf    *[]byte // held-back bytes; nil when none
	err    error   // a failed write of held-back bytes: the stream is broken from there
	timer  *time.Timer
	wait   time.Duration // coalesceWait unless set (tests)
	// sent counts the bytes the kernel took; a frame's place in the stream is read against it
	// and the kernel's unacknowledged bytes (kernelack.go).
	sent atomic.Int64
}

// whenWritten calls record(id) once the client's TCP has acknowledged the frame the write pump
// just reported written (kernelack.go): never, if a write of held-back bytes failed before this
// call (the frame may have been among them), or if the connection closes first. A connection
// that is not a lingerConn (TLS) records it now: handed to the kernel, as before.
func whenWritten(c net.Conn, id int64, record func(int64)) {
	lc, ok := c.(*lingerConn)
	if !ok {
		record(id)
		return
	}
	lc.mu.Lock()
	failed := lc.err != nil
	// Every byte of the frame is counted in sent or held in buf by now: its end is at most
	// this (later writes only make it later, which only delays the record).
	end := lc.sent.Load()
	if lc.buf != nil {
		end += int64(len(*lc.buf))
	}
	lc.mu.Unlock()
	if !failed {
		lc.awaitAck(id, end, record)
	}
}

// coalesceFor makes c (a connection from lingerer.wrap) hold frames back while behind reports
// more queued after them.
func coalesceFor(c net.Conn, behind func() bool) {
	if lc, ok := c.(*lingerConn); ok {
		lc.behind.Store(&behind)
	}
}

// isControlFrame says whether b starts a WebSocket control frame (opcode 8-15). A write that
// starts mid-frame (gorilla writes a large frame's payload separately) may look like one: it
// is then written at once, which is always safe.
func isControlFrame(b []byte) bool { return len(b) > 0 && b[0]&0x08 != 0 }

// coalesce writes b, or holds it back while more frames are queued behind it.
func (c *lingerConn) coalesce(b []byte) (int, error) {
	behind := c.behind.Load()
	if behind == nil {
		return c.write(b)
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
	if held+len(b) <= coalesceMax && !isControlFrame(b) && (*behind)() {
		if c.buf == nil {
			c.buf = coalesceBufs.Get().(*[]byte)
			wait := c.wait
			if wait == 0 {
				wait = coalesceWait
			}
			if c.timer == nil {
				c.timer = time.AfterFunc(wait, c.flushLate)
			} else {
				c.timer.Reset(wait)
			}
		}
		*c.buf = append(*c.buf, b...)
		return len(b), nil
	}
	if c.buf == nil {
		return c.write(b)
	}
	if err := c.flushLocked(b); err != nil {
		return 0, err
	}
	return len(b), nil
}

// flushLocked writes what is held back and then b (nil: nothing more) in one writev, under the
// write deadline set last.
func (c *lingerConn) flushLocked(b []byte) error {
	if c.buf == nil {
		return nil
	}
	c.timer.Stop()
	bufs := net.Buffers{*c.buf}
	if len(b) > 0 {
		bufs = append(bufs, b)
	}
	n, err := bufs.WriteTo(c.tcp)
	c.sent.Add(n)
	*c.buf = (*c.buf)[:0]
	coalesceBufs.Put(c.buf)
	c.buf = nil
	if err != nil {
		c.err = err
	}
	return err
}

// write writes b straight to the socket, counting what the kernel took.
func (c *lingerConn) write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.sent.Add(int64(n))
	return n, err
}

// flushLate writes held-back bytes whose followers did not come within coalesceWait. If that
// fails, the connection is closed: no write of the pump's would notice (its frames all count as
// written), so the session would stay open and keep what it was sent.
func (c *lingerConn) flushLate() {
	c.mu.Lock()
	failed := c.err == nil && c.flushLocked(nil) != nil
	c.mu.Unlock()
	if failed {
		_ = c.Close()
	}
}

// flushOnClose writes what is held back before the connection closes, within closeFlushWait. A
// write in progress (a socket that is full) is not waited for: the close wakes it.
func (c *lingerConn) flushOnClose() {
	deadline := time.Now().Add(closeFlushWait)
	for !c.mu.TryLock() {
		if time.Now().After(deadline) {
			return
		}
		time.Sleep(50 * time.Microsecond)
	}
	defer c.mu.Unlock()
	if c.buf == nil || c.err != nil {
		return
	}
	_ = c.Conn.SetWriteDeadline(deadline)
	_ = c.flushLocked(nil)
}
