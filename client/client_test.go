package client

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/claudemesh/broker/protocol"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeBroker is a minimal in-test WebSocket server: each connection runs
// script, which speaks whatever frames the test needs.
type fakeBroker struct {
	t      *testing.T
	srv    *httptest.Server
	script func(c *brokerConn)
	wg     sync.WaitGroup
}

type brokerConn struct {
	t    *testing.T
	ws   *websocket.Conn
	mu   sync.Mutex // one writer
	read chan []byte
}

func newFakeBroker(t *testing.T, script func(c *brokerConn)) *fakeBroker {
	t.Helper()
	fb := &fakeBroker{t: t, script: script}
	upgrader := websocket.Upgrader{}
	fb.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/ws" {
			http.NotFound(w, r)
			return
		}
		ws, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		fb.wg.Add(1)
		defer fb.wg.Done()
		defer ws.Close()
		bc := &brokerConn{t: t, ws: ws, read: make(chan []byte, 64)}
		go func() {
			defer close(bc.read)
			for {
				_, frame, err := ws.ReadMessage()
				if err != nil {
					return
				}
				bc.read <- frame
			}
		}()
		script(bc)
		// Drain until the client goes away so the reader goroutine ends.
		for range bc.read {
		}
	}))
	t.Cleanup(func() {
		fb.srv.Close()
		fb.wg.Wait()
	})
	return fb
}

func (fb *fakeBroker) url() string {
	return "ws" + strings.TrimPrefix(fb.srv.URL, "http") + "/ws"
}

// next returns the next decoded client message.
func (c *brokerConn) next() protocol.ClientMessage {
	c.t.Helper()
	select {
	case frame, ok := <-c.read:
		if !ok {
			c.t.Error("client went away")
			return nil
		}
		m, err := protocol.DecodeClient(frame)
		if err != nil {
			c.t.Errorf("decode client frame %s: %v", frame, err)
			return nil
		}
		return m
	case <-time.After(5 * time.Second):
		c.t.Error("timed out waiting for a client frame")
		return nil
	}
}

func (c *brokerConn) nextRaw() []byte {
	c.t.Helper()
	select {
	case frame := <-c.read:
		return frame
	case <-time.After(5 * time.Second):
		c.t.Error("timed out waiting for a client frame")
		return nil
	}
}

func (c *brokerConn) send(m json.Marshaler) {
	c.t.Helper()
	if err := c.trySend(m); err != nil {
		c.t.Error(err)
	}
}

// trySend is send for a handler that expects the client may close while it writes.
func (c *brokerConn) trySend(m json.Marshaler) error {
	b, err := protocol.Encode(m)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.ws.WriteMessage(websocket.TextMessage, b); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return nil
}

func (c *brokerConn) closeWith(code int, reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(code, reason), time.Now().Add(time.Second))
}

// acceptHello reads the hello and acknowledges it.
func (c *brokerConn) acceptHello() *protocol.Hello {
	c.t.Helper()
	h, ok := c.next().(*protocol.Hello)
	if !ok {
		c.t.Error("first frame is not a hello")
		return nil
	}
	c.send(protocol.HelloAck{PresenceID: "p-1", MemberDisplayName: "alice", ReqID: h.ReqID})
	return h
}

type testKeys struct {
	member     ed25519.PrivateKey
	memberPub  ed25519.PublicKey
	sessionPub ed25519.PublicKey
}

func newKeys(t *testing.T) testKeys {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(nil)
	require.NoError(t, err)
	spub, _, err := ed25519.GenerateKey(nil)
	require.NoError(t, err)
	return testKeys{member: priv, memberPub: pub, sessionPub: spub}
}

func testOptions(t *testing.T, url string, k testKeys) Options {
	return Options{
		URL: url, MeshID: "mesh-1", MemberID: "member-1", MemberKey: k.member,
		SessionID: "sess-1", PID: 4242, CWD: "/work", HandshakeTimeout: 5 * time.Second,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func dial(t *testing.T, opts Options) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestDialSendsVerifiableHello(t *testing.T) {
	k := newKeys(t)
	helloCh := make(chan *protocol.Hello, 1)
	fb := newFakeBroker(t, func(c *brokerConn) {
		h, _ := c.next().(*protocol.Hello)
		helloCh <- h
		c.send(protocol.HelloAck{PresenceID: "p-9", MemberDisplayName: "Alice", Resumed: true})
	})
	opts := testOptions(t, fb.url(), k)
	opts.SessionKey = k.sessionPub
	opts.DisplayName = "alice@box"
	opts.Groups = []protocol.Group{{Name: "eng", Role: "lead"}}
	opts.Capabilities = []string{protocol.CapClientAck, protocol.CapSystemEvents}
	opts.ProtocolVersion = 1
	before := time.Now()
	c := dial(t, opts)

	require.Equal(t, protocol.HelloAck{PresenceID: "p-9", MemberDisplayName: "Alice", Resumed: true}, c.HelloAck())
	h := <-helloCh
	require.NotNil(t, h)
	require.Equal(t, protocol.PubkeyHex(k.memberPub), h.Pubkey)
	require.Equal(t, protocol.PubkeyHex(k.sessionPub), h.SessionPubkey)
	require.True(t, protocol.VerifyHello(h.MeshID, h.MemberID, h.Pubkey, h.Timestamp, h.Signature))
	require.Equal(t, "mesh-1", h.MeshID)
	require.Equal(t, "member-1", h.MemberID)
	require.Equal(t, "sess-1", h.SessionID)
	require.Equal(t, 4242, h.PID)
	require.Equal(t, "/work", h.CWD)
	require.Equal(t, "alice@box", h.DisplayName)
	require.Equal(t, opts.Groups, h.Groups)
	require.Equal(t, opts.Capabilities, h.Capabilities)
	require.Equal(t, 1, h.ProtocolVersion)
	require.InDelta(t, before.UnixMilli(), h.Timestamp, float64(5*time.Second/time.Millisecond))
}

func TestDialDefaultsSessionID(t *testing.T) {
	k := newKeys(t)
	ids := make(chan string, 2)
	fb := newFakeBroker(t, func(c *brokerConn) {
		h := c.acceptHello()
		ids <- h.SessionID
	})
	opts := testOptions(t, fb.url(), k)
	opts.SessionID = ""
	dial(t, opts)
	dial(t, opts)
	a, b := <-ids, <-ids
	require.Len(t, a, 32)
	require.NotEqual(t, a, b)
}

func TestDialHelloRefused(t *testing.T) {
	tests := []struct {
		code      string
		closeCode int
	}{
		{protocol.CodeBadSignature, protocol.CloseHelloRefused},
		{protocol.CodeTimestampSkew, protocol.CloseHelloRefused},
		{protocol.CodeRevoked, protocol.CloseRevoked},
	}
	for _, tt := range tests {
		t.Run(tt.code, func(t *testing.T) {
			k := newKeys(t)
			fb := newFakeBroker(t, func(c *brokerConn) {
				c.next()
				c.send(protocol.Error{Code: tt.code, Message: "no"})
				c.closeWith(tt.closeCode, "")
			})
			opts := testOptions(t, fb.url(), k)
			// PrepareHello lets tests forge hellos; the fake broker does not care.
			opts.PrepareHello = func(h *protocol.Hello) { h.Signature = strings.Repeat("0", 128) }
			_, err := Dial(ctxT(t), opts)
			var he *HelloError
			require.ErrorAs(t, err, &he)
			require.Equal(t, tt.code, he.Code)
			require.Equal(t, "no", he.Message)
			require.Equal(t, tt.closeCode, he.CloseCode)
			var pe *protocol.Error
			require.ErrorAs(t, err, &pe)
			require.Equal(t, tt.code, pe.Code)
		})
	}
}

func TestDialClosedWithoutAck(t *testing.T) {
	k := newKeys(t)
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.next()
		c.closeWith(protocol.CloseDraining, "draining")
	})
	_, err := Dial(ctxT(t), testOptions(t, fb.url(), k))
	var he *HelloError
	require.ErrorAs(t, err, &he)
	require.Empty(t, he.Code)
	require.Equal(t, protocol.CloseDraining, he.CloseCode)
	require.Equal(t, "draining", he.CloseReason)
	var pe *protocol.Error
	require.False(t, errors.As(err, &pe))
}

func TestDialTimeout(t *testing.T) {
	k := newKeys(t)
	release := make(chan struct{})
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.next()
		<-release // never ack
	})
	defer close(release)
	opts := testOptions(t, fb.url(), k)
	opts.HandshakeTimeout = 200 * time.Millisecond
	_, err := Dial(context.Background(), opts)
	require.ErrorIs(t, err, context.DeadlineExceeded)
}

func TestDialErrors(t *testing.T) {
	k := newKeys(t)
	_, err := Dial(context.Background(), Options{MemberKey: k.member})
	require.ErrorContains(t, err, "URL is required")
	_, err = Dial(context.Background(), Options{URL: "ws://x/ws"})
	require.ErrorContains(t, err, "MemberKey")
	_, err = Dial(context.Background(), Options{URL: "ws://x/ws", MemberKey: k.member, SessionKey: []byte{1}})
	require.ErrorContains(t, err, "SessionKey")

	fb := newFakeBroker(t, func(c *brokerConn) {})
	opts := testOptions(t, strings.TrimSuffix(fb.url(), "/ws")+"/nope", k)
	_, err = Dial(context.Background(), opts)
	require.ErrorContains(t, err, "HTTP 404: 404 page not found")
	require.False(t, DialRetryable(err), "a wrong path stays wrong")

	// A redirect is not followed (the signed hello would go wherever it points) but named.
	moved := httptest.NewServer(http.RedirectHandler("https://broker.example/ws", http.StatusMovedPermanently))
	t.Cleanup(moved.Close)
	_, err = Dial(context.Background(), testOptions(t, "ws"+strings.TrimPrefix(moved.URL, "http")+"/ws", k))
	require.ErrorContains(t, err, "HTTP 301 (redirected to https://broker.example/ws: use that URL)")
	require.False(t, DialRetryable(err))
	// A relative redirect (what Go's http.Redirect writes for a path) is named in full: "/v2/ws"
	// alone is no URL to use.
	rel := httptest.NewServer(http.RedirectHandler("/v2/ws", http.StatusMovedPermanently))
	t.Cleanup(rel.Close)
	relURL := "ws" + strings.TrimPrefix(rel.URL, "http")
	_, err = Dial(context.Background(), testOptions(t, relURL+"/ws", k))
	require.ErrorContains(t, err, "HTTP 301 (redirected to "+relURL+"/v2/ws: use that URL)")
}

func TestRequestCorrelationOutOfOrder(t *testing.T) {
	k := newKeys(t)
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		// Collect three requests, answer them in reverse order.
		var reqs []protocol.ClientMessage
		for range 3 {
			reqs = append(reqs, c.next())
		}
		for i := len(reqs) - 1; i >= 0; i-- {
			switch m := reqs[i].(type) {
			case *protocol.GetState:
				c.send(protocol.StateResult{Key: m.Key, Value: json.RawMessage(`"v-` + m.Key + `"`), UpdatedBy: "u", UpdatedAt: "t", ReqID: m.ReqID})
			case *protocol.ListPeers:
				c.send(protocol.PeersList{Peers: []protocol.Peer{{Pubkey: "k", Status: protocol.StatusIdle}}, ReqID: m.ReqID})
			default:
				c.t.Errorf("unexpected %T", m)
			}
		}
	})
	c := dial(t, testOptions(t, fb.url(), k))
	ctx := ctxT(t)

	var wg sync.WaitGroup
	results := make([]string, 2)
	for i, key := range []string{"a", "b"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := c.GetState(ctx, key)
			if err != nil {
				t.Error(err)
				return
			}
			results[i] = string(r.Value)
		}()
	}
	peers, err := c.ListPeers(ctx)
	require.NoError(t, err)
	wg.Wait()
	require.Equal(t, []string{`"v-a"`, `"v-b"`}, results)
	require.Len(t, peers, 1)
	require.Equal(t, []protocol.Group{}, peers[0].Groups)
}

func TestSendAckRefusalAndError(t *testing.T) {
	k := newKeys(t)
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		for range 3 {
			m, _ := c.next().(*protocol.Send)
			if m == nil {
				return
			}
			switch m.TargetSpec {
			case "@ok":
				c.send(protocol.Ack{ID: m.ID, MessageID: "msg-1", Queued: true, ReqID: m.ReqID})
			case "@nobody":
				c.send(protocol.Ack{ID: m.ID, Queued: false, Error: protocol.CodeNoRecipient, ReqID: m.ReqID})
			default:
				c.send(protocol.Error{Code: protocol.CodeBadRequest, Message: "targetSpec: nope", ReqID: m.ReqID})
			}
		}
	})
	c := dial(t, testOptions(t, fb.url(), k))
	ctx := ctxT(t)

	ack, err := c.Send(ctx, "@ok", protocol.PriorityNow, "bm9uY2U=", "Y2lwaGVy", "c1")
	require.NoError(t, err)
	require.Equal(t, "msg-1", ack.MessageID)
	require.Equal(t, "c1", ack.ID)
	require.True(t, ack.Queued)

	ack, err = c.Send(ctx, "@nobody", protocol.PriorityNext, "n", "c", "c2")
	var pe *protocol.Error
	require.ErrorAs(t, err, &pe)
	require.Equal(t, protocol.CodeNoRecipient, pe.Code)
	require.Equal(t, "c2", pe.ID)
	require.False(t, ack.Queued)

	_, err = c.Send(ctx, "@bad", protocol.PriorityLow, "n", "c", "")
	require.ErrorAs(t, err, &pe)
	require.Equal(t, protocol.CodeBadRequest, pe.Code)
}

func TestPushesStateChangesErrors(t *testing.T) {
	k := newKeys(t)
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		for _, id := range []string{"m1", "m2", "m3"} {
			c.send(protocol.Push{MessageID: id, MeshID: "mesh-1", SenderPubkey: "s", Priority: protocol.PriorityNow, Nonce: "n", Ciphertext: "c", CreatedAt: "t"})
		}
		c.send(protocol.Push{MessageID: "sys", SenderPubkey: protocol.SenderSystem, Subtype: protocol.SubtypeSystem,
			Event: protocol.EventPeerJoined, EventData: json.RawMessage(`{"pubkey":"x"}`), Priority: protocol.PriorityLow})
		c.send(protocol.StateChange{Key: "k", Value: json.RawMessage(`1`), UpdatedBy: "bob"})
		c.send(protocol.Error{Code: protocol.CodeBadRequest, Message: "unsolicited"})
		c.nextRaw() // an unknown type must be skipped, then keep working
		c.send(rawMessage(`{"type":"stream_data","stream":"x"}`))
		c.send(protocol.Push{MessageID: "m4"})
	})
	c := dial(t, testOptions(t, fb.url(), k))
	require.NoError(t, c.SetStatus(ctxT(t), protocol.StatusIdle))

	for _, id := range []string{"m1", "m2", "m3"} {
		p := <-c.Pushes()
		require.Equal(t, id, p.MessageID)
		require.Equal(t, "c", p.Ciphertext)
	}
	p := <-c.Pushes()
	require.True(t, p.IsSystem())
	require.Equal(t, protocol.EventPeerJoined, p.Event)
	require.JSONEq(t, `{"pubkey":"x"}`, string(p.EventData))

	sc := <-c.StateChanges()
	require.Equal(t, protocol.StateChange{Key: "k", Value: json.RawMessage(`1`), UpdatedBy: "bob"}, sc)

	e, err := c.NextError(ctxT(t))
	require.NoError(t, err)
	require.Equal(t, "unsolicited", e.Message)

	require.Equal(t, "m4", (<-c.Pushes()).MessageID)
}

type rawMessage string

func (r rawMessage) MarshalJSON() ([]byte, error) { return []byte(r), nil }

func TestBackPressureNeverDrops(t *testing.T) {
	k := newKeys(t)
	const n = 50
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		for i := range n {
			c.send(protocol.Push{MessageID: "m" + itoa(i)})
		}
		m, _ := c.next().(*protocol.ListPeers)
		if m != nil {
			c.send(protocol.PeersList{ReqID: m.ReqID})
		}
	})
	opts := testOptions(t, fb.url(), k)
	opts.PushBuffer = 1
	c := dial(t, opts)

	// The reply waits behind the pushes the consumer has not read yet.
	type result struct {
		err error
	}
	replied := make(chan result, 1)
	go func() {
		_, err := c.ListPeers(ctxT(t))
		replied <- result{err}
	}()
	for i := range n {
		select {
		case p := <-c.Pushes():
			require.Equal(t, "m"+itoa(i), p.MessageID)
		case <-time.After(5 * time.Second):
			t.Fatalf("push %d not delivered", i)
		}
	}
	r := <-replied
	require.NoError(t, r.err)
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }

func TestCloseCodesSurfaced(t *testing.T) {
	codes := []int{
		protocol.CloseSessionReplaced, protocol.CloseGoingAway, protocol.CloseHelloRefused, protocol.CloseTooLarge,
		protocol.CloseDraining, protocol.CloseKicked, protocol.CloseRevoked, protocol.CloseSlowConsumer,
	}
	for _, code := range codes {
		t.Run(itoa(code), func(t *testing.T) {
			k := newKeys(t)
			reason := ""
			if code == protocol.CloseSessionReplaced {
				reason = protocol.CloseReasonSessionReplaced
			}
			fb := newFakeBroker(t, func(c *brokerConn) {
				c.acceptHello()
				c.next() // the get_state below, left unanswered
				c.closeWith(code, reason)
			})
			c := dial(t, testOptions(t, fb.url(), k))
			_, err := c.GetState(ctxT(t), "k")
			require.Error(t, err)
			select {
			case <-c.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("not done")
			}
			require.Equal(t, code, c.CloseCode())
			require.Equal(t, reason, c.CloseReason())
			var ce *CloseError
			require.ErrorAs(t, c.Err(), &ce)
			require.Equal(t, code, ce.Code)
			require.ErrorAs(t, err, &ce, "a pending request fails with the close error")

			// Channels are closed; further calls fail.
			_, ok := <-c.Pushes()
			require.False(t, ok)
			_, ok2 := <-c.StateChanges()
			require.False(t, ok2)
			require.Error(t, c.SetStatus(ctxT(t), protocol.StatusIdle))
			_, err = c.NextError(ctxT(t))
			require.Error(t, err)
		})
	}
}

func TestAbnormalClosure(t *testing.T) {
	k := newKeys(t)
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		_ = c.ws.UnderlyingConn().Close() // no close frame
	})
	c := dial(t, testOptions(t, fb.url(), k))
	<-c.Done()
	require.Equal(t, websocket.CloseAbnormalClosure, c.CloseCode())
}

// A connection reset (the broker dropped a socket whose buffers were full) is an abnormal
// closure too, not "no code".
func TestResetIsAbnormalClosure(t *testing.T) {
	k := newKeys(t)
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		tcp := c.ws.UnderlyingConn().(*net.TCPConn)
		_ = tcp.SetLinger(0) // close with a reset
		_ = tcp.Close()
	})
	c := dial(t, testOptions(t, fb.url(), k))
	<-c.Done()
	require.ErrorContains(t, c.Err(), "reset")
	require.Equal(t, websocket.CloseAbnormalClosure, c.CloseCode())
}

func TestCloseTwiceAndPendingRequests(t *testing.T) {
	k := newKeys(t)
	got := make(chan struct{})
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		c.next()
		close(got)
	})
	c := dial(t, testOptions(t, fb.url(), k))
	errCh := make(chan error, 1)
	go func() {
		_, err := c.ListState(ctxT(t))
		errCh <- err
	}()
	<-got
	require.Nil(t, c.Err())
	require.Zero(t, c.CloseCode())

	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() { defer wg.Done(); _ = c.Close() }()
	}
	wg.Wait()
	require.NoError(t, c.Close())
	require.ErrorIs(t, <-errCh, ErrClosed)
	require.ErrorIs(t, c.Err(), ErrClosed)
	require.ErrorIs(t, c.SetSummary(ctxT(t), "x"), ErrClosed)
	_, err := c.MessageStatus(ctxT(t), "m")
	require.Error(t, err)
}

func TestCloseUnblocksSlowConsumer(t *testing.T) {
	k := newKeys(t)
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		for i := range 10 {
			// The client closes while these are written (that is the point): a write after
			// its close fails, and the rest are not needed.
			if c.trySend(protocol.Push{MessageID: "m" + itoa(i)}) != nil {
				return
			}
		}
	})
	opts := testOptions(t, fb.url(), k)
	opts.PushBuffer = 1
	c := dial(t, opts)
	require.Eventually(t, func() bool { return len(c.Pushes()) == 1 }, 5*time.Second, 5*time.Millisecond)
	done := make(chan struct{})
	go func() { _ = c.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close blocked behind a full push channel")
	}
}

func TestFireAndForgetAndRaw(t *testing.T) {
	k := newKeys(t)
	frames := make(chan protocol.ClientMessage, 16)
	raw := make(chan []byte, 1)
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		for range 7 {
			m := c.next()
			frames <- m
			if s, ok := m.(*protocol.SetStatus); ok {
				// An error for a fire-and-forget message arrives on Errors with its reqId.
				c.send(protocol.Error{Code: protocol.CodeBadRequest, Message: "status", ReqID: s.ReqID})
			}
		}
		f := c.nextRaw()
		raw <- f
		c.send(protocol.Error{Code: protocol.CodeBadRequest, Message: "invalid JSON: unexpected end at offset 5"})
	})
	c := dial(t, testOptions(t, fb.url(), k))
	ctx := ctxT(t)
	require.NoError(t, c.SetStatus(ctx, protocol.StatusDND))
	require.NoError(t, c.SetSummary(ctx, "fixing bug"))
	require.NoError(t, c.JoinGroup(ctx, "eng", "lead"))
	require.NoError(t, c.LeaveGroup(ctx, "ops"))
	require.NoError(t, c.SetState(ctx, "k", map[string]int{"a": 1}))
	require.NoError(t, c.AckMessages(ctx, "b1"))
	require.NoError(t, c.AckMessages(ctx, "b2", "b3"))
	require.NoError(t, c.AckMessages(ctx))

	st := (<-frames).(*protocol.SetStatus)
	require.Equal(t, protocol.StatusDND, st.Status)
	e, err := c.NextError(ctx)
	require.NoError(t, err)
	require.Equal(t, st.ReqID, e.ReqID)

	require.Equal(t, "fixing bug", (<-frames).(*protocol.SetSummary).Summary)
	jg := (<-frames).(*protocol.JoinGroup)
	require.Equal(t, "eng", jg.Name)
	require.Equal(t, "lead", jg.Role)
	require.Equal(t, "ops", (<-frames).(*protocol.LeaveGroup).Name)
	ss := (<-frames).(*protocol.SetState)
	require.Equal(t, "k", ss.Key)
	require.JSONEq(t, `{"a":1}`, string(ss.Value))
	require.Equal(t, []string{"b1"}, (<-frames).(*protocol.ClientAck).IDs())
	require.Equal(t, []string{"b2", "b3"}, (<-frames).(*protocol.ClientAck).IDs())

	require.NoError(t, c.SendRaw(ctx, []byte(`{"typ`)))
	require.Equal(t, `{"typ`, string(<-raw))
	e, err = c.NextError(ctx)
	require.NoError(t, err)
	require.Contains(t, e.Message, "invalid JSON")
}

func TestAckMessagesSplits(t *testing.T) {
	k := newKeys(t)
	counts := make(chan int, 4)
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		for range 2 {
			m, _ := c.next().(*protocol.ClientAck)
			if m != nil {
				counts <- len(m.IDs())
			}
		}
	})
	c := dial(t, testOptions(t, fb.url(), k))
	ids := make([]string, protocol.MaxAckIDs+5)
	for i := range ids {
		ids[i] = "b" + itoa(i)
	}
	require.NoError(t, c.AckMessages(ctxT(t), ids...))
	require.Equal(t, protocol.MaxAckIDs, <-counts)
	require.Equal(t, 5, <-counts)
}

func TestRequestContextCancel(t *testing.T) {
	k := newKeys(t)
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		first, _ := c.next().(*protocol.MessageStatus)
		second, _ := c.next().(*protocol.MessageStatus)
		if first == nil || second == nil {
			return
		}
		// Answer the abandoned request late: it must not be taken for the
		// answer to the next one.
		c.send(protocol.MessageStatusResult{MessageID: "late", ReqID: first.ReqID})
		c.send(protocol.MessageStatusResult{MessageID: second.MessageID, Delivered: true, DeliveredAt: "t", ReqID: second.ReqID})
	})
	c := dial(t, testOptions(t, fb.url(), k))
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := c.MessageStatus(ctx, "first")
	require.ErrorIs(t, err, context.DeadlineExceeded)

	r, err := c.MessageStatus(ctxT(t), "second")
	require.NoError(t, err)
	require.Equal(t, "second", r.MessageID)
	require.True(t, r.Delivered)
	require.Equal(t, "t", r.DeliveredAt)
}

func TestIdleTimeout(t *testing.T) {
	k := newKeys(t)
	pinging := make(chan struct{})
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		// Pings keep the connection alive well past the idle timeout (ten
		// per timeout, a wide margin), then silence ends it.
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for range 15 {
			<-tick.C
			c.mu.Lock()
			_ = c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(time.Second))
			c.mu.Unlock()
		}
		close(pinging)
	})
	opts := testOptions(t, fb.url(), k)
	opts.IdleTimeout = time.Second
	c := dial(t, opts)
	<-pinging
	select {
	case <-c.Done():
		t.Fatal("closed while pinged")
	default:
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("idle connection not closed")
	}
	require.Error(t, c.Err())
}

func TestAbortDropsWithoutCloseFrame(t *testing.T) {
	k := newKeys(t)
	seen := make(chan error, 1)
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		for range c.read {
		}
		// The reader goroutine ended; learn why from a fresh read.
		_, _, err := c.ws.ReadMessage()
		seen <- err
	})
	c := dial(t, testOptions(t, fb.url(), k))
	c.Abort()
	c.Abort() // safe twice
	require.NoError(t, c.Close())
	require.ErrorIs(t, c.Err(), ErrClosed)
	err := <-seen
	require.True(t, websocket.IsCloseError(err, websocket.CloseAbnormalClosure), "broker saw %v", err)
}

// A write that times out (the broker stopped reading this socket: its back-pressure while the
// client is slow to read, or a dead link) leaves the connection unwritable. The client ends it,
// so Done fires and a caller reconnects; every later request had failed at once on a
// connection that still looked alive (a load run counted 60,000 such "refusals").
func TestWriteTimeoutEndsTheConnection(t *testing.T) {
	release := make(chan struct{})
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		<-release // reads nothing more: the reader stops once its buffer is full
	})
	t.Cleanup(func() { close(release) })
	opts := testOptions(t, fb.url(), newKeys(t))
	opts.WriteTimeout = 200 * time.Millisecond
	c := dial(t, opts)
	big := strings.Repeat("x", 256<<10)
	var err error
	for range 1000 {
		if err = c.SetSummary(ctxT(t), big); err != nil {
			break
		}
	}
	require.Error(t, err, "the writes fill the socket and one times out")
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the connection is still open after its write failed")
	}
	require.ErrorContains(t, c.Err(), "write")
	_, err = c.Send(ctxT(t), "peer", protocol.PriorityNow, "n", "c", "")
	require.Error(t, err, "a later request fails as the connection's end, not as a write")
}

// stallConn holds its writes while stalled, as a socket whose peer stopped reading does: a
// write waits until the gate opens or its deadline passes.
type stallConn struct {
	net.Conn
	mu       sync.Mutex
	stalled  bool
	broken   bool // writes fail at once, as on a reset socket
	deadline time.Time
	open     chan struct{} // closed: writes go through again
	waiting  chan struct{} // closed when a write first waits
	once     sync.Once
}

func (c *stallConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return c.Conn.SetWriteDeadline(t)
}

func (c *stallConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	stalled, broken, deadline := c.stalled, c.broken, c.deadline
	c.mu.Unlock()
	if broken {
		return 0, &net.OpError{Op: "write", Net: "tcp", Err: syscall.ECONNRESET}
	}
	if stalled {
		c.once.Do(func() { close(c.waiting) })
		var timeout <-chan time.Time
		if !deadline.IsZero() {
			timer := time.NewTimer(time.Until(deadline))
			defer timer.Stop()
			timeout = timer.C
		}
		select {
		case <-c.open:
		case <-timeout:
			return 0, os.ErrDeadlineExceeded
		}
	}
	return c.Conn.Write(p)
}

// dialStallable dials through a stallConn, which the test then stalls or breaks.
func dialStallable(t *testing.T, opts Options) (*Client, *stallConn) {
	sc := &stallConn{open: make(chan struct{}), waiting: make(chan struct{})}
	opts.netDial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		sc.Conn = conn
		return sc, err
	}
	return dial(t, opts), sc
}

// A ping that arrives while a write waits on a full socket is answered without stopping the
// read loop: pushes and replies keep coming in. A read loop that waited to write the pong
// stopped reading for as long as the write waited (up to its timeout), so the broker's frames
// to a client that was only waiting to write piled up, as for a client that stopped reading.
func TestPingDuringAStalledWriteKeepsReading(t *testing.T) {
	ready := make(chan struct{})
	release := make(chan struct{})
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		<-ready
		c.mu.Lock()
		require.NoError(t, c.ws.WriteControl(websocket.PingMessage, []byte("p"), time.Now().Add(5*time.Second)))
		c.mu.Unlock()
		c.send(protocol.Push{MessageID: "after-ping"})
		<-release
	})
	opts := testOptions(t, fb.url(), newKeys(t))
	opts.WriteTimeout = time.Minute // longer than the test waits for the push
	c, sc := dialStallable(t, opts)
	t.Cleanup(func() {
		close(sc.open)
		close(release)
	})

	sc.mu.Lock()
	sc.stalled = true
	sc.mu.Unlock()
	writeDone := make(chan error, 1)
	go func() { writeDone <- c.SetSummary(context.Background(), "waits on a full socket") }()
	<-sc.waiting // the write holds the connection's writer, waiting
	close(ready)

	select {
	case p := <-c.Pushes():
		require.Equal(t, "after-ping", p.MessageID)
	case <-time.After(10 * time.Second):
		t.Fatal("the read loop stopped at the ping while a write waited")
	}
	select {
	case err := <-writeDone:
		t.Fatalf("the stalled write ended early: %v", err)
	default:
	}
}

// A pong that the socket fails ends the connection, as any failed write does: a client that
// only listens learns at once, not at the broker's pong deadline.
func TestFailedPongEndsTheConnection(t *testing.T) {
	ready := make(chan struct{})
	fb := newFakeBroker(t, func(c *brokerConn) {
		c.acceptHello()
		<-ready
		c.mu.Lock()
		_ = c.ws.WriteControl(websocket.PingMessage, []byte("p"), time.Now().Add(5*time.Second))
		c.mu.Unlock()
	})
	c, sc := dialStallable(t, testOptions(t, fb.url(), newKeys(t)))
	sc.mu.Lock()
	sc.broken = true
	sc.mu.Unlock()
	close(ready)
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the connection is still open after its pong failed")
	}
	require.ErrorContains(t, c.Err(), "write")
}
