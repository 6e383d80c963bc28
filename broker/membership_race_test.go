package broker

import (
	"sync/atomic"
	"testing"
	"time"

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
