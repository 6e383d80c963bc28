package broker

import (
	"crypto/ed25519"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/dbtest"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	cl, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	sv, err := ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { _ = cl.Close(); _ = sv.Close() })
	return cl, sv
}

// writeOn writes until an error and reports on written how much the kernel took: what the
// broker counts as written to a client that does not ack. full is set once a write has
// waited (both sides' buffers are full); the writer then stays blocked, as melody's does.
func writeOn(c net.Conn, full *atomic.Bool) <-chan int {
	written := make(chan int, 1)
	go func() {
		var n int
		chunk := make([]byte, 16<<10)
		_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		for {
			m, err := c.Write(chunk)
			n += m
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && !full.Load() {
				full.Store(true)
				_ = c.SetWriteDeadline(time.Time{})
				continue
			}
			if err != nil {
				written <- n
				return
			}
			if !full.Load() {
				_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			}
		}
	}()
	return written
}

// A socket the broker closes while its pushes still sit unsent (the client stopped reading)
// delivers every byte it was given once the client reads again, even though the client wrote
// after the close (a pong, its close frame): a plain close would answer that write with a
// reset and drop what was queued.
func TestClosedSocketDeliversWhatItWasGiven(t *testing.T) {
	t.Parallel()
	cl, sv := tcpPair(t)
	l := newLingerer(10 * time.Second)
	sc := l.wrap(sv)
	lingerOnClose(sc) // a session's connection

	// The WebSocket's reader, blocked in a read as melody's is.
	readErr := make(chan error, 1)
	go func() {
		_, err := sc.Read(make([]byte, 64))
		readErr <- err
	}()
	var full atomic.Bool
	written := writeOn(sc, &full)
	dbtest.WaitFor(t, 10*time.Second, "the socket's buffers full", full.Load)
	var n int

	require.NoError(t, sc.Close())
	select {
	case err := <-readErr:
		require.ErrorIs(t, err, net.ErrClosed, "the reader sees a closed socket at once")
	case <-time.After(5 * time.Second):
		t.Fatal("the reader was not woken by the close")
	}
	select {
	case n = <-written:
	case <-time.After(5 * time.Second):
		t.Fatal("the blocked writer was not woken by the close")
	}

	// The client answers (its close frame), then reads what is there.
	_, err := cl.Write([]byte("bye"))
	require.NoError(t, err)
	require.NoError(t, cl.SetReadDeadline(time.Now().Add(10*time.Second)))
	got, err := io.Copy(io.Discard, cl)
	require.NoError(t, err, "the client reads to a clean end, not a reset")
	require.Equal(t, int64(n), got, "every byte the broker wrote reaches the client")
	_ = cl.Close()
	dbtest.WaitFor(t, 5*time.Second, "the lingering socket closed once the client did", func() bool {
		return l.lingerCount() == 0
	})
}

// closedNow reports whether the server's socket itself is closed (not lingering).
func closedNow(t *testing.T, sv net.Conn) bool {
	t.Helper()
	if err := sv.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		return errors.Is(err, net.ErrClosed)
	}
	_, err := sv.Read(make([]byte, 1))
	return errors.Is(err, net.ErrClosed)
}

// Lingering is bounded: only connections that said hello linger, at most maxLingering of
// them, each for the linger time at most; stop lets them end within its grace, then cuts them.
func TestLingeringIsBounded(t *testing.T) {
	t.Parallel()
	l := newLingerer(time.Hour)
	var socks []net.Conn
	for range 3 {
		_, sv := tcpPair(t)
		sc := l.wrap(sv)
		lingerOnClose(sc)
		require.NoError(t, sc.Close())
		socks = append(socks, sv)
	}
	require.Equal(t, 3, l.lingerCount())

	// A socket that never said hello closes at once, and takes no slot.
	_, sv := tcpPair(t)
	require.NoError(t, l.wrap(sv).Close())
	require.True(t, closedNow(t, sv), "closed at once without a hello")
	require.Equal(t, 3, l.lingerCount())

	// Full: the next one closes at once.
	full := newLingerer(time.Hour)
	for range maxLingering {
		full.mu.Lock()
		full.open[&lingerConn{}] = struct{}{}
		full.mu.Unlock()
	}
	_, sv = tcpPair(t)
	sc := full.wrap(sv)
	lingerOnClose(sc)
	require.NoError(t, sc.Close())
	require.True(t, closedNow(t, sv), "closed at once when maxLingering are lingering")
	require.Equal(t, maxLingering, full.lingerCount())

	// stop: one whose client closes ends within the grace, the others are cut after it.
	cl, sv := tcpPair(t)
	sc = l.wrap(sv)
	lingerOnClose(sc)
	require.NoError(t, sc.Close())
	require.NoError(t, cl.Close())
	dbtest.WaitFor(t, 5*time.Second, "the linger ended when its client closed", func() bool { return l.lingerCount() == 3 })
	l.stop(0)
	require.Equal(t, 0, l.lingerCount())
	require.Equal(t, 3, l.cut, "no grace: the three still lingering were cut")
	for _, sv := range socks {
		require.True(t, closedNow(t, sv), "stop closed the lingering socket")
	}

	// stop waits for lingering sockets whose clients close within its grace.
	g := newLingerer(time.Hour)
	cl, sv = tcpPair(t)
	sc = g.wrap(sv)
	lingerOnClose(sc)
	require.NoError(t, sc.Close())
	stopped := make(chan struct{})
	go func() { g.stop(time.Hour); close(stopped) }()
	dbtest.WaitFor(t, 5*time.Second, "stop under way", func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return g.done
	})
	require.NoError(t, cl.Close())
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("stop did not return once the last lingering socket ended")
	}
	require.Equal(t, 0, g.cut, "the socket ended on its own within the grace, not cut")

	// A short linger ends on its own.
	short := newLingerer(50 * time.Millisecond)
	_, sv = tcpPair(t)
	sc = short.wrap(sv)
	lingerOnClose(sc)
	require.NoError(t, sc.Close())
	dbtest.WaitFor(t, 5*time.Second, "the linger ended on its own", func() bool { return short.lingerCount() == 0 })
	require.True(t, closedNow(t, sv))
}

// Sessions' sockets linger when closed, for either kind of hello: the broker marks them at the
// hello. (The tests above mark theirs by hand.)
func TestSessionSocketsLinger(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	for _, k := range helloKinds {
		mem := m.member("m-" + k.name)
		_, key, err := ed25519.GenerateKey(nil)
		require.NoError(t, err)
		cl := m.dial(0, mem, k.with(key))
		sess := c.nodes[0].hub.get(cl.HelloAck().PresenceID)
		require.NotNil(t, sess, k.name)
		lc, ok := sess.ws.WebsocketConnection().UnderlyingConn().(*lingerConn)
		require.True(t, ok, "%s: the socket is wrapped", k.name)
		require.True(t, lc.lingers.Load(), "%s: marked to linger at the hello", k.name)
	}
}

// A client still reading what was queued for it when the linger time passes keeps the socket
// while it makes progress: closed then, the pong it sends meanwhile was answered with a reset
// and the rest of its pushes, recorded as delivered, never arrived.
func TestLingerWaitsForAClientStillReading(t *testing.T) {
	t.Parallel()
	cl, sv := tcpPair(t)
	l := newLingerer(100 * time.Millisecond)
	n := closedFull(t, l, sv)

	// A slow client: 32 KiB every 5 ms, far longer in all than the linger time.
	got := make(chan int64, 1)
	go func() {
		var total int64
		buf := make([]byte, 32<<10)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		_ = cl.SetReadDeadline(time.Now().Add(30 * time.Second))
		for range tick.C {
			m, err := cl.Read(buf)
			total += int64(m)
			if err != nil {
				got <- total
				return
			}
		}
	}()
	dbtest.WaitFor(t, 10*time.Second, "the linger extended twice for the reading client", func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.extended >= 2
	})
	_, err := cl.Write([]byte("pong"))
	require.NoError(t, err)
	select {
	case total := <-got:
		require.Equal(t, int64(n), total, "every byte the broker wrote reaches the client")
	case <-time.After(30 * time.Second):
		t.Fatal("the client never reached the end")
	}
	dbtest.WaitFor(t, 5*time.Second, "the lingering socket closed", func() bool { return l.lingerCount() == 0 })
}

// A client closed for not reading (4008) has stopped for a while by definition: one that
// resumes a moment after the close, past lingerWait, still gets every byte queued for it.
// The socket was closed after the first lingerWait without the client reading, and the pong it
// sent on resuming was answered with a reset: what the kernel still held, pushes recorded as
// delivered for a client without client_ack, was lost.
func TestLingerWaitsForAClientThatResumesReading(t *testing.T) {
	t.Parallel()
	cl, sv := tcpPair(t)
	l := newLingerer(100 * time.Millisecond)
	n := closedFull(t, l, sv)
	// The client reads nothing until the linger's first wait has passed: extended without a
	// byte taken, or the socket given up.
	dbtest.WaitFor(t, 10*time.Second, "the first linger wait over", func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.extended >= 1 || len(l.open) == 0
	})
	// It resumes: a pong for the ping it had read, then everything queued for it.
	_, err := cl.Write([]byte("pong"))
	require.NoError(t, err)
	var total int64
	buf := make([]byte, 64<<10)
	_ = cl.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		m, err := cl.Read(buf)
		total += int64(m)
		if err != nil {
			require.ErrorIs(t, err, io.EOF, "the socket ended by its FIN, not a reset")
			break
		}
	}
	require.Equal(t, int64(n), total, "every byte the broker wrote reaches the client")
	dbtest.WaitFor(t, 5*time.Second, "the lingering socket closed", func() bool { return l.lingerCount() == 0 })
}

// closedFull wraps sv in l as a session's connection, writes to it until its buffers and the
// client's are full, closes it (it lingers) and returns how many bytes the writes got out.
func closedFull(t *testing.T, l *lingerer, sv net.Conn) int {
	t.Helper()
	sc := l.wrap(sv)
	lingerOnClose(sc)
	var full atomic.Bool
	written := writeOn(sc, &full)
	dbtest.WaitFor(t, 10*time.Second, "the socket's buffers full", full.Load)
	require.NoError(t, sc.Close())
	return <-written
}
