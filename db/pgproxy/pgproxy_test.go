package pgproxy_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/db/pgproxy"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

// server is a TCP server for one test; handle runs per connection.
func server(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

func echo(c net.Conn) { _, _ = io.Copy(c, c) }

func start(t *testing.T, cfg pgproxy.Config) *pgproxy.Proxy {
	t.Helper()
	p, err := pgproxy.New(cfg)
	require.NoError(t, err)
	require.NoError(t, p.Start(context.Background()))
	t.Cleanup(func() { require.NoError(t, p.Close()) })
	return p
}

func dial(t *testing.T, p *pgproxy.Proxy) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", p.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	require.NoError(t, c.SetDeadline(time.Now().Add(30*time.Second))) // no test hangs on a read
	return c
}

func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	_, err := c.Write([]byte(msg))
	require.NoError(t, err)
	got := make([]byte, len(msg))
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	require.Equal(t, msg, string(got))
}

// Postgres messages, just enough for a fake server.
func startupMsg() []byte {
	body := []byte("user\x00test\x00database\x00test\x00\x00")
	b := binary.BigEndian.AppendUint32(nil, uint32(8+len(body)))
	b = binary.BigEndian.AppendUint32(b, 3<<16)
	return append(b, body...)
}

func sslRequest() []byte {
	return binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 8), 80877103)
}

func typed(typ byte, body string) []byte {
	b := append([]byte{typ}, binary.BigEndian.AppendUint32(nil, uint32(4+len(body)))...)
	return append(b, body...)
}

func readTyped(r io.Reader) (byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, err
	}
	_, err := io.CopyN(io.Discard, r, int64(binary.BigEndian.Uint32(hdr[1:]))-4)
	return hdr[0], err
}

// fakePostgres answers an SSLRequest with sslAnswer, then runs a trust-auth startup and
// answers each Query with ReadyForQuery ('S' instead switches to echo, standing in for TLS).
func fakePostgres(sslAnswer byte) func(net.Conn) {
	return func(c net.Conn) {
		var hdr [8]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		if binary.BigEndian.Uint32(hdr[4:]) == 80877103 {
			if _, err := c.Write([]byte{sslAnswer}); err != nil || sslAnswer != 'N' {
				echo(c)
				return
			}
			if _, err := io.ReadFull(c, hdr[:]); err != nil {
				return
			}
		}
		if _, err := io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint32(hdr[:4]))-8); err != nil {
			return
		}
		// Split across writes so the proxy has to find ReadyForQuery across reads.
		_, _ = c.Write(typed('R', "\x00\x00\x00\x00"))
		_, _ = c.Write(typed('S', "server_version\x0015\x00"))
		_, _ = c.Write(append(typed('K', "12345678"), typed('Z', "I")...))
		for {
			typ, err := readTyped(c)
			if err != nil || typ == 'X' {
				return
			}
			if typ == 'Q' {
				_, _ = c.Write(append(typed('C', "SELECT 1\x00"), typed('Z', "I")...))
			}
		}
	}
}

func readUntilReady(t *testing.T, c net.Conn) {
	t.Helper()
	for {
		typ, err := readTyped(c)
		require.NoError(t, err)
		if typ == 'Z' {
			return
		}
	}
}

func TestStartupFlightsCountApart(t *testing.T) {
	t.Parallel()
	p := start(t, pgproxy.Config{Target: server(t, fakePostgres('N'))})
	c := dial(t, p)

	// sslmode=prefer against a server without TLS: SSLRequest, 'N', then plaintext.
	_, err := c.Write(sslRequest())
	require.NoError(t, err)
	answer := make([]byte, 1)
	_, err = io.ReadFull(c, answer)
	require.NoError(t, err)
	require.Equal(t, "N", string(answer))
	_, err = c.Write(startupMsg())
	require.NoError(t, err)
	readUntilReady(t, c)
	require.Equal(t, pgproxy.Flights{Startup: 2}, p.Flights())

	// A query written in three pieces before reading is one flight.
	before := p.Flights()
	q := typed('Q', "SELECT 1\x00")
	for _, part := range [][]byte{q[:3], q[3:7], q[7:]} {
		_, err := c.Write(part)
		require.NoError(t, err)
	}
	readUntilReady(t, c)
	require.Equal(t, pgproxy.Flights{Statement: 1}, p.Flights().Sub(before))

	conns := p.Conns()
	require.Len(t, conns, 1)
	require.Equal(t, c.LocalAddr().String(), conns[0].Client.String())
	require.Equal(t, pgproxy.Flights{Startup: 2, Statement: 1}, conns[0].Flights)

	// Closing the session (Terminate) is not a statement.
	_, err = c.Write(typed('X', ""))
	require.NoError(t, err)
	dbtest.WaitFor(t, 10*time.Second, "terminate counted", func() bool {
		return p.Flights() == pgproxy.Flights{Startup: 3, Statement: 1}
	})
}

func TestEncryptedAndForeignStreamsAreOpaque(t *testing.T) {
	t.Parallel()
	p := start(t, pgproxy.Config{Target: server(t, fakePostgres('S'))})
	c := dial(t, p)
	_, err := c.Write(sslRequest())
	require.NoError(t, err)
	answer := make([]byte, 1)
	_, err = io.ReadFull(c, answer)
	require.NoError(t, err)
	require.Equal(t, "S", string(answer))
	roundTrip(t, c, "\x16\x03\x01 a TLS ClientHello")
	roundTrip(t, c, "more TLS")
	require.Equal(t, pgproxy.Flights{Startup: 1, Opaque: 2}, p.Flights())

	// Any TCP stream goes through; it is just not read.
	p2 := start(t, pgproxy.Config{Target: server(t, echo)})
	c2 := dial(t, p2)
	roundTrip(t, c2, "GET /ws HTTP/1.1\r\n\r\n")
	roundTrip(t, c2, "x")
	require.Equal(t, pgproxy.Flights{Opaque: 2}, p2.Flights())
}

func TestExcludeAndConnFlights(t *testing.T) {
	t.Parallel()
	p := start(t, pgproxy.Config{Target: server(t, echo)})
	a, b := dial(t, p), dial(t, p)
	roundTrip(t, a, "hello")
	roundTrip(t, b, "hello")
	require.Equal(t, int64(2), p.Flights().Total())

	require.True(t, p.Exclude(b.LocalAddr()))
	before := p.Flights()
	roundTrip(t, a, "one")
	roundTrip(t, b, "two")
	roundTrip(t, b, "three")
	require.Equal(t, int64(1), p.Flights().Sub(before).Total(), "b is excluded")
	fb, ok := p.ConnFlights(b.LocalAddr())
	require.True(t, ok)
	require.Equal(t, int64(3), fb.Total(), "an excluded connection keeps its own count")
	fa, ok := p.ConnFlights(a.LocalAddr())
	require.True(t, ok)
	require.Equal(t, int64(2), fa.Total())

	p.Reset()
	require.Equal(t, pgproxy.Flights{}, p.Flights())
	fa, _ = p.ConnFlights(a.LocalAddr())
	require.Equal(t, pgproxy.Flights{}, fa)
	_, ok = p.ConnFlights(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1})
	require.False(t, ok)
}

// replyAfter reads n bytes, then answers with all of them: one request, one response.
func replyAfter(n int) func(net.Conn) {
	return func(c net.Conn) {
		buf := make([]byte, n)
		if _, err := io.ReadFull(c, buf); err == nil {
			_, _ = c.Write(buf)
		}
	}
}

func TestDelayedPipelineIsOneFlight(t *testing.T) {
	t.Parallel()
	const writes, size, delay = 10000, 10, 20 * time.Millisecond
	p := start(t, pgproxy.Config{Target: server(t, replyAfter(writes*size)), Delay: delay})
	c := dial(t, p)

	start := time.Now()
	msg := bytes.Repeat([]byte("m"), size)
	for range writes {
		_, err := c.Write(msg)
		require.NoError(t, err)
	}
	_, err := io.ReadFull(c, make([]byte, writes*size))
	require.NoError(t, err)
	elapsed := time.Since(start)

	require.Equal(t, pgproxy.Flights{Opaque: 1}, p.Flights())
	require.GreaterOrEqual(t, elapsed, 2*delay, "one flight each way")
	t.Logf("%d writes in one flight, %s each way: %s", writes, delay, elapsed) // ~2×delay, not writes×delay
}

func TestDelayKeepsOrder(t *testing.T) {
	t.Parallel()
	const delay = 100 * time.Millisecond
	p := start(t, pgproxy.Config{Target: server(t, echo), Delay: delay})
	c := dial(t, p)

	start := time.Now()
	_, err := c.Write([]byte("a"))
	require.NoError(t, err)
	dbtest.WaitFor(t, 10*time.Second, "proxy read a", func() bool { return p.Flights().Total() == 1 })
	p.SetDelay(0) // "b" is due before "a" but must not overtake it
	require.Equal(t, time.Duration(0), p.Delay())
	_, err = c.Write([]byte("b"))
	require.NoError(t, err)
	got := make([]byte, 2)
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	require.Equal(t, "ab", string(got))
	require.GreaterOrEqual(t, time.Since(start), delay)
}

func TestHalfClosePassesThrough(t *testing.T) {
	t.Parallel()
	// The server reads to EOF, then answers: only works if the client's FIN is passed on
	// while the way back stays open.
	p := start(t, pgproxy.Config{Target: server(t, func(c net.Conn) {
		b, err := io.ReadAll(c)
		if err == nil {
			_, _ = c.Write(append([]byte("got "), b...))
		}
	}), Delay: time.Millisecond})
	c := dial(t, p)
	_, err := c.Write([]byte("request"))
	require.NoError(t, err)
	require.NoError(t, c.(*net.TCPConn).CloseWrite())
	b, err := io.ReadAll(c)
	require.NoError(t, err)
	require.Equal(t, "got request", string(b))
	dbtest.WaitFor(t, 10*time.Second, "connection gone", func() bool { return len(p.Conns()) == 0 })
}

func TestCutDropsAndRefusesUntilRestore(t *testing.T) {
	t.Parallel()
	p := start(t, pgproxy.Config{Target: server(t, echo)})
	c := dial(t, p)
	roundTrip(t, c, "before")

	p.Cut()
	_, err := c.Read(make([]byte, 1))
	require.Error(t, err, "an open connection is dropped")
	dbtest.WaitFor(t, 10*time.Second, "no connection left", func() bool { return len(p.Conns()) == 0 })

	refused := dial(t, p)
	_, err = refused.Read(make([]byte, 1))
	require.Error(t, err, "a new connection is closed at once")

	p.Restore()
	roundTrip(t, dial(t, p), "after")
}

func TestCloseEndsEveryGoroutine(t *testing.T) {
	target := server(t, echo) // stops at cleanup, after the check below
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	p, err := pgproxy.New(pgproxy.Config{Target: target, Delay: time.Hour})
	require.NoError(t, err)
	require.NoError(t, p.Start(context.Background()))
	c := dial(t, p)
	_, err = c.Write([]byte("waits an hour")) // queued in the proxy when it closes
	require.NoError(t, err)
	dbtest.WaitFor(t, 10*time.Second, "flight seen", func() bool { return p.Flights().Total() == 1 })

	require.NoError(t, p.Close())
	require.NoError(t, p.Close(), "safe twice")
	require.NoError(t, p.Stop(context.Background()))
	_, err = c.Read(make([]byte, 1))
	require.Error(t, err)
	require.Error(t, p.Start(context.Background()), "no restart after Stop")
}

func TestStopBeforeStart(t *testing.T) {
	t.Parallel()
	p, err := pgproxy.New(pgproxy.Config{Target: "127.0.0.1:1"})
	require.NoError(t, err)
	require.NoError(t, p.Stop(context.Background()))
	require.Nil(t, p.Addr())
	_, err = p.URL("postgres://u@db:5432/x")
	require.Error(t, err)
}

func TestDialFailureClosesClient(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	dead := ln.Addr().String()
	require.NoError(t, ln.Close()) // nothing listens there now
	p := start(t, pgproxy.Config{Target: dead, Logger: dbtest.Logger(t)})
	_, err = dial(t, p).Read(make([]byte, 1))
	require.Error(t, err)
}

func TestConfig(t *testing.T) {
	t.Parallel()
	_, err := pgproxy.New(pgproxy.Config{Delay: -time.Second, DialTimeout: -1})
	require.Error(t, err)
	for _, want := range []string{"target is empty", "delay -1s is negative", "dial timeout"} {
		require.ErrorContains(t, err, want)
	}
	_, err = pgproxy.New(pgproxy.Config{Target: "db"})
	require.ErrorContains(t, err, "not host:port")

	target, err := pgproxy.TargetFromURL("postgres://u:p@db.internal/app?sslmode=disable")
	require.NoError(t, err)
	require.Equal(t, "db.internal:5432", target)
	target, err = pgproxy.TargetFromURL("postgresql://u@[::1]:6543/app")
	require.NoError(t, err)
	require.Equal(t, "[::1]:6543", target)
	_, err = pgproxy.TargetFromURL("postgres:///app?host=/run/postgresql")
	require.ErrorContains(t, err, "Unix socket")
	_, err = pgproxy.TargetFromURL("postgres://u:Top%zzSecret@db/app")
	require.ErrorContains(t, err, "postgres://u:xxxxx@db/app")
	require.NotContains(t, err.Error(), "Secret", "a URL that does not parse is printed without its password")

	p := start(t, pgproxy.Config{Target: "127.0.0.1:1"})
	u, err := p.URL("postgres://u:p@db:5432/app?sslmode=disable")
	require.NoError(t, err)
	require.Equal(t, "postgres://u:p@"+p.Addr().String()+"/app?sslmode=disable", u)
	require.Equal(t, time.Duration(0), p.Delay())
	p.SetDelay(-time.Second)
	require.Equal(t, time.Duration(0), p.Delay())
}

func BenchmarkThroughput(b *testing.B) {
	for _, delay := range []time.Duration{0, 20 * time.Millisecond} {
		b.Run("delay="+delay.String(), func(b *testing.B) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(b, err)
			defer ln.Close()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					go func() { defer c.Close(); echo(c) }()
				}
			}()
			p, err := pgproxy.New(pgproxy.Config{Target: ln.Addr().String(), Delay: delay})
			require.NoError(b, err)
			require.NoError(b, p.Start(context.Background()))
			defer p.Close()
			c, err := net.Dial("tcp", p.Addr().String())
			require.NoError(b, err)
			defer c.Close()

			msg := bytes.Repeat([]byte("x"), 1024)
			b.SetBytes(int64(len(msg)))
			b.ReportAllocs()
			done := make(chan error, 1)
			go func() {
				_, err := io.CopyN(io.Discard, c, int64(b.N*len(msg)))
				done <- err
			}()
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
			}
			if err := <-done; err != nil && !errors.Is(err, io.EOF) {
				b.Fatal(err)
			}
		})
	}
}
