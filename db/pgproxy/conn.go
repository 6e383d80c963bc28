package pgproxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Flights counts client→server flights by kind; see the package documentation.
type Flights struct {
	// Startup: flights that open or close a session (before the first ReadyForQuery, cancel
	// requests, a lone Terminate).
	Startup int64
	// Statement: the other flights of a plaintext Postgres session.
	Statement int64
	// Opaque: flights of connections the proxy cannot read (TLS, not Postgres).
	Opaque int64
}

// Total is the number of flights of every kind.
func (f Flights) Total() int64 { return f.Startup + f.Statement + f.Opaque }

// Sub returns f minus an earlier snapshot g.
func (f Flights) Sub(g Flights) Flights {
	return Flights{Startup: f.Startup - g.Startup, Statement: f.Statement - g.Statement, Opaque: f.Opaque - g.Opaque}
}

type kind int

const (
	kindStartup kind = iota
	kindStatement
	kindOpaque
)

type counters struct{ n [3]atomic.Int64 }

func (c *counters) add(k kind) { c.n[k].Add(1) }

func (c *counters) load() Flights {
	return Flights{Startup: c.n[kindStartup].Load(), Statement: c.n[kindStatement].Load(), Opaque: c.n[kindOpaque].Load()}
}

func (c *counters) reset() {
	for i := range c.n {
		c.n[i].Store(0)
	}
}

// phase is how far the proxy has followed a connection's protocol.
type phase int

const (
	phaseInitial     phase = iota // waiting for the client's first message
	phaseNegotiating              // SSLRequest or GSSENCRequest sent: the server answers one byte
	phaseStartup                  // StartupMessage or CancelRequest sent: until the first ReadyForQuery
	phaseReady                    // the session runs statements
	phaseOpaque                   // encrypted, or not Postgres
)

// Request codes of the untyped first messages (Postgres protocol, "Message Formats").
const (
	sslRequestCode    = 80877103
	gssEncRequestCode = 80877104
	cancelRequestCode = 80877102
	maxStartupLen     = 10000 // the server rejects longer startup packets
)

var terminateMsg = []byte{'X', 0, 0, 0, 4}

// conn is one proxied client connection and its server connection.
type conn struct {
	p              *Proxy
	id             uint64
	client, server net.Conn
	up, down       *direction // client→server, server→client
	flights        counters
	excluded       atomic.Bool
	done           chan struct{} // closed by kill
	killOnce       sync.Once
	halfClosed     atomic.Int32 // directions that ended with EOF and were passed on

	mu         sync.Mutex // guards phase, clientLast, hdr, hdrN
	phase      phase
	clientLast bool // the last bytes on the connection went client→server
	hdr        [8]byte
	hdrN       int

	// Owned by the server→client reader.
	sniffDone bool
	msg       [5]byte
	msgN      int
	skip      int
}

func newConn(p *Proxy, id uint64, client, server net.Conn) *conn {
	c := &conn{p: p, id: id, client: client, server: server, done: make(chan struct{})}
	c.up = newDirection(c, client, server, false)
	c.down = newDirection(c, server, client, true)
	return c
}

// run pumps both directions until the connection ends.
func (c *conn) run() {
	var wg sync.WaitGroup
	for _, d := range []*direction{c.up, c.down} {
		wg.Add(2)
		go func() { defer wg.Done(); d.readLoop() }()
		go func() { defer wg.Done(); d.writeLoop() }()
	}
	wg.Wait()
	c.kill()
}

// kill closes both sockets, which ends every goroutine of the connection.
func (c *conn) kill() {
	c.killOnce.Do(func() {
		close(c.done)
		_ = c.client.Close()
		_ = c.server.Close()
	})
}

// finish passes an EOF on: half-close dst, and end the connection once both sides have.
func (c *conn) finish(dst net.Conn) {
	if cw, ok := dst.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		if c.halfClosed.Add(1) == 2 {
			c.kill()
		}
		return
	}
	c.kill()
}

func (c *conn) stats() ConnStats {
	return ConnStats{ID: c.id, Client: c.client.RemoteAddr(), Flights: c.flights.load(), Excluded: c.excluded.Load()}
}

func (c *conn) count(k kind) {
	c.flights.add(k)
	if !c.excluded.Load() {
		c.p.total.add(k)
	}
}

// clientRead runs on the client→server reader for every read, when the bytes arrive.
func (c *conn) clientRead(data []byte) {
	c.mu.Lock()
	newFlight := !c.clientLast
	c.clientLast = true
	if c.phase == phaseInitial {
		c.sniffClient(data)
	}
	k := kindStartup
	switch c.phase {
	case phaseReady:
		if !bytes.Equal(data, terminateMsg) {
			k = kindStatement
		}
	case phaseOpaque:
		k = kindOpaque
	}
	c.mu.Unlock()
	if newFlight {
		c.count(k)
	}
}

// sniffClient reads the untyped first message: its length and request code.
func (c *conn) sniffClient(data []byte) {
	c.hdrN += copy(c.hdr[c.hdrN:], data)
	if c.hdrN < len(c.hdr) {
		return
	}
	c.hdrN = 0
	length := binary.BigEndian.Uint32(c.hdr[0:4])
	code := binary.BigEndian.Uint32(c.hdr[4:8])
	switch {
	case length == 8 && (code == sslRequestCode || code == gssEncRequestCode):
		c.phase = phaseNegotiating
	case length == 16 && code == cancelRequestCode:
		c.phase = phaseStartup // the server answers by closing
	case code>>16 == 3 && length >= 8 && length <= maxStartupLen:
		c.phase = phaseStartup
	default:
		c.phase = phaseOpaque
	}
}

// serverRead runs on the server→client reader for every read. It reports whether data holds
// the first ReadyForQuery, which ends the startup phase once it is forwarded.
func (c *conn) serverRead(data []byte) (endsStartup bool) {
	if c.sniffDone {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch c.phase {
	case phaseNegotiating:
		if data[0] == 'N' { // refused: the client goes on in plaintext with a StartupMessage
			c.phase = phaseInitial
			c.hdrN = 0
			return false
		}
		c.phase = phaseOpaque // 'S' or 'G': encrypted from here on
		c.sniffDone = true
		return false
	case phaseStartup:
		return c.scanForReady(data)
	case phaseInitial: // the server spoke first: not Postgres
		c.phase = phaseOpaque
	}
	c.sniffDone = true
	return false
}

// scanForReady walks the server's typed messages (type byte, int32 length) up to the first
// ReadyForQuery ('Z').
func (c *conn) scanForReady(data []byte) bool {
	for len(data) > 0 {
		if c.skip > 0 {
			n := min(c.skip, len(data))
			c.skip -= n
			data = data[n:]
			continue
		}
		n := copy(c.msg[c.msgN:], data)
		c.msgN += n
		data = data[n:]
		if c.msgN < len(c.msg) {
			return false
		}
		c.msgN = 0
		length := int(binary.BigEndian.Uint32(c.msg[1:5]))
		if length < 4 {
			c.phase = phaseOpaque
			c.sniffDone = true
			return false
		}
		if c.msg[0] == 'Z' {
			c.sniffDone = true
			return true
		}
		c.skip = length - 4
	}
	return false
}

// serverWrote runs just before server bytes are written to the client: the client's next
// bytes start a new flight.
func (c *conn) serverWrote(endsStartup bool) {
	c.mu.Lock()
	c.clientLast = false
	if endsStartup && c.phase == phaseStartup {
		c.phase = phaseReady
	}
	c.mu.Unlock()
}

// direction is one way of a connection: a reader that stamps what it reads with the time it
// is due, and a writer that forwards it then. With no delay and nothing queued the reader
// writes straight through.
type direction struct {
	c        *conn
	src, dst net.Conn
	toClient bool

	wake  chan struct{} // reader → writer: a chunk or EOF was queued
	space chan struct{} // writer → reader: the queue shrank

	mu     sync.Mutex // guards the fields below
	q      []chunk    // q[head:] waits, oldest first
	head   int
	queued int  // bytes in q[head:]
	eof    bool // the reader saw EOF; the writer passes it on after q
	busy   bool // the writer is writing chunks it took from q
}

type chunk struct {
	data        []byte
	due         time.Time
	endsStartup bool
}

func newDirection(c *conn, src, dst net.Conn, toClient bool) *direction {
	return &direction{c: c, src: src, dst: dst, toClient: toClient,
		wake: make(chan struct{}, 1), space: make(chan struct{}, 1)}
}

func (d *direction) readLoop() {
	buf := make([]byte, 32<<10)
	for {
		n, err := d.src.Read(buf)
		if n > 0 {
			at := time.Now()
			var ends bool
			if d.toClient {
				ends = d.c.serverRead(buf[:n])
			} else {
				d.c.clientRead(buf[:n])
			}
			if !d.forward(buf[:n], at, ends) {
				return
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				d.mu.Lock()
				d.eof = true
				d.mu.Unlock()
				signal(d.wake)
			} else {
				d.c.kill()
			}
			return
		}
	}
}

// forward writes data now or queues it until at+delay. False means the connection is over.
func (d *direction) forward(data []byte, at time.Time, ends bool) bool {
	delay := d.c.p.Delay()
	d.mu.Lock()
	if delay == 0 && d.head == len(d.q) && !d.busy {
		// Nothing ahead of it: skip the queue. Only this goroutine adds to q, so nothing can
		// be queued behind it while it writes.
		d.mu.Unlock()
		if d.toClient {
			d.c.serverWrote(ends)
		}
		if _, err := d.dst.Write(data); err != nil {
			d.c.kill()
			return false
		}
		return true
	}
	for d.queued >= queueLimit {
		d.mu.Unlock()
		select {
		case <-d.space:
		case <-d.c.done:
			return false
		}
		d.mu.Lock()
	}
	d.q = append(d.q, chunk{data: bytes.Clone(data), due: at.Add(delay), endsStartup: ends})
	d.queued += len(data)
	d.mu.Unlock()
	signal(d.wake)
	return true
}

// writeLoop forwards queued chunks when they are due. It takes every chunk already due in
// one go and writes them with one writev, so a burst costs one delay, not one per chunk.
func (d *direction) writeLoop() {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	var batch net.Buffers
	for {
		d.mu.Lock()
		d.busy = false
		for d.head == len(d.q) && !d.eof {
			d.mu.Unlock()
			select {
			case <-d.wake:
			case <-d.c.done:
				return
			}
			d.mu.Lock()
		}
		if d.head < len(d.q) {
			if wait := time.Until(d.q[d.head].due); wait > 0 {
				d.mu.Unlock()
				timer.Reset(wait)
				select {
				case <-timer.C:
				case <-d.c.done:
					timer.Stop()
					return
				}
				continue
			}
		}
		now := time.Now()
		ends := false
		batch = batch[:0]
		for d.head < len(d.q) && !d.q[d.head].due.After(now) {
			ch := d.q[d.head]
			d.q[d.head] = chunk{}
			d.head++
			d.queued -= len(ch.data)
			batch = append(batch, ch.data)
			ends = ends || ch.endsStartup
		}
		d.compact()
		eof := d.eof && d.head == len(d.q)
		d.busy = len(batch) > 0
		d.mu.Unlock()
		if len(batch) > 0 {
			signal(d.space)
			if d.toClient {
				d.c.serverWrote(ends)
			}
			bufs := batch // WriteTo consumes its receiver
			if _, err := bufs.WriteTo(d.dst); err != nil {
				d.c.kill()
				return
			}
			clear(batch[:cap(batch)])
		}
		if eof {
			d.c.finish(d.dst)
			return
		}
	}
}

// compact drops the taken head of q so it does not grow without bound. Caller holds d.mu.
func (d *direction) compact() {
	switch {
	case d.head == len(d.q):
		d.q, d.head = d.q[:0], 0
	case d.head > 64 && d.head > len(d.q)/2:
		n := copy(d.q, d.q[d.head:])
		clear(d.q[n:])
		d.q, d.head = d.q[:n], 0
	}
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}
