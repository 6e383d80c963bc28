package main

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/protocol"
)

// ackCutter is a TCP proxy to a broker that drops the first connection on which the broker
// answers a send: the envelope is stored, the client never hears so (a replica killed, a
// network cut right after the commit). Later connections pass untouched.
type ackCutter struct {
	ln     net.Listener
	target string
	cuts   atomic.Int32
	wg     sync.WaitGroup
}

func newAckCutter(t *testing.T, target string) *ackCutter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &ackCutter{ln: ln, target: target}
	p.wg.Go(p.accept)
	t.Cleanup(func() {
		_ = ln.Close()
		p.wg.Wait()
	})
	return p
}

func (p *ackCutter) url() string { return "ws://" + p.ln.Addr().String() + protocol.PathWS }

func (p *ackCutter) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = c.Close()
			continue
		}
		closeBoth := sync.OnceFunc(func() { _ = c.Close(); _ = b.Close() })
		p.wg.Go(func() { _, _ = io.Copy(b, c); closeBoth() })
		p.wg.Go(func() { p.toClient(c, b); closeBoth() })
	}
}

// toClient copies broker → client frames (unmasked, so readable) until the first ack, which
// it swallows by cutting both sides, once.
func (p *ackCutter) toClient(c, b net.Conn) {
	needle := []byte(`"type":"ack"`)
	var tail []byte
	buf := make([]byte, 32<<10)
	for {
		n, err := b.Read(buf)
		if n > 0 {
			window := append(tail, buf[:n]...)
			if p.cuts.Load() == 0 && bytes.Contains(window, needle) && p.cuts.CompareAndSwap(0, 1) {
				return
			}
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
			tail = append(tail[:0], window[max(0, len(window)-len(needle)):]...)
		}
		if err != nil {
			return
		}
	}
}

// A send whose ack is lost with its connection (the envelope stored, the answer never
// arriving) is sent again on a new connection with the same client_message_id: the command
// succeeds, and the recipient gets the message once.
func TestSendRetriesWhenTheAckIsLost(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1, nil)
	alice, bob := joinPair2(t, e)
	listen := bob.start("listen", "--json")
	listen.waitErrOutput(t, "listening in mesh demo", 1)
	waitPeer(t, alice, "bob", protocol.StatusIdle)

	cutter := newAckCutter(t, e.nodes[0].Addr())
	text := randomText("ack lost")
	out, errOut, err := alice.run("", "--broker", cutter.url(), "--json", "send", "--priority", "now", "bob", text)
	require.NoError(t, err, "stderr: %s", errOut)
	require.EqualValues(t, 1, cutter.cuts.Load(), "the first ack was cut")
	require.Contains(t, errOut, "sending again")
	listen.waitOutput(t, text)
	got := findMessage(t, listen.out.String(), text)
	require.Contains(t, out, got.MessageID, "the send reports the id the recipient got")

	// A later message proves the first is not still on its way a second time.
	after := randomText("after")
	alice.must("send", "--priority", "now", "bob", after)
	listen.waitOutput(t, after)
	require.Equal(t, 1, strings.Count(listen.out.String(), text), "delivered once")
}

// A broker URL that can never work (a typo in --broker or in meshes.json) ends listen with
// the reason, instead of "retrying" it forever.
func TestListenGivesUpOnABadBrokerURL(t *testing.T) {
	t.Parallel()
	bob := newCLI(t)
	bob.must("init", "--name", "bob")
	a := &app{home: bob.home, getenv: bob.getenv}
	require.NoError(t, a.saveMesh(MeshEntry{MeshID: "m1", Slug: "demo", MemberID: "b1", BrokerURL: "ws://127.0.0.1:1/ws"}))
	for _, bad := range []string{"wss//broker.example/ws", "ftp://broker.example/ws", "ws:///ws"} {
		l := bob.start("--broker", bad, "listen")
		err := l.wait(t, 10*time.Second)
		require.ErrorContains(t, err, "broker URL", bad)
		require.NotContains(t, l.err.String(), "retrying", bad)
	}
}

// A server that answers the upgrade with a status no retry mends (a wrong path: 404) ends
// listen with the status and the server's words; one saying "later" (503) is retried.
func TestListenGivesUpOnAnUpgradeRefusedForGood(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	status := atomic.Int32{}
	status.Store(http.StatusNotFound)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		calls.Add(1)
		http.Error(w, "no broker here", int(status.Load()))
	}))
	t.Cleanup(srv.Close)
	bob := newCLI(t)
	bob.must("init", "--name", "bob")
	a := &app{home: bob.home, getenv: bob.getenv}
	require.NoError(t, a.saveMesh(MeshEntry{MeshID: "m1", Slug: "demo", MemberID: "b1", BrokerURL: "ws://127.0.0.1:1/ws"}))
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"

	l := bob.start("--broker", url, "listen")
	err := l.wait(t, 10*time.Second)
	require.ErrorContains(t, err, "HTTP 404: no broker here")
	require.NotContains(t, l.err.String(), "retrying")
	require.EqualValues(t, 1, calls.Load())

	status.Store(http.StatusServiceUnavailable)
	l = bob.start("--broker", url, "listen")
	l.waitErrOutput(t, "HTTP 503: no broker here); retrying", 2)
}

// A message too large for the broker's frames fails at once with the reason: resending it
// can't help.
func TestSendTooLargeFailsOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1, nil)
	alice, bob := joinPair2(t, e)
	id, err := bob.loadIdentityT()
	require.NoError(t, err)
	big := strings.Repeat("x", 60_000)
	_, errOut, err := alice.run(big, "send", id.Pubkey, "-")
	require.Error(t, err)
	require.NotContains(t, errOut, "sending again")
	require.ErrorContains(t, err, "too large")
}

// Text a broker sends (error messages, close reasons) reaches the terminal escaped, like a
// peer's: a hostile or hijacked broker (ws:// has no TLS) can't drive the user's terminal.
func TestBrokerTextIsEscapedOnTheTerminal(t *testing.T) {
	t.Parallel()
	const evil = "\x1b]52;c;cGF5bG9hZA==\x07\x1b[2J"
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := (&websocket.Upgrader{}).Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		if _, _, err := ws.ReadMessage(); err != nil { // the hello
			return
		}
		if n.Add(1) == 1 {
			b, _ := protocol.Encode(&protocol.Error{Code: "internal", Message: "db down " + evil})
			_ = ws.WriteMessage(websocket.TextMessage, b)
			_ = ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(protocol.CloseGoingAway, "x"+evil))
			return
		}
		b, _ := protocol.Encode(&protocol.HelloAck{PresenceID: "p1", MemberDisplayName: "bob" + evil})
		_ = ws.WriteMessage(websocket.TextMessage, b)
		_ = ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(protocol.CloseKicked, "kicked"+evil))
		for {
			if _, _, err := ws.ReadMessage(); err != nil {
				return
			}
		}
	}))
	t.Cleanup(srv.Close)
	bob := newCLI(t)
	bob.must("init", "--name", "bob")
	a := &app{home: bob.home, getenv: bob.getenv}
	require.NoError(t, a.saveMesh(MeshEntry{MeshID: "m1", Slug: "demo", MemberID: "b1", BrokerURL: srv.URL + "/ws"}))
	l := bob.start("listen")
	err := l.wait(t, 20*time.Second)
	require.ErrorContains(t, err, "4001")
	require.Contains(t, l.err.String(), "connect failed")
	require.Contains(t, l.err.String(), "listening in mesh demo")
	require.NotContains(t, l.err.String(), "\x1b", "stderr")
	require.NotContains(t, l.err.String(), "\x07", "stderr")

	var printed bytes.Buffer
	printError(&printed, errors.New("join refused (HTTP 400): "+evil))
	require.NotContains(t, printed.String(), "\x1b")
	require.Contains(t, printed.String(), "join refused")
}
