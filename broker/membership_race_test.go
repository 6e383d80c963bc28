package broker

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// A revocation, ban or kick that commits right after a hello's statement, while its session is
// not yet in the replica's hub, still closes that session: its notice, which found no session
// there, is not lost. Before, the session was acked and stayed open (and, for a revocation,
// listed and sending) until the replica's LISTEN connection next reconnected.
func TestMembershipChangeDuringHelloClosesTheSession(t *testing.T) {
	t.Parallel()
	var during atomic.Pointer[func()]
	var c *testCluster
	c = newCluster(t, 1, func(cfg *Config) {
		cfg.quiet = true // no catch-up poll to hide a lost notice
		cfg.helloRegistered = func() {
			f := during.Swap(nil)
			if f == nil {
				return
			}
			before := testutilCounter(c.nodes[0].metrics.BusReceived)
			(*f)()
			dbtest.WaitFor(t, 5*time.Second, "the notice applied by the router", func() bool {
				return testutilCounter(c.nodes[0].metrics.BusReceived) > before
			})
		}
	})
	m := c.mesh(0)
	admin := m.member("admin")
	_, err := c.pool.Exec(ctxT(t), `UPDATE claudemesh.member SET role = 'admin' WHERE id = $1`, admin.id)
	require.NoError(t, err)
	ad := m.dial(0, admin, asDaemon)

	for _, tc := range []struct {
		name string
		act  func(target *testMember)
		code int
	}{
		{"revoke", func(target *testMember) {
			_, err := c.nodes[0].Members().RevokeMember(ctxT(t), m.id, target.pub)
			require.NoError(t, err)
		}, protocol.CloseRevoked},
		{"ban", func(target *testMember) {
			_, err := ad.Ban(ctxT(t), target.pub)
			require.NoError(t, err)
		}, protocol.CloseRevoked},
		{"kick", func(target *testMember) {
			_, err := ad.Kick(ctxT(t), protocol.Kick{Target: target.pub})
			require.NoError(t, err)
		}, protocol.CloseKicked},
	} {
		t.Run(tc.name, func(t *testing.T) {
			target := m.member("target-" + tc.name)
			f := func() { tc.act(target) }
			during.Store(&f)
			cl, err := m.tryDial(0, target, asSession(newKey(t)))
			require.Nil(t, during.Load(), "the %s ran during the hello", tc.name)
			if err == nil { // acked, then closed
				select {
				case <-cl.Done():
					require.Equal(t, tc.code, cl.CloseCode())
				case <-time.After(5 * time.Second):
					t.Fatalf("the session stayed open after the %s", tc.name)
				}
			} else { // closed before the ack, with the code the client acts on
				require.Equal(t, tc.code, helloErr(t, err).CloseCode)
			}
			dbtest.WaitFor(t, 5*time.Second, "no live presence of "+target.name, func() bool {
				var n int
				_ = c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.presence WHERE member_id = $1 AND ended_at IS NULL`,
					target.id).Scan(&n)
				return n == 0
			})
		})
	}
}

// An operator's revocation ends the member's sessions in their reconnect grace too, as a ban
// does: they leave the peer list at once (peer_left), and messages for them are no longer
// queued as if they would come back.
func TestRevokeEndsSessionsInGrace(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, func(cfg *Config) { cfg.SessionGrace = time.Minute })
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	b := m.dial(1, bob)
	nextEvent(t, a, protocol.EventPeerJoined, 5*time.Second)
	b.Abort() // no close frame: bob's presence waits in its grace
	dbtest.WaitFor(t, 5*time.Second, "bob in his grace", func() bool {
		var n int
		_ = c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.presence WHERE member_id = $1 AND grace_until IS NOT NULL AND ended_at IS NULL`,
			bob.id).Scan(&n)
		return n == 1
	})
	_, err := c.nodes[0].Members().RevokeMember(ctxT(t), m.id, bob.pub)
	require.NoError(t, err)
	ev := nextEvent(t, a, protocol.EventPeerLeft, 5*time.Second)
	require.Contains(t, string(ev.EventData), bob.pub)
	peers, err := a.ListPeers(ctxT(t))
	require.NoError(t, err)
	require.Len(t, peers, 1, "only alice is listed once bob is revoked")
}

// A revoked member's socket whose close frame waits behind replies it does not read takes no
// more requests: its sends are not stored. Before, the close notice only queued the close
// frame, and until the write pump got to it (up to writeWait for a client that stopped
// reading) every frame the revoked member sent was processed: its messages were stored and
// pushed to the mesh after its revocation.
func TestRevokedSocketWithUnreadRepliesTakesNoMoreSends(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, func(cfg *Config) { cfg.quiet, cfg.ReadRatePerMember, cfg.ReadBurstPerMember = true, 1000, 1000 })
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	m.dial(0, alice)

	// A small receive buffer: the broker's writes block after little.
	d := websocket.Dialer{NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err == nil {
			err = conn.(*net.TCPConn).SetReadBuffer(16 << 10)
		}
		return conn, err
	}}
	ws, _, err := d.Dial(c.wsURL(1), nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ws.Close() })
	h := &protocol.Hello{MeshID: m.id, MemberID: bob.id, Pubkey: bob.pub, SessionID: "raw-bob", PID: 1, CWD: "/raw",
		Timestamp: time.Now().UnixMilli()}
	h.Signature = protocol.SignHello(bob.key, h.MeshID, h.MemberID, h.Pubkey, h.Timestamp)
	frame, err := protocol.Encode(h)
	require.NoError(t, err)
	require.NoError(t, ws.WriteMessage(websocket.TextMessage, frame))
	require.Equal(t, protocol.TypeHelloAck, readJSON(t, ws)["type"])

	// Bob stops reading: replies he asks for fill the socket's buffers on both sides until the
	// broker's writer blocks, a few frames waiting (fewer than the reply window's frames and
	// bytes, so his requests are still read). One request at a time: its reply either went
	// to the socket or waits.
	require.NoError(t, ws.WriteMessage(websocket.TextMessage,
		[]byte(`{"type":"set_state","key":"big","value":"`+strings.Repeat("x", 30<<10)+`"}`)))
	var sess *session
	dbtest.WaitFor(t, 5*time.Second, "bob's session", func() bool {
		for _, s := range c.nodes[1].peers.hub.all() {
			sess = s
		}
		return sess != nil
	})
	look := func() (queued int, wrote time.Time) {
		sess.mu.Lock()
		defer sess.mu.Unlock()
		return sess.queued, sess.lastWrite
	}
	for i := 0; ; i++ {
		require.Less(t, i, 2000, "the broker's writes to bob never blocked")
		waiting, wrote := look()
		if waiting >= 20 {
			break
		}
		require.NoError(t, ws.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, `{"type":"get_state","key":"big","_reqId":"g%d"}`, i)))
		dbtest.WaitFor(t, 5*time.Second, "the reply written or waiting", func() bool {
			q, w := look()
			return q > waiting || !w.Equal(wrote)
		})
	}

	_, err = c.nodes[0].Members().RevokeMember(ctxT(t), m.id, bob.pub)
	require.NoError(t, err)
	dbtest.WaitFor(t, 5*time.Second, "the revocation's notice applied on bob's replica", func() bool {
		end := &connOf(sess.ws).end
		end.mu.Lock()
		defer end.mu.Unlock()
		return end.set
	})
	send, err := protocol.Encode(&protocol.Send{TargetSpec: alice.pub, Priority: protocol.PriorityNow, Nonce: "n",
		Ciphertext: "after revocation", ID: "late"})
	require.NoError(t, err)
	require.NoError(t, ws.WriteMessage(websocket.TextMessage, send))
	dbtest.WaitFor(t, 30*time.Second, "bob's socket gone from his replica", func() bool { return c.nodes[1].Sessions() == 0 })
	var stored int
	require.NoError(t, c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.envelope WHERE sender_member_id = $1`,
		bob.id).Scan(&stored))
	require.Zero(t, stored, "a send read after the revocation's notice was stored")
}
