package broker

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// Tests of issue 11: what the broker promises at its edges, tried the way an attacker or a
// careless client would.

// noClientAck dials like an April client: no client_ack capability, so a push counts as
// delivered once written to the socket.
func noClientAck(o *client.Options) { o.Capabilities = []string{protocol.CapSystemEvents} }

// sendPipelined writes n sends from cl without waiting for acks (ciphertext "<prefix><i>").
func sendPipelined(t *testing.T, cl *client.Client, target, prefix string, n int, size int) {
	t.Helper()
	pad := strings.Repeat("A", size)
	for i := range n {
		frame := fmt.Sprintf(`{"type":"send","targetSpec":%q,"priority":"now","nonce":"n","ciphertext":"%s%d%s"}`, target, prefix, i, pad)
		require.NoError(t, cl.SendRaw(ctxT(t), []byte(frame)))
	}
}

// readAll reads n pushes and checks they are "<prefix>0".."<prefix>n-1" in order, each once.
func readAll(t *testing.T, cl *client.Client, prefix string, n int, within time.Duration) {
	t.Helper()
	for i := range n {
		p := nextPush(t, cl, within)
		want := fmt.Sprintf("%s%d", prefix, i)
		require.True(t, strings.HasPrefix(p.Ciphertext, want) && !isDigit(p.Ciphertext[len(want):]),
			"push %d: got %.20q, want %q (in order, each once)", i, p.Ciphertext, want)
	}
}

type ed25519PublicKey = ed25519.PublicKey

func testutilCounter(c prometheus.Counter) float64 { return testutil.ToFloat64(c) }

func isDigit(s string) bool { return s != "" && s[0] >= '0' && s[0] <= '9' }

func TestBurstWithoutClientAckArrivesComplete(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, nil)
	for name, node := range map[string]int{"same replica": 0, "other replica": 1} {
		t.Run(name, func(t *testing.T) {
			m := c.mesh(0)
			alice, bob := m.member("alice"), m.member("bob")
			a := m.dial(0, alice)
			b := m.dial(node, bob, noClientAck)
			// 600 pipelined sends outrun any socket queue: the window keeps what does not
			// fit in the table, and the drain sends it as the socket takes it.
			sendPipelined(t, a, bob.pub, "m", 600, 64)
			readAll(t, b, "m", 600, 10*time.Second)
			dbtest.WaitFor(t, 10*time.Second, "every delivery recorded as delivered", func() bool {
				var open int
				_ = c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.delivery
					WHERE recipient_member_id = $1 AND state <> 'acked'`, bob.id).Scan(&open)
				return open == 0
			})
			require.Equal(t, client.CloseError{}.Code, b.CloseCode(), "bob was never closed")
		})
	}
}

func TestBacklogWithoutClientAckArrivesCompleteOnEveryReconnect(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	const n = 3000
	sendPipelined(t, a, bob.pub, "m", n, 32)
	dbtest.WaitFor(t, 30*time.Second, "3,000 messages stored for offline bob", func() bool {
		var stored int
		_ = c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.delivery WHERE recipient_member_id = $1`, bob.id).Scan(&stored)
		return stored == n
	})
	b := m.dial(1, bob, noClientAck)
	readAll(t, b, "m", n, 10*time.Second)
	// Written is delivered for this connection once its replica records it: a reconnect taking
	// the session over on another replica before that may get a push again (at-least-once,
	// docs/protocol.md), as a CI run under load did once.
	dbtest.WaitFor(t, 10*time.Second, "every delivery recorded as delivered", func() bool {
		var open int
		_ = c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.delivery
			WHERE recipient_member_id = $1 AND state <> 'acked'`, bob.id).Scan(&open)
		return open == 0
	})
	require.NoError(t, b.Close())

	// Everything was delivered: a reconnect gets nothing old. A probe sent after it must be
	// the first push.
	b2 := m.dial(0, bob, noClientAck)
	probe, err := a.Send(ctxT(t), bob.pub, protocol.PriorityNow, "n", "probe", "")
	require.NoError(t, err)
	require.Equal(t, probe.MessageID, nextPush(t, b2, 10*time.Second).MessageID, "nothing re-sent from the backlog")
}

// A client without client_ack that stops reading is closed (4008) and loses nothing: what its
// socket held it reads as it resumes (the socket lingers), the rest comes at its next connection.
func TestStoppedReaderIsClosedAndLosesNothing(t *testing.T) {
	t.Parallel()
	stoppedReaderLosesNothing(t, false)
}

// The same client cut off at once (no linger: more than maxLingering closing, say), which then
// speaks before it reads: the replica's socket is gone, so the kernel answers with a reset and
// drops what it still had queued for bob. Those pushes never reached his machine; they were
// recorded as delivered when the kernel took them, and lost. Now they come at his next
// connection.
func TestStoppedReaderCutOffLosesNothing(t *testing.T) {
	t.Parallel()
	stoppedReaderLosesNothing(t, true)
}

// stoppedReaderLosesNothing: bob stops reading 32 MB of pushes, his replica closes him, he reads
// what reached him and reconnects; the two connections together get every message. cutOff: his
// socket closes at once (no linger) and he writes before he reads.
func stoppedReaderLosesNothing(t *testing.T, cutOff bool) {
	// A short stall timeout on bob's replica only: alice pipelines 32 MB, and on a loaded
	// machine her client may not read its acks within a second either (closed 4008, her
	// sends failed).
	c := newCluster(t, 2, func(cfg *Config) {
		if cfg.NodeID == "n1" {
			cfg.StallTimeout = time.Second
			cfg.noLinger = cutOff
		}
	})
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	// Bob's client stops reading: a push buffer of one that nobody drains, so the socket
	// fills up on both sides and the broker's writes block.
	b := m.dial(1, bob, noClientAck, func(o *client.Options) { o.PushBuffer = 1 })
	// 32 MB: more than loopback's socket buffers on both sides can hold.
	const n = 800
	sendPipelined(t, a, bob.pub, "m", n, 40<<10)
	dbtest.WaitFor(t, 30*time.Second, "the broker closed the session that stopped reading", func() bool {
		return c.nodes[1].Sessions() == 0
	})
	if cutOff {
		_ = b.SendRaw(ctxT(t), []byte(`{"type":"list_peers"}`))
	}
	// Bob reads again: what reached his socket before the close, then the close itself.
	got := map[string]bool{}
	for p := range b.Pushes() {
		got[strings.TrimRight(p.Ciphertext, "A")] = true
	}
	<-b.Done()
	t.Logf("%d of %d read on the first connection", len(got), n)
	if !cutOff {
		// 4008 when the close frame could still be written; a socket whose buffers are full
		// can only be dropped (1006).
		require.Contains(t, []int{protocol.CloseSlowConsumer, websocket.CloseAbnormalClosure}, b.CloseCode(), "ended by: %v", b.Err())
	}
	// Either way nothing is lost: what it read, plus what the next connection gets, is
	// everything.
	b2 := m.dial(0, bob, noClientAck)
	dbtest.WaitForExplained(t, 30*time.Second, "every message received across both connections", func() bool {
		for {
			select {
			case p := <-b2.Pushes():
				got[strings.TrimRight(p.Ciphertext, "A")] = true
				continue
			default:
			}
			return len(got) == n
		}
	}, func() string { return explainMissing(c, bob.id, "m", n, got) })
	for i := range n {
		require.True(t, got[fmt.Sprintf("m%d", i)], "message %d lost", i)
	}
}

// explainMissing says where the messages "<prefix>0".."<prefix>n-1" that got lacks stand in
// the tables: not stored (the send failed), acked (recorded as delivered, so lost on the way),
// or open (not yet pushed again), with the replicas' session counts.
func explainMissing(c *testCluster, recipient, prefix string, n int, got map[string]bool) string {
	var missing []string
	for i := range n {
		if id := fmt.Sprintf("%s%d", prefix, i); !got[id] {
			missing = append(missing, id)
		}
	}
	out := fmt.Sprintf("%d of %d missing, first %q", len(missing), n, missing[:min(len(missing), 10)])
	for i, node := range c.nodes {
		out += fmt.Sprintf("; replica %d: %d sessions", i, node.Sessions())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rows, err := c.pool.Query(ctx, `SELECT coalesce(d.state, CASE WHEN e.id IS NULL THEN 'not stored' ELSE 'no delivery row' END),
			coalesce(d.pushed_node, ''), count(*)
		FROM unnest($2::text[]) AS x(m)
		LEFT JOIN claudemesh.envelope e ON left(e.ciphertext, length(x.m) + 1) = x.m || 'A'
		LEFT JOIN claudemesh.delivery d ON d.envelope_id = e.id AND d.recipient_member_id = $1
		GROUP BY 1, 2 ORDER BY 1, 2`, recipient, missing)
	if err != nil {
		return out + "; " + err.Error()
	}
	defer rows.Close()
	for rows.Next() {
		var state, node string
		var count int
		if err := rows.Scan(&state, &node, &count); err != nil {
			return out + "; " + err.Error()
		}
		out += fmt.Sprintf("; %s (node %q): %d", state, node, count)
	}
	return out
}

func TestNULRefusedAtTheEdgeAndAloneInABatch(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice, bob, mallory := m.member("alice"), m.member("bob"), m.member("mallory")
	a, b, x := m.dial(0, alice), m.dial(0, bob), m.dial(0, mallory)
	ctx := ctxT(t)

	// At the edge: bad_request naming the field; the session stays open.
	for frame, field := range map[string]string{
		`{"type":"send","targetSpec":"*","priority":"now","nonce":"n","ciphertext":"x\u0000y"}`: "ciphertext",
		`{"type":"set_summary","summary":"\u0000"}`:                                             "summary",
		`{"type":"set_state","key":"k\u0000","value":1}`:                                        "key",
		`{"type":"set_state","key":"k","value":"\u0000"}`:                                       "value",
	} {
		require.NoError(t, x.SendRaw(ctx, []byte(frame)))
		e, err := x.NextError(ctx)
		require.NoError(t, err)
		require.Equal(t, protocol.CodeBadRequest, e.Code, frame)
		require.True(t, strings.HasPrefix(e.Message, field+":"), "%s: %s", frame, e.Message)
	}

	// Behind the edge: a batch holding one send Postgres refuses (as if the edge had missed
	// it) stores everyone else's sends and refuses that one alone.
	srv := c.nodes[0]
	sessOf := func(cl *client.Client) *session { return srv.hub.get(cl.HelloAck().PresenceID) }
	failuresBefore := testutilCounter(srv.metrics.SendFailures)
	batch := []sendReq{
		{sess: sessOf(a), msg: &protocol.Send{TargetSpec: bob.pub, Priority: protocol.PriorityNow, Nonce: "n", Ciphertext: "one"}},
		{sess: sessOf(x), msg: &protocol.Send{TargetSpec: bob.pub, Priority: protocol.PriorityNow, Nonce: "n", Ciphertext: "bad\x00"}},
		{sess: sessOf(a), msg: &protocol.Send{TargetSpec: bob.pub, Priority: protocol.PriorityNow, Nonce: "n", Ciphertext: "two"}},
		{sess: sessOf(b), msg: &protocol.Send{TargetSpec: alice.pub, Priority: protocol.PriorityNow, Nonce: "n", Ciphertext: "three"}},
	}
	srv.committer.commit(context.Background(), batch, nil)
	require.Equal(t, "one", nextPush(t, b, 5*time.Second).Ciphertext)
	require.Equal(t, "two", nextPush(t, b, 5*time.Second).Ciphertext)
	require.Equal(t, "three", nextPush(t, a, 5*time.Second).Ciphertext)
	require.Equal(t, failuresBefore+1, testutilCounter(srv.metrics.SendFailures), "only the bad send refused")
	var stored int
	require.NoError(t, c.pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.envelope WHERE mesh_id = $1`, m.id).Scan(&stored))
	require.Equal(t, 3, stored)

	// Still open and working for everyone.
	ack, err := x.Send(ctx, alice.pub, protocol.PriorityNow, "n", "fine", "")
	require.NoError(t, err)
	require.True(t, ack.Queued)
}

func TestUnauthenticatedSocketsAreTimedOutAndCapped(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) {
		cfg.HelloTimeout = time.Second
		cfg.MaxUnauthPerSource = 3
	})
	srv := c.nodes[0]
	// A socket that never says hello is closed at the deadline, even though it answers pings.
	idle := rawDial(t, c.wsURL(0))
	require.NoError(t, idle.SetReadDeadline(time.Now().Add(10*time.Second)))
	_, _, err := idle.ReadMessage()
	var ce *websocket.CloseError
	require.ErrorAs(t, err, &ce, "closed by the broker")
	require.Equal(t, protocol.CloseHelloRefused, ce.Code)
	require.Equal(t, "hello_timeout", ce.Text)

	// Three more from this address are held; the fourth is refused before the upgrade.
	for range 3 {
		rawDial(t, c.wsURL(0))
	}
	dbtest.WaitFor(t, 5*time.Second, "three unauthenticated sockets counted", func() bool { return srv.peers.gate.unauthenticated() == 3 })
	_, resp, err := websocket.DefaultDialer.Dial(c.wsURL(0), nil)
	require.Error(t, err)
	require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	require.Equal(t, "1", resp.Header.Get("Retry-After"))

	// Once they time out, the address may connect again, and a socket that said hello no
	// longer counts.
	dbtest.WaitFor(t, 10*time.Second, "held sockets timed out", func() bool { return srv.peers.gate.unauthenticated() == 0 })
	m := c.mesh(0)
	cl := m.dial(0, m.member("alice"))
	require.Equal(t, 0, srv.peers.gate.unauthenticated())
	_, err = cl.ListPeers(ctxT(t))
	require.NoError(t, err, "an authenticated session is not held to the hello deadline")
}

func TestBadHellosCostNoQueries(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice := m.member("alice")
	var before int64
	require.NoError(t, c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.seen_signature`).Scan(&before))
	for range 20 {
		_, err := m.tryDial(0, alice, func(o *client.Options) {
			o.PrepareHello = func(h *protocol.Hello) { h.Signature = strings.Repeat("ab", 64) }
		})
		require.Equal(t, protocol.CodeBadSignature, helloErr(t, err).Code)
	}
	// The signature is checked first: nothing was recorded for the bad ones.
	var after int64
	require.NoError(t, c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.seen_signature`).Scan(&after))
	require.Equal(t, before, after)
}

func TestReplayedHelloRefusedOnAnyReplica(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, nil)
	m := c.mesh(0)
	alice := m.member("alice")
	var captured protocol.Hello
	a := m.dial(0, alice, func(o *client.Options) { o.PrepareHello = func(h *protocol.Hello) { captured = *h } })
	for node := range 2 {
		ws := rawDial(t, c.wsURL(node))
		replay := captured
		replay.DisplayName = "mallory" // unsigned fields may not change anything either
		hb, _ := replay.MarshalJSON()
		require.NoError(t, ws.WriteMessage(websocket.TextMessage, hb))
		v := readJSON(t, ws)
		require.Equal(t, "error", v["type"])
		require.Equal(t, protocol.CodeHelloReplayed, v["code"])
	}
	peers, err := a.ListPeers(ctxT(t))
	require.NoError(t, err, "the original session is untouched")
	require.Len(t, peers, 1)
	require.Equal(t, "alice", peers[0].DisplayName)
}

func TestSessionPubkeyMayNotBeAnotherMembersKey(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, nil)
	m := c.mesh(0)
	alice, bob, mallory := m.member("alice"), m.member("bob"), m.member("mallory")
	victim := bob.key.Public()
	_, err := m.tryDial(0, mallory, func(o *client.Options) { o.SessionKey = victim.(ed25519PublicKey) })
	require.Equal(t, protocol.CodeSessionKeyTaken, helloErr(t, err).Code)

	// Bob is unaffected, on any replica; mallory with her own key as session key is fine.
	b := m.dial(1, bob)
	x := m.dial(0, mallory, func(o *client.Options) { o.SessionKey = mallory.key.Public().(ed25519PublicKey) })
	a := m.dial(0, alice)
	ack, err := x.Send(ctxT(t), alice.pub, protocol.PriorityNow, "n", "hi", "")
	require.NoError(t, err)
	p := nextPush(t, a, 5*time.Second)
	require.Equal(t, ack.MessageID, p.MessageID)
	require.Equal(t, mallory.pub, p.SenderPubkey)
	require.Equal(t, mallory.pub, p.SenderMemberPubkey)
	peers, err := b.ListPeers(ctxT(t))
	require.NoError(t, err)
	for _, pr := range peers {
		if pr.DisplayName == "bob" {
			require.Equal(t, bob.pub, pr.Pubkey)
		} else {
			require.NotEqual(t, bob.pub, pr.Pubkey, "nobody else is listed with bob's key")
		}
	}
}

func TestStateQuotasAndGroupCap(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, func(cfg *Config) {
		cfg.MaxStateKeysPerMesh = 3
		cfg.MaxStateBytesPerMesh = 2048
		cfg.MaxStateValueBytes = 1024
		cfg.MaxGroupsPerSession = 2
	})
	m := c.mesh(0)
	a, b := m.dial(0, m.member("alice")), m.dial(1, m.member("bob"))
	ctx := ctxT(t)
	// set_state and join_group answer only when refused: a list_peers after one is a barrier
	// (replies come in request order), so the error, if any, is there by then.
	refusal := func(cl *client.Client, notify func() error) *protocol.Error {
		t.Helper()
		require.NoError(t, notify())
		_, err := cl.ListPeers(ctx)
		require.NoError(t, err)
		select {
		case e := <-cl.Errors():
			return e
		default:
			return nil
		}
	}
	stateErr := func(cl *client.Client, key string, value any) *protocol.Error {
		t.Helper()
		return refusal(cl, func() error { return cl.SetState(ctx, key, value) })
	}
	big := strings.Repeat("x", 1100)
	require.Equal(t, protocol.CodeTooLarge, stateErr(a, "big", big).Code)
	require.Nil(t, stateErr(a, "k1", strings.Repeat("a", 900)))
	require.Nil(t, stateErr(b, "k2", strings.Repeat("b", 900)))
	// A third value of 900 bytes would pass 2,048 bytes for the mesh, on any replica.
	e := stateErr(b, "k3", strings.Repeat("c", 900))
	require.NotNil(t, e)
	require.Equal(t, protocol.CodeQuotaExceeded, e.Code)
	require.Nil(t, stateErr(b, "k3", "small"))
	require.Equal(t, protocol.CodeQuotaExceeded, stateErr(a, "k4", 1).Code, "a fourth key")
	require.Nil(t, stateErr(a, "k1", "replaced"), "replacing a key frees its bytes")
	require.Nil(t, stateErr(a, "k2", strings.Repeat("d", 900)))
	entries, err := b.ListState(ctx)
	require.NoError(t, err)
	require.Len(t, entries, 3)

	group := func(join bool, name, role string) *protocol.Error {
		return refusal(a, func() error {
			if join {
				return a.JoinGroup(ctx, name, role)
			}
			return a.LeaveGroup(ctx, name)
		})
	}
	require.Nil(t, group(true, "g1", ""))
	require.Nil(t, group(true, "g2", ""))
	require.Nil(t, group(true, "g2", "lead"), "changing a role is not a new group")
	e = group(true, "g3", "")
	require.NotNil(t, e)
	require.Equal(t, protocol.CodeQuotaExceeded, e.Code)
	require.Nil(t, group(false, "g1", ""))
	require.Nil(t, group(true, "g3", ""))
}

func TestHooksProveWhoseSessionsTheyChange(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	m := c.mesh(0)
	alice, bob, mallory := m.member("alice"), m.member("bob"), m.member("mallory")
	a := m.dial(0, alice)
	b := m.dial(1, bob, func(o *client.Options) { o.SessionID = "claude-1"; o.CWD = "/repo/bob"; o.PID = 77 })
	ctx := ctxT(t)
	working := protocol.HookRequest{CWD: "/repo/bob", PID: 77, Status: protocol.StatusWorking, SessionID: "claude-1"}

	// Unsigned: refused by default (it proves nothing).
	code, res := postHook(t, c.nodes[2], nil, working)
	require.Equal(t, http.StatusUnauthorized, code)
	require.Contains(t, res.Error, "signed")
	// Signed by another member: only that member's sessions could match, and none does.
	code, res = postHook(t, c.nodes[2], mallory, working)
	require.Equal(t, http.StatusOK, code)
	require.True(t, res.Pending, "no session of mallory's matches")
	// A forged signature and a replayed one are refused.
	forged := working
	protocol.SignHook(mallory.key, &forged, time.Now())
	forged.Pubkey = bob.pub
	code, _ = postHook(t, c.nodes[2], nil, forged)
	require.Equal(t, http.StatusUnauthorized, code)
	signed := working
	protocol.SignHook(bob.key, &signed, time.Now())
	code, res = postHook(t, c.nodes[2], nil, signed)
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, b.HelloAck().PresenceID, res.PresenceID)
	code, _ = postHook(t, c.nodes[0], nil, signed)
	require.Equal(t, http.StatusUnauthorized, code, "a replayed hook, on another replica")

	// Bob's own signed hook held his next message; mallory's "idle" can't release it.
	dbtest.WaitFor(t, 5*time.Second, "bob working", func() bool {
		peers, err := a.ListPeers(ctx)
		return err == nil && len(peers) == 2 && peers[1].Status == protocol.StatusWorking
	})
	held, err := a.Send(ctx, bob.pub, protocol.PriorityNext, "n", "held", "")
	require.NoError(t, err)
	code, _ = postHook(t, c.nodes[0], mallory, protocol.HookRequest{CWD: "/repo/bob", PID: 77, Status: protocol.StatusIdle, SessionID: "claude-1"})
	require.Equal(t, http.StatusOK, code)
	probe, err := a.Send(ctx, bob.pub, protocol.PriorityNow, "n", "probe", "")
	require.NoError(t, err)
	require.Equal(t, probe.MessageID, nextPush(t, b, 5*time.Second).MessageID, "still held")
	code, _ = postHook(t, c.nodes[0], bob, protocol.HookRequest{CWD: "/repo/bob", PID: 77, Status: protocol.StatusIdle, SessionID: "claude-1"})
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, held.MessageID, nextPush(t, b, 5*time.Second).MessageID)
}

func TestUnsignedHooksWhenAllowed(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.HookAllowUnsigned = true; cfg.HookRatePerCallerMin = 5 })
	m := c.mesh(0)
	b := m.dial(0, m.member("bob"), func(o *client.Options) { o.CWD = "/repo/april" })
	code, res := postHook(t, c.nodes[0], nil, protocol.HookRequest{CWD: "/repo/april", Status: protocol.StatusWorking})
	require.Equal(t, http.StatusOK, code, "the April clients' form, allowed by the operator")
	require.Equal(t, b.HelloAck().PresenceID, res.PresenceID)
	// Varying the claimed pid does not escape the limit: it counts per client address.
	limited := false
	for pid := range 10 {
		code, _ = postHook(t, c.nodes[0], nil, protocol.HookRequest{CWD: "/x", PID: 100 + pid, Status: protocol.StatusIdle})
		limited = limited || code == http.StatusTooManyRequests
	}
	require.True(t, limited)
}

func TestMetricsBehindToken(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.MetricsToken = "m3trics" })
	url := "http://" + c.nodes[0].Addr() + "/metrics"
	resp, err := http.Get(url)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Authorization", "Bearer m3trics")
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)

	// On its own address, /metrics leaves the public port.
	c2 := newCluster(t, 1, func(cfg *Config) { cfg.MetricsAddr = "127.0.0.1:0" })
	resp, err = http.Get("http://" + c2.nodes[0].Addr() + "/metrics")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
	resp, err = http.Get("http://" + c2.nodes[0].MetricsAddr() + "/metrics")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
}

// A peer that closes gets the closing handshake answered (RFC 6455 §5.5.1) rather than the TCP
// connection dropped: its close completes with the code it sent, or 1000 when it sent none
// (today's CLI's Node client sends none).
func TestPeerCloseIsAnswered(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	for name, payload := range map[string][]byte{
		"with a code":  websocket.FormatCloseMessage(websocket.CloseGoingAway, "bye"),
		"without code": {},
	} {
		t.Run(name, func(t *testing.T) {
			conn, _, err := websocket.DefaultDialer.DialContext(ctxT(t), c.wsURL(0), nil)
			require.NoError(t, err)
			defer conn.Close()
			require.NoError(t, conn.WriteControl(websocket.CloseMessage, payload, time.Now().Add(time.Second)))
			require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
			_, _, err = conn.ReadMessage()
			var ce *websocket.CloseError
			require.ErrorAs(t, err, &ce, "the broker answered with a close frame")
			want := websocket.CloseGoingAway
			if len(payload) == 0 {
				want = websocket.CloseNormalClosure
			}
			require.Equal(t, want, ce.Code)
		})
	}
}

// The replica pings every session from one ticker: an idle peer that answers stays (its client
// closes itself after a second without a ping), a socket that never answers is dropped at the
// pong deadline.
func TestPingsKeepIdleSessionsAndDropSilentOnes(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.pingEvery, cfg.pongWait = 300*time.Millisecond, 1500*time.Millisecond })
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice, func(o *client.Options) { o.IdleTimeout = time.Second })

	// Bob says hello on a bare socket, then never reads again, so never answers a ping.
	conn, _, err := websocket.DefaultDialer.DialContext(ctxT(t), c.wsURL(0), nil)
	require.NoError(t, err)
	defer conn.Close()
	h := &protocol.Hello{MeshID: m.id, MemberID: bob.id, Pubkey: bob.pub, SessionID: "silent", PID: 1, CWD: "/",
		Timestamp: time.Now().UnixMilli()}
	h.Signature = protocol.SignHello(bob.key, h.MeshID, h.MemberID, h.Pubkey, h.Timestamp)
	frame, err := protocol.Encode(h)
	require.NoError(t, err)
	require.NoError(t, conn.WriteMessage(websocket.TextMessage, frame))
	dbtest.WaitFor(t, 5*time.Second, "bob's session registered", func() bool { return c.nodes[0].Sessions() == 2 })

	dbtest.WaitFor(t, 10*time.Second, "the silent socket dropped at the pong deadline", func() bool {
		return c.nodes[0].Sessions() == 1
	})
	require.NoError(t, a.Err(), "alice, idle all along, was kept alive by the pings")
	_, err = a.ListPeers(ctxT(t))
	require.NoError(t, err)
}
