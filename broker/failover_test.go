package broker

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// A replica cut off from Postgres is declared dead by the others: its sessions leave after
// their grace, its sends are refused (never acked and lost), messages for its peers queue,
// and when it comes back it sends its peers to reconnect, and they get their queue.
func TestReplicaCutOffFromPostgresIsTakenOver(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	c := &testCluster{t: t, url: url, pool: dbtest.PoolFor(t, url)}
	fast := func(cfg *Config) {
		cfg.Heartbeat = 200 * time.Millisecond
		cfg.NodeDeadAfter = 2 * time.Second
		cfg.SessionGrace = time.Second
	}
	c.nodes = append(c.nodes, c.startNode("n0", fast))
	proxy := dbtest.NewProxy(t, url)
	c.url = proxy.URL(url)
	c.nodes = append(c.nodes, c.startNode("n1", fast))
	c.url = url

	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	b := m.dial(1, bob)
	nextEvent(t, a, protocol.EventPeerJoined, 5*time.Second)
	ctx := ctxT(t)

	proxy.Cut()
	// bob's replica can't store anything: the send is refused, not acked.
	_, err := b.Send(ctx, alice.pub, protocol.PriorityNow, "n", "lost?", "")
	var perr *protocol.Error
	require.True(t, errors.As(err, &perr), "send refused while Postgres is away: %v", err)
	require.Equal(t, "unavailable", perr.Code)

	ev := nextEvent(t, a, protocol.EventPeerLeft, 15*time.Second)
	require.Contains(t, string(ev.EventData), bob.pub)
	peers, err := a.ListPeers(ctx)
	require.NoError(t, err)
	require.Len(t, peers, 1, "only alice is listed once bob's replica is dead")

	queued, err := a.Send(ctx, bob.pub, protocol.PriorityNext, "n", "while you were away", "")
	require.NoError(t, err)

	proxy.Restore()
	select {
	case <-b.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("bob was not asked to reconnect after his replica was declared dead")
	}
	require.Equal(t, protocol.CloseDraining, b.CloseCode())
	b2 := m.dial(1, bob)
	require.Equal(t, queued.MessageID, nextPush(t, b2, 10*time.Second).MessageID)
	dbtest.WaitFor(t, 10*time.Second, "n1 healthy again", func() bool { return c.nodes[1].BusConnected() })
}

// Revoking a member closes its live sessions on every replica within a second (4002), and
// its next hello is refused.
func TestRevokeClosesSessionsOnEveryReplica(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, nil)
	m := c.mesh(0)
	bob := m.member("bob")
	b0 := m.dial(0, bob, func(o *client.Options) { o.SessionID = "one" })
	b1 := m.dial(1, bob, func(o *client.Options) { o.SessionID = "two" })
	_, err := c.nodes[0].Members().RevokeMember(ctxT(t), m.id, bob.pub)
	require.NoError(t, err)
	for _, cl := range []*client.Client{b0, b1} {
		select {
		case <-cl.Done():
			require.Equal(t, protocol.CloseRevoked, cl.CloseCode())
		case <-time.After(5 * time.Second):
			t.Fatal("revoked session still open")
		}
	}
	_, err = m.tryDial(1, bob)
	require.Equal(t, protocol.CodeRevoked, helloErr(t, err).Code)
	dbtest.WaitFor(t, 5*time.Second, "bob's presences ended", func() bool {
		var n int
		_ = c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.presence WHERE member_id = $1 AND ended_at IS NULL`, bob.id).Scan(&n)
		return n == 0
	})
}
