package broker

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// A peer that joined before a listening session (so its hello sent no peer_joined, 00073) and
// whose status then changed while the listener's replica had lost its LISTEN connection: the
// catch-up tells the listener the new status. It sees the peer in its own hello, so the join
// itself is not told; but the change came after, and its notice was lost.
func TestSystemEventCatchUpTellsTheStatusOfAPeerThatJoinedFirst(t *testing.T) {
	t.Parallel()
	c, proxy := newCutCluster(t)
	m := c.mesh(0)
	j := m.dial(0, m.member("first")) // no one listens yet: no notice
	l := m.dial(1, m.member("listener"))
	ctx := ctxT(t)
	proxy.Cut()
	dbtest.WaitFor(t, 10*time.Second, "n1's listener down", func() bool { return !c.nodes[1].BusConnected() })
	require.NoError(t, j.SetStatus(ctx, protocol.StatusWorking))
	_, err := j.ListPeers(ctx)
	require.NoError(t, err)
	proxy.Restore()
	dbtest.WaitFor(t, 15*time.Second, "n1's listener back", c.nodes[1].BusConnected)
	e := nextPeerEvent(t, l, 5*time.Second)
	require.Equal(t, presenceIDOf(j), e.PresenceID)
	require.Equal(t, "working", e.Status)
}

// A hello whose transaction began before a listener's hello but took the mesh's lock after it
// (in a storm: a batch waiting on another mesh's lock) sees the listener and sends peer_joined.
// When that notice is lost, the catch-up must still tell the listener: its hello did not see
// the peer. connected_at (the transaction's start) says the peer came first.
func TestSystemEventCatchUpTellsAJoinThatCommittedAfterTheListener(t *testing.T) {
	t.Parallel()
	c, proxy := newCutCluster(t)
	m := c.mesh(0)
	late := m.member("late")
	ctx := ctxT(t)
	tx, err := c.pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(ctx) }()
	var began time.Time
	require.NoError(t, tx.QueryRow(ctx, `SELECT now()`).Scan(&began))
	l := m.dial(1, m.member("listener"))
	var listenerAt time.Time
	require.NoError(t, c.pool.QueryRow(ctx, `SELECT connected_at FROM claudemesh.presence WHERE id = $1`,
		presenceIDOf(l)).Scan(&listenerAt))
	require.True(t, listenerAt.After(began), "the late hello's transaction began before the listener's hello")
	proxy.Cut()
	dbtest.WaitFor(t, 10*time.Second, "n1's listener down", func() bool { return !c.nodes[1].BusConnected() })
	var pres, code string
	require.NoError(t, tx.QueryRow(ctx, `SELECT code, coalesce(presence_id, '') FROM claudemesh.hello('n0', 'claudemesh', $1, $2, $3,
		'late-session', '', 'late', 1, '/w', '[]'::jsonb, ARRAY['system_events'], 100, 'sig-late', now() + interval '1 minute',
		false, 'control-plane', '', '', '', '')`, m.id, late.id, late.pub).Scan(&code, &pres))
	require.Empty(t, code)
	require.NoError(t, tx.Commit(ctx))
	proxy.Restore()
	dbtest.WaitFor(t, 15*time.Second, "n1's listener back", c.nodes[1].BusConnected)
	require.Equal(t, peerEvent{"peer_joined", pres, "idle"}, nextPeerEvent(t, l, 5*time.Second))
}
