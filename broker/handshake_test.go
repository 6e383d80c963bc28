package broker

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

func helloErr(t *testing.T, err error) *client.HelloError {
	t.Helper()
	require.Error(t, err)
	var he *client.HelloError
	require.True(t, errors.As(err, &he), "want a HelloError, got %v", err)
	return he
}

func TestHandshakeErrors(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice := m.member("alice")
	other := c.mesh(0).member("stranger") // a member of another mesh

	cases := map[string]struct {
		member    *testMember
		opt       func(*client.Options)
		code      string
		closeCode int
	}{
		"timestamp_skew": {alice, func(o *client.Options) { o.Now = func() time.Time { return time.Now().Add(-2 * time.Minute) } },
			protocol.CodeTimestampSkew, protocol.CloseHelloRefused},
		"malformed pubkey": {alice, func(o *client.Options) { o.PrepareHello = func(h *protocol.Hello) { h.Pubkey = "xyz" } },
			protocol.CodeMalformed, protocol.CloseHelloRefused},
		"malformed signature": {alice, func(o *client.Options) { o.PrepareHello = func(h *protocol.Hello) { h.Signature = "abcd" } },
			protocol.CodeMalformed, protocol.CloseHelloRefused},
		"bad_signature": {alice, func(o *client.Options) {
			o.PrepareHello = func(h *protocol.Hello) { h.Signature = strings.Repeat("ab", 64) }
		}, protocol.CodeBadSignature, protocol.CloseHelloRefused},
		"unauthorized: other mesh's member": {other, nil, protocol.CodeUnauthorized, protocol.CloseHelloRefused},
		"unauthorized: unknown mesh": {alice, func(o *client.Options) { o.MeshID = "no-such-mesh" },
			protocol.CodeUnauthorized, protocol.CloseHelloRefused},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			var opts []func(*client.Options)
			if tc.opt != nil {
				opts = append(opts, tc.opt)
			}
			_, err := m.tryDial(0, tc.member, opts...)
			he := helloErr(t, err)
			require.Equal(t, tc.code, he.Code)
			require.Equal(t, tc.closeCode, he.CloseCode)
		})
	}

	t.Run("revoked", func(t *testing.T) {
		bob := m.member("bob")
		_, err := c.pool.Exec(context.Background(), `UPDATE claudemesh.member SET revoked_at = now() WHERE id = $1`, bob.id)
		require.NoError(t, err)
		he := helloErr(t, func() error { _, err := m.tryDial(0, bob); return err }())
		require.Equal(t, protocol.CodeRevoked, he.Code)
		require.Equal(t, protocol.CloseRevoked, he.CloseCode)
	})

	t.Run("session_key_taken", func(t *testing.T) {
		pub, _, _ := generateKey()
		carol, dave := m.member("carol"), m.member("dave")
		cl := m.dial(0, carol, func(o *client.Options) { o.SessionKey = pub; o.SessionID = "k1" })
		_ = cl.Close()
		he := helloErr(t, func() error {
			_, err := m.tryDial(0, dave, func(o *client.Options) { o.SessionKey = pub; o.SessionID = "k2" })
			return err
		}())
		require.Equal(t, protocol.CodeSessionKeyTaken, he.Code)
	})
}

func TestHandshakeCapacityIsClusterWide(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, nil)
	m := c.mesh(2)
	m.dial(0, m.member("a"))
	m.dial(1, m.member("b"))
	he := helloErr(t, func() error { _, err := m.tryDial(1, m.member("c")); return err }())
	require.Equal(t, protocol.CodeCapacity, he.Code)
	require.Equal(t, protocol.CloseHelloRefused, he.CloseCode)
}

// A hook that fired before its session's hello waits for that hello (the first-turn race). A
// hello refused because the mesh is full must not use it up: the session's next hello, once
// there is room, starts with the hook's status (since migration 00029 a hello takes it only
// after its capacity check).
func TestHookWaitingForItsSessionOutlivesACapacityRefusal(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(1)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	code, res := postHook(t, c.nodes[0], bob, protocol.HookRequest{CWD: "/repo/bob", Status: "working", SessionID: "s-bob"})
	require.Equal(t, http.StatusOK, code)
	require.True(t, res.Pending, "no session yet: the status waits for its hello")

	asBob := func(o *client.Options) { o.SessionID = "s-bob"; o.CWD = "/repo/bob" }
	he := helloErr(t, func() error { _, err := m.tryDial(0, bob, asBob); return err }())
	require.Equal(t, protocol.CodeCapacity, he.Code)

	require.NoError(t, a.Close())
	var b *client.Client
	dbtest.WaitFor(t, 10*time.Second, "bob let in once alice left", func() bool {
		var err error
		b, err = m.tryDial(0, bob, asBob)
		return err == nil
	})
	peers, err := b.ListPeers(ctxT(t))
	require.NoError(t, err)
	require.Len(t, peers, 1)
	require.Equal(t, protocol.StatusWorking, peers[0].Status, "the hook's status, kept through the refusal")
}

// A full mesh tells nobody but its members that it is full: capacity is the last check of a
// hello, so an outsider with a valid key of its own is told unauthorized, and a revoked member
// revoked (close 4002, which clients stop retrying), as they would be with room to spare.
func TestFullMeshTellsOnlyItsMembersItIsFull(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(1)
	m.dial(0, m.member("a"))
	outsider := c.mesh(0).member("eve") // a member of another mesh, signing with its own key
	he := helloErr(t, func() error { _, err := m.tryDial(0, outsider); return err }())
	require.Equal(t, protocol.CodeUnauthorized, he.Code)

	gone := m.member("gone")
	_, err := c.pool.Exec(context.Background(), `UPDATE claudemesh.member SET revoked_at = now() WHERE id = $1`, gone.id)
	require.NoError(t, err)
	he = helloErr(t, func() error { _, err := m.tryDial(0, gone); return err }())
	require.Equal(t, protocol.CodeRevoked, he.Code)
	require.Equal(t, protocol.CloseRevoked, he.CloseCode)

	he = helloErr(t, func() error { _, err := m.tryDial(0, m.member("b")); return err }())
	require.Equal(t, protocol.CodeCapacity, he.Code, "a member is told the mesh is full")
}

func rawDial(t *testing.T, url string) *websocket.Conn {
	t.Helper()
	ws, _, err := websocket.DefaultDialer.Dial(url, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ws.Close() })
	return ws
}

func readJSON(t *testing.T, ws *websocket.Conn) map[string]any {
	t.Helper()
	var v map[string]any
	require.NoError(t, ws.SetReadDeadline(time.Now().Add(5*time.Second)))
	require.NoError(t, ws.ReadJSON(&v))
	return v
}

func TestNoHelloAndBadFramesKeepSessionOpen(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	ws := rawDial(t, c.wsURL(0))
	require.NoError(t, ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"list_peers","_reqId":"r1"}`)))
	v := readJSON(t, ws)
	require.Equal(t, "error", v["type"])
	require.Equal(t, protocol.CodeNoHello, v["code"])
	require.Equal(t, "r1", v["_reqId"])
	// Whatever else is wrong with it, a message before hello is told to send hello first; a
	// broken hello, or a frame that names no type, what is wrong.
	for frame, code := range map[string]string{
		`{"type":"teleport","_reqId":"r2"}`:         protocol.CodeNoHello,
		`{"type":"send","_reqId":"r2"}`:             protocol.CodeNoHello,
		`{"type":"hello","pubkey":1,"_reqId":"r2"}`: protocol.CodeBadRequest,
		`{"_reqId":"r2"}`:                           protocol.CodeBadRequest,
	} {
		require.NoError(t, ws.WriteMessage(websocket.TextMessage, []byte(frame)))
		v := readJSON(t, ws)
		require.Equal(t, code, v["code"], frame)
		require.Equal(t, "r2", v["_reqId"], frame)
	}

	m := c.mesh(0)
	cl := m.dial(0, m.member("alice"))
	ctx := ctxT(t)
	frames := map[string]string{
		`not json`:                     protocol.CodeBadRequest,
		`{"type":"send","_reqId":"q"}`: protocol.CodeBadRequest,
		`{"type":"send","targetSpec":"*","priority":"urgent","nonce":"n","ciphertext":"c","_reqId":"q"}`: protocol.CodeBadRequest,
		`{"type":"send","targetSpec":"*","priority":"now","nonce":1,"ciphertext":"c","_reqId":"q"}`:      protocol.CodeBadRequest,
		`{"type":"set_status","status":"sleeping","_reqId":"q"}`:                                         protocol.CodeBadRequest,
		`{"type":"join_group","_reqId":"q"}`:                                                             protocol.CodeBadRequest,
		`{"type":"get_state","key":5,"_reqId":"q"}`:                                                      protocol.CodeBadRequest,
		`{"type":"message_status","_reqId":"q"}`:                                                         protocol.CodeBadRequest,
		`{"type":"client_ack","_reqId":"q"}`:                                                             protocol.CodeBadRequest,
		`{"type":"teleport","_reqId":"q"}`:                                                               protocol.CodeUnknownMessageType,
		`{"_reqId":"q"}`:                                                                                 protocol.CodeBadRequest,
	}
	for frame, code := range frames {
		require.NoError(t, cl.SendRaw(ctx, []byte(frame)))
		e, err := cl.NextError(ctx)
		require.NoError(t, err, frame)
		require.Equal(t, code, e.Code, "frame %s: %s", frame, e.Message)
		if strings.Contains(frame, `"_reqId":"q"`) && frame != `not json` {
			require.Equal(t, "q", e.ReqID, frame)
		}
	}
	// Today's CLI reports its counters every 60 s with no _reqId and expects no reply: an
	// error would reach whichever of its requests was waiting. The next error is the next
	// bad frame's.
	require.NoError(t, cl.SendRaw(ctx, []byte(`{"type":"set_stats","stats":{"messagesIn":3,"toolCalls":7,"uptime":60}}`)))
	require.NoError(t, cl.SendRaw(ctx, []byte(`{"type":"teleport","_reqId":"after-stats"}`)))
	e, err := cl.NextError(ctx)
	require.NoError(t, err)
	require.Equal(t, "after-stats", e.ReqID, "set_stats got a reply: %s %s", e.Code, e.Message)
	// Still open and working.
	_, err = cl.ListPeers(ctx)
	require.NoError(t, err)
	_, err = cl.MessageStatus(ctx, "00000000-0000-0000-0000-000000000000")
	var perr *protocol.Error
	require.ErrorAs(t, err, &perr)
	require.Equal(t, protocol.CodeNotFound, perr.Code)
}

func TestFrameTooLargeCloses1009(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.MaxMessageBytes = 2048 })
	m := c.mesh(0)
	cl := m.dial(0, m.member("alice"))
	big := `{"type":"send","targetSpec":"*","priority":"now","nonce":"n","ciphertext":"` + strings.Repeat("A", 4096) + `"}`
	_ = cl.SendRaw(ctxT(t), []byte(big))
	select {
	case <-cl.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("socket not closed")
	}
	require.Equal(t, websocket.CloseMessageTooBig, cl.CloseCode())
	// Other sessions are unaffected.
	other := m.dial(0, m.member("bob"))
	_, err := other.ListPeers(ctxT(t))
	require.NoError(t, err)
}

func TestHelloThenImmediateFrameProcessedAfterHello(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice := m.member("alice")
	ws := rawDial(t, c.wsURL(0))
	ts := time.Now().UnixMilli()
	hello := protocol.Hello{MeshID: m.id, MemberID: alice.id, Pubkey: alice.pub, SessionID: "x", PID: 1, CWD: "/",
		Timestamp: ts, Signature: protocol.SignHello(alice.key, m.id, alice.id, alice.pub, ts), ReqID: "h"}
	hb, _ := hello.MarshalJSON()
	require.NoError(t, ws.WriteMessage(websocket.TextMessage, hb))
	require.NoError(t, ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"list_peers","_reqId":"p"}`)))
	v := readJSON(t, ws)
	require.Equal(t, "hello_ack", v["type"])
	require.Equal(t, "h", v["_reqId"])
	v = readJSON(t, ws)
	require.Equal(t, "peers_list", v["type"])
	require.Len(t, v["peers"], 1)
}

// A hello leaves its audit entry on the mesh's chain: who connected, on which replica, as which
// presence, resumed or not, in which role (migration 00024 writes it with one insert).
func TestHelloRecordsPeerConnected(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, nil)
	m := c.mesh(0)
	alice := m.member("alice")
	a := m.dial(1, alice)
	recs, err := audit.Tail(ctxT(t), c.pool, m.id, 10)
	require.NoError(t, err)
	var found []audit.Record
	for _, r := range recs {
		if r.Type == audit.PeerConnected {
			found = append(found, r)
		}
	}
	require.Len(t, found, 1)
	require.Equal(t, alice.pub, found[0].Actor)
	require.JSONEq(t, `{"node":"n1","presence_id":"`+a.HelloAck().PresenceID+`","resumed":false,"role":"control-plane"}`,
		string(found[0].Data))
	n, err := audit.Verify(ctxT(t), c.pool, m.id)
	require.NoError(t, err)
	require.Positive(t, n)
}

func TestPlainHelloIsTheMembersByItsKeyAlone(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice := m.member("alice")
	// A client holding another id for its key (the protocol: unauthorized means no live member
	// with that mesh and pubkey).
	cl := m.dial(0, alice, func(o *client.Options) { o.MemberID = "00000000-0000-0000-0000-000000000000" })
	require.Equal(t, alice.name, cl.HelloAck().MemberDisplayName)
	// A key that is no member's is still refused.
	_, err := m.tryDial(0, &testMember{id: alice.id, key: newKey(t), name: "mallory"})
	var perr *protocol.Error
	require.ErrorAs(t, err, &perr)
	require.Equal(t, protocol.CodeUnauthorized, perr.Code)
}

// A client reconnecting in a loop is refused rate_limited (close 1013, retry later) beyond
// HELLO_RATE_LIMIT_PER_SESSION_PER_MIN on a replica, before any database work; the member's
// other sessions and other members are not touched.
func TestHellosPerSessionAreLimited(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.HelloRatePerSessionMin = 3 })
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	for range 3 {
		a := m.dial(0, alice, func(o *client.Options) { o.SessionID = "looping" })
		require.NoError(t, a.Close())
	}
	_, err := m.tryDial(0, alice, func(o *client.Options) { o.SessionID = "looping" })
	he := helloErr(t, err)
	require.Equal(t, protocol.CodeRateLimited, he.Code, he.Message)
	require.Equal(t, protocol.CloseTryAgainLater, he.CloseCode)
	require.NotEmpty(t, m.dial(0, alice, func(o *client.Options) { o.SessionID = "another" }).HelloAck().PresenceID,
		"the member's other session")
	require.NotEmpty(t, m.dial(0, bob).HelloAck().PresenceID, "another member's hello")
}

// A member opening a fresh session id per hello is bounded too, by
// HELLO_RATE_LIMIT_PER_MEMBER_PER_MIN on a replica; other members are not touched.
func TestHellosPerMemberAreLimited(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.HelloRatePerMemberMin = 3 })
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	for i := range 3 {
		a := m.dial(0, alice, func(o *client.Options) { o.SessionID = fmt.Sprintf("fresh-%d", i) })
		require.NoError(t, a.Close())
	}
	_, err := m.tryDial(0, alice, func(o *client.Options) { o.SessionID = "fresh-3" })
	he := helloErr(t, err)
	require.Equal(t, protocol.CodeRateLimited, he.Code, he.Message)
	require.Contains(t, he.Message, "this member")
	require.Equal(t, protocol.CloseTryAgainLater, he.CloseCode)
	require.NotEmpty(t, m.dial(0, bob).HelloAck().PresenceID, "another member's hello")
}

// A key the operator readmits with `broker member add` after its member was revoked keeps the
// session keys it had used: its own key as its session key, or a key of its own sessions. They
// stayed bound to the revoked row: the readmitted member's hellos presenting them were refused
// session_key_taken ("another member's"), and direct sends to them no_recipient.
func TestReaddedMemberKeepsItsSessionKeys(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	own := alice.key.Public().(ed25519.PublicKey)
	sessionKey, _, err := generateKey()
	require.NoError(t, err)
	for i, key := range []ed25519.PublicKey{own, sessionKey} {
		cl := m.dial(0, alice, func(o *client.Options) { o.SessionKey = key; o.SessionID = fmt.Sprintf("before-%d", i) })
		require.NoError(t, cl.Close())
	}
	_, err = c.nodes[0].Members().RevokeMember(ctxT(t), m.id, alice.pub)
	require.NoError(t, err)
	again, err := c.nodes[0].Members().AddMember(ctxT(t), membership.AddMemberParams{Mesh: m.id, Pubkey: alice.pub, DisplayName: "alice"})
	require.NoError(t, err)
	alice.id = again.ID

	m.dial(0, alice, func(o *client.Options) { o.SessionKey = own; o.SessionID = "own" })
	a := m.dial(0, alice, func(o *client.Options) { o.SessionKey = sessionKey; o.SessionID = "session" })
	b := m.dial(0, bob)
	ack, err := b.Send(ctxT(t), protocol.PubkeyHex(sessionKey), protocol.PriorityNow, "n", "c", "")
	require.NoError(t, err)
	require.True(t, ack.Queued, ack.Error)
	require.Equal(t, ack.MessageID, nextPush(t, a, 5*time.Second).MessageID)
}

// A member's plain hello proves nothing about its sessionPubkey: presenting the key of a live
// member of another mesh (every member of that mesh sees it) listed the presenter under that
// member's key, and bound the key to the presenter in its mesh for good, so the key's owner
// could never be added to it (`broker member add`, /join: "a session key in the mesh").
func TestSessionKeyIsNoOtherMeshsMemberKey(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m1, m2 := c.mesh(0), c.mesh(0)
	victim := m1.member("victim")
	mallory, carol := m2.member("mallory"), m2.member("carol")
	victimKey := victim.key.Public().(ed25519.PublicKey)

	squat, helloErrOfSquat := m2.tryDial(0, mallory, func(o *client.Options) { o.SessionKey = victimKey; o.SessionID = "squat" })
	if squat != nil {
		require.NoError(t, squat.Close())
	}

	// The victim joins the mesh later, and direct sends to its key reach it.
	added, err := c.nodes[0].Members().AddMember(ctxT(t), membership.AddMemberParams{Mesh: m2.id, Pubkey: victim.pub, DisplayName: "victim"})
	require.NoError(t, err, "the owner of the key is added to the mesh")
	victim.id = added.ID
	v := m2.dial(0, victim)
	ack, err := m2.dial(0, carol).Send(ctxT(t), victim.pub, protocol.PriorityNow, "n", "c", "")
	require.NoError(t, err)
	require.True(t, ack.Queued, ack.Error)
	require.Equal(t, ack.MessageID, nextPush(t, v, 5*time.Second).MessageID)

	require.Equal(t, protocol.CodeSessionKeyTaken, helloErr(t, helloErrOfSquat).Code)

	// Its own key of another mesh stays a member's to use.
	other := m1.member("mallory-elsewhere")
	own := other.key.Public().(ed25519.PublicKey)
	alsoHere := m2.member("mallory-elsewhere")
	alsoHere.key, alsoHere.pub = other.key, other.pub
	_, err = c.pool.Exec(ctxT(t), `UPDATE claudemesh.member SET pubkey = $1 WHERE id = $2`, other.pub, alsoHere.id)
	require.NoError(t, err)
	m2.dial(0, alsoHere, func(o *client.Options) { o.SessionKey = own; o.SessionID = "own" })
}
