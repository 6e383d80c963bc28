package broker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/audit"
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
	// bob's replica can't store anything: the send is not acked. Refused "unavailable" when the
	// replica knows nothing reached Postgres; when the request may have left before the cut was
	// noticed, its socket is closed instead (1013 send_outcome_unknown: stored or not, retry).
	_, err := b.Send(ctx, alice.pub, protocol.PriorityNow, "n", "lost?", "")
	var perr *protocol.Error
	var cerr *client.CloseError
	outcomeUnknown := false
	switch {
	case errors.As(err, &perr):
		require.Equal(t, "unavailable", perr.Code)
	case errors.As(err, &cerr):
		require.Equal(t, protocol.CloseTryAgainLater, cerr.Code)
		require.Equal(t, "send_outcome_unknown", cerr.Reason)
		outcomeUnknown = true
	default:
		t.Fatalf("send while Postgres is away: want a refusal or a 1013 close, got %v", err)
	}

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
	if !outcomeUnknown { // else bob's socket was closed at the send already
		require.Equal(t, protocol.CloseDraining, b.CloseCode())
	}
	// n1 sent bob away while still cut off; it learns it was declared dead on its first
	// heartbeat after the restore, closes what it holds and re-registers. Reconnect after that.
	dbtest.WaitFor(t, 10*time.Second, "n1 re-registered", func() bool {
		var alive bool
		_ = c.pool.QueryRow(ctx, `SELECT dead_at IS NULL FROM claudemesh.node WHERE id = 'n1'`).Scan(&alive)
		return alive
	})
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

// Hundreds of sessions closing at once are all recorded (batched, not one transaction each
// queueing on the mesh's audit lock), and hellos on another mesh are not starved meanwhile.
func TestMassCloseEndsEveryPresence(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(1000)
	const n = 300
	clients := make([]*client.Client, 0, n)
	mem := m.member("many")
	for i := range n {
		clients = append(clients, m.dial(0, mem, func(o *client.Options) {
			o.SessionID = fmt.Sprintf("s%d", i)
			o.Logger = nil
		}))
	}
	var wg sync.WaitGroup
	for _, cl := range clients {
		wg.Add(1)
		go func() { defer wg.Done(); _ = cl.Close() }()
	}
	other := c.mesh(0)
	_, err := other.tryDial(0, other.member("unaffected"))
	require.NoError(t, err, "a hello on another mesh goes through during the burst")
	wg.Wait()
	dbtest.WaitFor(t, 30*time.Second, "every closed session's presence ended", func() bool {
		var live int
		_ = c.pool.QueryRow(context.Background(), `SELECT count(*) FROM claudemesh.presence WHERE mesh_id = $1 AND ended_at IS NULL`, m.id).Scan(&live)
		return live == 0
	})
	var left int
	_, err = audit.Seal(context.Background(), c.pool, true) // what is pending goes onto the chain
	require.NoError(t, err)
	require.NoError(t, c.pool.QueryRow(context.Background(), `SELECT count(*) FROM claudemesh.audit WHERE mesh_id = $1 AND event_type = 'peer_disconnected'`, m.id).Scan(&left))
	require.Equal(t, n, left, "one audit entry per ended presence")
}

// Draining: health turns 503 "draining" at once, new upgrades are refused, every session is
// closed with 1012, and the presences stay listed in grace (no peer_left) for a reconnect.
func TestDrainClosesWith1012AndKeepsPresences(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, func(cfg *Config) { cfg.SessionGrace = time.Minute })
	m := c.mesh(0)
	watcher := m.dial(1, m.member("watcher"))
	var peers []*client.Client
	var members []*testMember
	for i := range 5 {
		members = append(members, m.member(fmt.Sprintf("p%d", i)))
		peers = append(peers, m.dial(0, members[i]))
	}
	for range peers {
		nextEvent(t, watcher, protocol.EventPeerJoined, 5*time.Second)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- c.nodes[0].Stop(context.Background()) }()
	dbtest.WaitFor(t, 5*time.Second, "health says draining", func() bool {
		code, h := getHealth(t, c.nodes[0].Addr())
		return code == 503 && h.Status == "draining"
	})
	for _, p := range peers {
		select {
		case <-p.Done():
			require.Equal(t, protocol.CloseDraining, p.CloseCode())
		case <-time.After(10 * time.Second):
			t.Fatal("session not closed by the drain")
		}
	}
	require.NoError(t, <-stopped)
	peersNow, err := watcher.ListPeers(ctxT(t))
	require.NoError(t, err)
	require.Len(t, peersNow, 6, "drained sessions stay listed in grace")
	var live int
	require.NoError(t, c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.presence WHERE mesh_id = $1 AND ended_at IS NULL AND grace_until IS NOT NULL`, m.id).Scan(&live))
	require.Equal(t, 5, live)
	var stoppedAt *time.Time
	require.NoError(t, c.pool.QueryRow(ctxT(t), `SELECT stopped_at FROM claudemesh.node WHERE id = 'n0'`).Scan(&stoppedAt))
	require.NotNil(t, stoppedAt, "node marked stopped")
	// They reconnect elsewhere and resume, silently: no peer_left, no peer_joined.
	for _, mem := range members {
		require.True(t, m.dial(1, mem).HelloAck().Resumed)
	}
	// A newcomer's peer_joined, sent after the resumes, is the next event the watcher sees:
	// no peer_left or peer_joined came for the drained sessions.
	m.dial(1, m.member("newcomer"))
	for {
		p := nextSystem(t, watcher, 5*time.Second)
		if p.Event == protocol.EventPeerStatus {
			continue
		}
		require.Equal(t, protocol.EventPeerJoined, p.Event, "%s", p.EventData)
		require.Contains(t, string(p.EventData), "newcomer")
		break
	}
}

// A drain closes each socket only once the sends it accepted are answered: a send stored but
// never acked is sent again by its client, a duplicate under a new message id for today's CLI,
// which sets no client_message_id. Sends that arrive as the socket is about to close are
// refused unavailable and never stored.
func TestDrainAnswersTheSendsItAccepted(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, func(cfg *Config) { cfg.SessionGrace = time.Minute })
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	m.dial(1, bob)
	var mu sync.Mutex
	acked := map[string]bool{}
	var wg sync.WaitGroup
	started := make(chan struct{})
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				if g == 0 && i == 20 {
					close(started)
				}
				ack, err := a.Send(ctxT(t), bob.pub, protocol.PriorityNow, "n", fmt.Sprint(g, "-", i), "")
				if err != nil {
					return // the socket closed
				}
				if ack.Queued {
					mu.Lock()
					acked[ack.MessageID] = true
					mu.Unlock()
				} else {
					require.Equal(t, "unavailable", ack.Error)
				}
			}
		}()
	}
	<-started
	require.NoError(t, c.nodes[0].Stop(context.Background()))
	wg.Wait()
	rows, err := c.pool.Query(ctxT(t), `SELECT id FROM claudemesh.envelope WHERE mesh_id = $1`, m.id)
	require.NoError(t, err)
	stored, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.NotEmpty(t, stored)
	var unacked []string
	for _, id := range stored {
		if !acked[id] {
			unacked = append(unacked, id)
		}
	}
	require.Empty(t, unacked, "stored sends whose ack never reached the sender (of %d stored)", len(stored))
}

// nextSystem waits for the next system push.
func nextSystem(t *testing.T, cl *client.Client, within time.Duration) protocol.Push {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case p := <-cl.Pushes():
			if p.IsSystem() {
				return p
			}
		case <-deadline:
			t.Fatalf("no system push within %s", within)
		}
	}
}

// Two replicas given one BROKER_NODE_ID: each would take the other's sessions for orphans and
// end them. The first one's next heartbeat finds the id registered by another process, and it
// reports that it must stop (Fatal), naming the setting; the node row stays the newcomer's.
func TestTwoReplicasGivenOneNodeIDStopTheOlder(t *testing.T) {
	t.Parallel()
	fast := func(cfg *Config) { cfg.Heartbeat = 200 * time.Millisecond; cfg.NodeDeadAfter = 2 * time.Second }
	c := newCluster(t, 1, fast)
	m := c.mesh(0)
	m.dial(0, m.member("alice"))
	newer := c.startNode("n0", fast)
	select {
	case err := <-c.nodes[0].Fatal():
		require.ErrorContains(t, err, "BROKER_NODE_ID must be unique")
	case <-time.After(10 * time.Second):
		t.Fatal("the older replica did not find its node id taken")
	}
	require.True(t, c.nodes[0].heartbeat.TakenOver())
	require.False(t, newer.heartbeat.TakenOver())
	// Stopping the older one leaves the newer one's registration as it is.
	ctx := ctxT(t)
	require.NoError(t, c.nodes[0].Stop(ctx))
	var stopped bool
	require.NoError(t, c.pool.QueryRow(ctx, `SELECT stopped_at IS NOT NULL FROM claudemesh.node WHERE id = 'n0'`).Scan(&stopped))
	require.False(t, stopped)
}
