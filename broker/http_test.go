package broker

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

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
// behind METRICS_TOKEN or on a loopback address.
func TestProfilesOnlyBehindTokenOrOnLoopback(t *testing.T) {
	t.Parallel()
	get := func(srv *Server, token string) int {
		_, port, err := net.SplitHostPort(srv.MetricsAddr())
		require.NoError(t, err)
		req, err := http.NewRequestWithContext(ctxT(t), http.MethodGet, "http://127.0.0.1:"+port+"/debug/pprof/", nil)
		require.NoError(t, err)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
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
	require.Equal(t, http.StatusOK, get(guarded.nodes[0], "m3trics"))
}
