package broker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// A client that trickles a request body, or keeps a connection open without a request, holds a
// socket and a goroutine that no other limit counts: both are cut at their timeouts. A
// WebSocket session outlives every one of them.
func TestPlainHTTPTimesOutAndWebSocketsStay(t *testing.T) {
	t.Parallel()
	const read, write, idle = 500 * time.Millisecond, time.Second, time.Second
	c := newCluster(t, 1, func(cfg *Config) { cfg.httpTimeouts = &[3]time.Duration{read, write, idle} })
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a, b := m.dial(0, alice), m.dial(0, bob)
	addr := c.nodes[0].Addr()

	// A hook whose body arrives a byte every 100 ms: answered 400 and disconnected at the read
	// timeout, not when the body would have ended (100 s).
	conn, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer conn.Close()
	_, err = io.WriteString(conn, "POST "+protocol.PathHookState+" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
	require.NoError(t, err)
	stop := make(chan struct{})
	trickled := make(chan struct{})
	go func() {
		defer close(trickled)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if _, err := conn.Write([]byte(" ")); err != nil {
					return
				}
			}
		}
	}()
	start := time.Now()
	require.NoError(t, conn.SetReadDeadline(start.Add(read+5*time.Second)))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err, "answered before the test's own deadline")
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	_, err = io.ReadAll(resp.Body)
	require.NoError(t, err)
	_, err = conn.Read(make([]byte, 1))
	requireClosedByPeer(t, err)
	close(stop)
	<-trickled
	t.Logf("trickled body cut after %s", time.Since(start))

	// A kept-alive connection with no next request is closed at the idle timeout.
	idleConn, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer idleConn.Close()
	_, err = io.WriteString(idleConn, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
	require.NoError(t, err)
	br := bufio.NewReader(idleConn)
	resp, err = http.ReadResponse(br, nil)
	require.NoError(t, err)
	_, _ = io.Copy(io.Discard, resp.Body)
	require.False(t, resp.Close, "kept alive after the answer")
	start = time.Now()
	require.NoError(t, idleConn.SetReadDeadline(start.Add(idle+5*time.Second)))
	_, err = br.ReadByte()
	requireClosedByPeer(t, err)
	t.Logf("idle connection closed after %s", time.Since(start))

	// The sessions, open since before both, are past every timeout (read, write and idle) and
	// still work both ways.
	ack, err := a.Send(ctxT(t), bob.pub, protocol.PriorityNow, "n", "still here", "")
	require.NoError(t, err)
	require.Equal(t, ack.MessageID, nextPush(t, b, 5*time.Second).MessageID)
	require.NoError(t, a.Err())
	require.NoError(t, b.Err())
}

// requireClosedByPeer checks that a read ended because the broker closed the connection (EOF,
// or a reset when the trickled bytes it left unread were still arriving), not at the test's
// own read deadline.
func requireClosedByPeer(t *testing.T, err error) {
	t.Helper()
	require.Error(t, err)
	var ne net.Error
	require.False(t, errors.As(err, &ne) && ne.Timeout(), "the broker did not close the connection: %v", err)
}

// Profiles show every goroutine's stack and can cost a core: METRICS_ADDR serves them only
// behind METRICS_TOKEN or on a loopback address. The token's scheme is matched in any case;
// "bearer <token>" got 401 before.
func TestProfilesOnlyBehindTokenOrOnLoopback(t *testing.T) {
	t.Parallel()
	get := func(srv *Server, authorization string) int {
		_, port, err := net.SplitHostPort(srv.MetricsAddr())
		require.NoError(t, err)
		req, err := http.NewRequestWithContext(ctxT(t), http.MethodGet, "http://127.0.0.1:"+port+"/debug/pprof/", nil)
		require.NoError(t, err)
		if authorization != "" {
			req.Header.Set("Authorization", authorization)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	loopback := newCluster(t, 1, func(cfg *Config) { cfg.MetricsAddr = "127.0.0.1:0" })
	require.Equal(t, http.StatusOK, get(loopback.nodes[0], ""), "this machine only: served")

	open := newCluster(t, 1, func(cfg *Config) { cfg.MetricsAddr = "0.0.0.0:0" })
	require.Equal(t, http.StatusNotFound, get(open.nodes[0], ""), "every interface, no token: not served")

	guarded := newCluster(t, 1, func(cfg *Config) { cfg.MetricsAddr = "0.0.0.0:0"; cfg.MetricsToken = "m3trics" })
	require.Equal(t, http.StatusUnauthorized, get(guarded.nodes[0], ""))
	require.Equal(t, http.StatusOK, get(guarded.nodes[0], "Bearer m3trics"))
	// An authentication scheme's case does not matter (RFC 9110), as on the status page.
	require.Equal(t, http.StatusOK, get(guarded.nodes[0], "bearer m3trics"))
	require.Equal(t, http.StatusUnauthorized, get(guarded.nodes[0], "Basic m3trics"))
}

// openPlain opens n connections to addr that send half a request and wait; it returns them.
func openPlain(t *testing.T, addr string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	for range n {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		t.Cleanup(func() { _ = c.Close() })
		_, err = io.WriteString(c, "POST "+protocol.PathHookState+" HTTP/1.1\r\nHost: x\r\n")
		require.NoError(t, err)
		conns = append(conns, c)
	}
	return conns
}

// closedByServer: the server has closed c (a read ends in EOF or a reset, not a timeout).
func closedByServer(c net.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// Connections not upgraded to a WebSocket are counted, per address and on the replica: one
// client can't hold the open files the sessions need with half-sent requests or kept-alive
// connections; the one beyond a limit is closed unread, and a socket upgraded to a session
// no longer counts.
func TestPlainHTTPConnectionsAreLimited(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.plainConnLimits = &[2]int{12, 5} })
	addr := c.nodes[0].Addr()
	m := c.mesh(0)
	a := m.dial(0, m.member("alice")) // an upgraded connection: not counted

	held := openPlain(t, addr, 5)
	extra := openPlain(t, addr, 1)[0]
	dbtest.WaitFor(t, 5*time.Second, "the sixth from one address closed", func() bool { return closedByServer(extra) })
	for _, h := range held {
		require.False(t, closedByServer(h), "the first five stay open")
	}
	_, err := a.ListPeers(ctxT(t))
	require.NoError(t, err, "sessions are not touched")

	// One closed frees its place.
	require.NoError(t, held[0].Close())
	dbtest.WaitFor(t, 5*time.Second, "a place free again", func() bool {
		next := openPlain(t, addr, 1)[0]
		open := !closedByServer(next)
		_ = next.Close()
		return open
	})
}

// At the replica's limit (per address not kept: behind a trusted proxy every connection comes
// from the proxy), the connection that has waited longest without a request is closed to make
// room: connections held open can't keep a new client out.
func TestPlainHTTPConnectionsAtTheReplicaLimitMakeRoom(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.plainConnLimits = &[2]int{6, 0} })
	addr := c.nodes[0].Addr()
	held := openPlain(t, addr, 6)
	dbtest.WaitFor(t, 5*time.Second, "the six counted", func() bool {
		c.nodes[0].plain.mu.Lock()
		defer c.nodes[0].plain.mu.Unlock()
		return len(c.nodes[0].plain.conns) == 6
	})
	// A health check gets through: the longest waiting is closed for it.
	resp, err := http.Get("http://" + addr + protocol.PathHealth)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	dbtest.WaitFor(t, 5*time.Second, "the first held closed", func() bool { return closedByServer(held[0]) })
	for _, h := range held[1:] {
		require.False(t, closedByServer(h))
	}
}

// One IPv6 host is one source whatever addresses of its /64 it uses, as for every other
// per-address limit.
func TestPlainConnectionsCountAnIPv6HostByItsPrefix(t *testing.T) {
	t.Parallel()
	var refused []string
	p := newPlainConns(100, 3, 0, nil, func(source string, _ bool, _ int) { refused = append(refused, source) })
	conns := make([]*addrConn, 0, 4)
	for i := range 4 {
		a := &addrConn{addr: &net.TCPAddr{IP: net.ParseIP(fmt.Sprintf("2001:db8:1:2::%x", i+1)), Port: 4000 + i}}
		p.track(a, http.StateNew)
		conns = append(conns, a)
	}
	require.Equal(t, []string{"2001:db8:1:2::/64"}, refused)
	require.True(t, conns[3].closed.Load(), "the fourth from one /64 closed")
	require.False(t, conns[2].closed.Load())
}

// A replica taking over a dead one's sessions sees thousands of connections arrive at once,
// each counted here until its upgrade is read: while the replica has session slots free they
// are not closed as if they held what the sessions need (they are those sessions), and one
// source still holds at most a quarter. With the slots taken, the floor holds again.
func TestPlainConnectionsMayTakeTheFreeSessionSlots(t *testing.T) {
	t.Parallel()
	var free atomic.Int64
	free.Store(40)
	var refused []string
	p := newPlainConns(8, 100, 48, func() int { return int(free.Load()) }, func(source string, _ bool, _ int) { refused = append(refused, source) })
	var all []*addrConn
	gone := map[*addrConn]bool{}
	open := func(ip string, n int) []*addrConn {
		out := make([]*addrConn, n)
		for i := range out {
			out[i] = &addrConn{addr: &net.TCPAddr{IP: net.ParseIP(ip), Port: 5000 + i}}
			all = append(all, out[i])
			p.track(out[i], http.StateNew)
			for _, c := range all { // as net/http does after a close
				if c.closed.Load() && !gone[c] {
					gone[c] = true
					p.track(c, http.StateClosed)
				}
			}
		}
		return out
	}
	storm := open("192.0.2.1", 10)
	require.Empty(t, refused, "ten from one source, beyond the floor of 8: the free slots take them")
	extra := open("192.0.2.1", 1)[0]
	require.True(t, extra.closed.Load(), "the eleventh from that source: a quarter of 40 is 10")
	require.Len(t, refused, 1)

	for _, c := range storm {
		p.track(c, http.StateHijacked) // upgraded: sessions now, counted by the gate and the hub
	}
	free.Store(0)
	require.Len(t, open("192.0.2.2", 3), 3)
	require.Len(t, refused, 2, "a quarter of the floor of 8 from one source")
	var late []*addrConn
	for i := range 8 {
		late = append(late, open(fmt.Sprintf("192.0.2.%d", 10+i), 1)...)
	}
	require.False(t, late[7].closed.Load())
	require.Len(t, refused, 4, "at the floor again, the two waiting longest (the second source's) made room")

	// However many slots are free, no more than the ceiling (the floor and the gate's share):
	// many sources must not hold a connection's memory for every open file.
	for _, c := range all {
		if !gone[c] {
			gone[c] = true
			p.track(c, http.StateClosed)
		}
	}
	free.Store(100_000)
	for i := range 48 {
		open(fmt.Sprintf("198.51.100.%d", i), 1)
	}
	require.Len(t, refused, 4)
	open("198.51.100.200", 1)
	require.Len(t, refused, 5, "the 49th: past the ceiling of 48, the longest waiting made room")
}

// The room the plain connections may take is the session slots a replica's sessions and its
// sockets waiting for a hello leave.
func TestPlainRoomIsTheSessionSlotsNotInUse(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	n := c.nodes[0]
	capacity := sessionCapacity(n.fileLimit.Load())
	require.Positive(t, capacity)
	require.Equal(t, capacity, n.plainRoom())
	m := c.mesh(0)
	m.dial(0, m.member("alice"))
	dbtest.WaitFor(t, 5*time.Second, "alice's session takes a slot", func() bool { return n.plainRoom() == capacity-1 })
}

// addrConn is a net.Conn with an address, that records being closed.
type addrConn struct {
	net.Conn
	addr   net.Addr
	closed atomic.Bool
}

func (a *addrConn) RemoteAddr() net.Addr { return a.addr }
func (a *addrConn) Close() error         { a.closed.Store(true); return nil }

// A request whose headers pass 16 KiB is refused 431, not read into memory up to 1 MiB.
func TestLargeHeadersAreRefused(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	req, err := http.NewRequestWithContext(ctxT(t), http.MethodGet, "http://"+c.nodes[0].Addr()+protocol.PathHealth, nil)
	require.NoError(t, err)
	req.Header.Set("X-Pad", strings.Repeat("a", 32<<10))
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusRequestHeaderFieldsTooLarge, resp.StatusCode)
}

// A socket does not keep its upgrade request's line and Host for its life, with or without a
// hello: up to 16 KiB each, over thousands of sockets.
func TestSocketsDoNotKeepTheirUpgradeRequest(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	srv := c.nodes[0]
	m := c.mesh(0)
	pad := strings.Repeat("a", 8<<10)
	a := m.dial(0, m.member("alice"), func(o *client.Options) { o.URL += "?pad=" + pad })
	_, err := a.ListPeers(ctxT(t))
	require.NoError(t, err)
	for _, s := range srv.hub.all() {
		// Emptied in place: net/http holds the same request for as long as the socket lives.
		require.Empty(t, s.ws.Request.RequestURI, "a session's upgrade request line")
		require.Empty(t, s.ws.Request.Host)
		require.Nil(t, s.ws.Request.Header)
	}

	// Without a hello.
	ws, resp, err := websocket.DefaultDialer.Dial("ws://"+srv.Addr()+"/ws?pad="+pad, nil)
	require.NoError(t, err)
	resp.Body.Close()
	defer ws.Close()
	// Counted from before the upgrade; its session object is attached once connected.
	var uri string
	dbtest.WaitFor(t, 5*time.Second, "the socket connected", func() bool {
		srv.peers.gate.mu.Lock()
		defer srv.peers.gate.mu.Unlock()
		for cn := range srv.peers.gate.pending {
			if cn.ms != nil {
				uri = cn.ms.Request.RequestURI
				return true
			}
		}
		return false
	})
	require.Empty(t, uri, "a socket without a hello keeps its upgrade request line")
}

// A broker on loopback accepts unsigned hooks for coming from this machine; a web page open
// in a browser there posts from it too (a "simple" request needs no preflight). Such a post is
// refused and changes nothing; the same hook from a script goes through.
func TestUnsignedHookFromAWebPageIsRefused(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.Host = "127.0.0.1" })
	m := c.mesh(0)
	a := m.dial(0, m.member("alice"), func(o *client.Options) { o.CWD = "/home/alice/project"; o.SessionID = "s-alice" })
	post := func(headers map[string]string) int {
		req, err := http.NewRequestWithContext(ctxT(t), http.MethodPost, "http://"+c.nodes[0].Addr()+protocol.PathHookState,
			strings.NewReader(`{"cwd":"/home/alice/project","status":"working"}`))
		require.NoError(t, err)
		for k, v := range headers {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	// What a browser sends for fetch(url, {method: "POST", mode: "no-cors", body}).
	require.Equal(t, http.StatusForbidden, post(map[string]string{"Content-Type": "text/plain;charset=UTF-8",
		"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}))
	require.Equal(t, http.StatusForbidden, post(map[string]string{"Sec-Fetch-Site": "same-site"}))
	require.Equal(t, protocol.StatusIdle, peerStatus(t, a, "s-alice"), "nothing changed")

	require.Equal(t, http.StatusOK, post(map[string]string{"Content-Type": "application/json"}))
	dbtest.WaitFor(t, 5*time.Second, "the script's hook applied", func() bool { return peerStatus(t, a, "s-alice") == protocol.StatusWorking })
}

// /health's database ping is shared and not the client's: a client that half-closes its
// connection (as some probes do) is not told the database is down, and a flood of health
// checks costs the pool a ping now and then, not one each.
func TestHealthPingIsSharedAndOutlivesTheClient(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 0, nil)
	proxy := dbtest.NewProxy(t, c.url)
	// A primary a little away: the ping is still out when the client's half-close is seen.
	proxy.SetDelay(50 * time.Millisecond)
	pool, err := db.NewPool(context.Background(), proxy.URL(c.url), db.PoolConfig{})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	srv := startServer(t, Config{NodeID: "h", Region: "test", SessionGrace: 5 * time.Second, quiet: true}, pool, dbtest.Logger(t))
	dbtest.WaitFor(t, 10*time.Second, "listener connected", srv.BusConnected)

	conn, err := net.Dial("tcp", srv.Addr())
	require.NoError(t, err)
	defer conn.Close()
	_, err = io.WriteString(conn, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	require.NoError(t, err)
	require.NoError(t, conn.(*net.TCPConn).CloseWrite())
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err)
	var h Health
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&h))
	require.Equal(t, "up", h.DB, "the client only closed its half of the connection")

	flights := proxy.Count(func() {
		var wg sync.WaitGroup
		for range 100 {
			wg.Go(func() {
				resp, err := http.Get("http://" + srv.Addr() + protocol.PathHealth)
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			})
		}
		wg.Wait()
	})
	// The replica's own background statements share the proxy: a generous bound, far below
	// one ping per request.
	require.Less(t, flights.Statement, int64(30), "100 health checks pinged the database one by one")
}

// A broker on loopback behind a proxy on its machine (TRUSTED_PROXY_HEADER set) is reached by
// every client the proxy serves, not by this machine's processes only: an unsigned hook proves
// nothing there, and is refused as on any public broker unless HOOK_ALLOW_UNSIGNED says so.
func TestUnsignedHookThroughAProxyToLoopbackIsRefused(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.Host = "127.0.0.1"; cfg.TrustedProxyHeader = "X-Forwarded-For" })
	m := c.mesh(0)
	a := m.dial(0, m.member("alice"), func(o *client.Options) { o.CWD = "/home/alice/project"; o.SessionID = "s-alice" })
	code, res, _ := postHookFrom(t, c.nodes[0], "203.0.113.9", []byte(`{"cwd":"/home/alice/project","status":"working"}`))
	require.Equal(t, http.StatusUnauthorized, code, "an unsigned hook from the internet, through the proxy: %+v", res)
	require.Contains(t, res.Error, "HOOK_ALLOW_UNSIGNED")
	require.Equal(t, protocol.StatusIdle, peerStatus(t, a, "s-alice"), "nothing changed")
}

// A wrong token (the hook token, which reaches every mesh, the admin token, the metrics token)
// and an oversized hook are refusals a client causes at will: each is logged (sampled) with
// its source, so an operator sees someone guessing, and the guess itself is never logged.
func TestWrongTokensAreLoggedWithoutThem(t *testing.T) {
	t.Parallel()
	lines := &logLines{}
	c := newCluster(t, 0, nil)
	srv := startServer(t, Config{NodeID: "tok", Region: "test", TrustedProxyHeader: "X-Forwarded-For", HookAllowUnsigned: true,
		HookToken: "h00k-secret", AdminToken: "adm1n-secret", MetricsToken: "m3trics-secret"},
		dbtest.PoolFor(t, c.url), slog.New(slog.NewTextHandler(lines, nil)))
	const guess = "guessed-t0ken"

	var res protocol.HookResponse
	code, _ := postJSONFrom(t, srv, protocol.PathHookState, "198.51.100.7",
		[]byte(`{"cwd":"/w","status":"idle","hook_token":"`+guess+`"}`), &res)
	require.Equal(t, http.StatusUnauthorized, code)
	code, _ = postJSONFrom(t, srv, protocol.PathHookState, "198.51.100.8",
		[]byte(`{"cwd":"/w","status":"idle","pad":"`+strings.Repeat("x", protocol.MaxHookBodyBytes)+`"}`), &res)
	require.Equal(t, http.StatusRequestEntityTooLarge, code)

	get := func(path, bearer, from string) int {
		req, err := http.NewRequestWithContext(ctxT(t), http.MethodGet, "http://"+srv.Addr()+path, nil)
		require.NoError(t, err)
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		req.Header.Set("X-Forwarded-For", from)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	require.Equal(t, http.StatusUnauthorized, get("/status?token="+guess, "", "198.51.100.9"))
	require.Equal(t, http.StatusUnauthorized, get("/metrics", guess, "198.51.100.10"))

	require.Len(t, lines.matching("hook token", "198.51.100.7"), 1)
	require.Len(t, lines.matching("body too large", "198.51.100.8"), 1)
	require.Len(t, lines.matching("admin token", "198.51.100.9"), 1)
	require.Len(t, lines.matching("metrics token", "198.51.100.10"), 1)
	require.Empty(t, lines.matching(guess), "a token tried is never logged")
}

// METRICS_ADDR (public behind METRICS_TOKEN, or private) holds at most metricsConnLimit
// connections: half-sent requests there can't take the open files the sessions need, and a
// scrape still gets through (the connection waiting longest makes room).
func TestMetricsAddressConnectionsAreLimited(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.MetricsAddr = "127.0.0.1:0"; cfg.MetricsToken = "m3trics" })
	addr := c.nodes[0].MetricsAddr()
	held := openPlain(t, addr, metricsConnLimit+1)
	dbtest.WaitFor(t, 5*time.Second, "the first held closed", func() bool { return closedByServer(held[0]) })
	require.False(t, closedByServer(held[metricsConnLimit]), "the newest stays")

	req, err := http.NewRequestWithContext(ctxT(t), http.MethodGet, "http://"+addr+"/metrics", nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer m3trics")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Positive(t, testutilCounter(c.nodes[0].metrics.ConnRejected.WithLabelValues("metrics_limit")))
}
