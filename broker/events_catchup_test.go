package broker

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// peerEvent is a system push as a client keeping a peer list reads it.
type peerEvent struct {
	Event, PresenceID, Status string
}

func (e peerEvent) String() string { return e.Event + " " + e.PresenceID + " " + e.Status }

// nextPeerEvent waits for cl's next system push.
func nextPeerEvent(t *testing.T, cl *client.Client, within time.Duration) peerEvent {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case p := <-cl.Pushes():
			if !p.IsSystem() {
				continue
			}
			var d struct {
				PresenceID string `json:"presenceId"`
				Status     string `json:"status"`
			}
			require.NoError(t, json.Unmarshal(p.EventData, &d))
			return peerEvent{p.Event, d.PresenceID, d.Status}
		case <-deadline:
			t.Fatalf("no system event within %s", within)
		case <-cl.Done():
			t.Fatalf("client closed while waiting for a system event: %v", cl.Err())
		}
	}
}

// peerEventsUntil collects cl's system events up to the one about presence last.
func peerEventsUntil(t *testing.T, cl *client.Client, last string) []peerEvent {
	t.Helper()
	var got []peerEvent
	for {
		e := nextPeerEvent(t, cl, 15*time.Second)
		got = append(got, e)
		if e.PresenceID == last {
			return got
		}
	}
}

func presenceIDOf(cl *client.Client) string { return cl.HelloAck().PresenceID }

// System events of peers on another replica while a replica's LISTEN connection is cut (their
// notices lost) reach its sessions with system_events once it reconnects: a peer that joined,
// one whose status changed, one that left, in that order, each once; what they were told before
// the cut is not told again, nor is an event whose notice comes after the catch-up told it; and
// an event about a member never reaches that member's own sessions. Before, they were lost: a
// client keeping its peer list from the events showed a peer that had left, and a stale status,
// until it called list_peers.
func TestSystemEventsMissedWhileTheListenerIsCutAreCaughtUp(t *testing.T) {
	t.Parallel()
	c, proxy := newCutCluster(t)
	m := c.mesh(0)
	alice, leaver, bob := m.member("alice"), m.member("leaver"), m.member("bob")
	w := m.dial(1, m.member("watcher"))
	b1 := m.dial(1, bob, func(o *client.Options) { o.SessionID = "bob-on-n1" })
	a := m.dial(0, alice)
	l := m.dial(0, leaver)
	b0 := m.dial(0, bob)
	ctx := ctxT(t)
	// Told live before the cut (and within the catch-up's margin: read again by it).
	require.Equal(t, []peerEvent{{"peer_joined", presenceIDOf(b1), "idle"}, {"peer_joined", presenceIDOf(a), "idle"},
		{"peer_joined", presenceIDOf(l), "idle"}, {"peer_joined", presenceIDOf(b0), "idle"}}, peerEventsUntil(t, w, presenceIDOf(b0)))
	require.Equal(t, []peerEvent{{"peer_joined", presenceIDOf(a), "idle"}, {"peer_joined", presenceIDOf(l), "idle"}},
		peerEventsUntil(t, b1, presenceIDOf(l)))

	proxy.Cut()
	dbtest.WaitFor(t, 10*time.Second, "n1's listener down", func() bool { return !c.nodes[1].BusConnected() })
	carol := m.dial(0, m.member("carol"))
	require.NoError(t, a.SetStatus(ctx, protocol.StatusWorking))
	_, err := a.ListPeers(ctx) // replies come in request order: the status is stored
	require.NoError(t, err)
	require.NoError(t, b0.SetStatus(ctx, protocol.StatusDND))
	_, err = b0.ListPeers(ctx)
	require.NoError(t, err)
	require.NoError(t, l.Close()) // a clean close ends the presence at once
	dbtest.WaitFor(t, 10*time.Second, "the leaver's presence ended", func() bool {
		var ended bool
		require.NoError(t, c.pool.QueryRow(ctx, `SELECT ended_at IS NOT NULL FROM claudemesh.presence WHERE id = $1`,
			presenceIDOf(l)).Scan(&ended))
		return ended
	})
	proxy.Restore()
	dbtest.WaitFor(t, 15*time.Second, "n1's listener back", c.nodes[1].BusConnected)

	missed := []peerEvent{{"peer_joined", presenceIDOf(carol), "idle"}, {"peer_status", presenceIDOf(a), "working"},
		{"peer_status", presenceIDOf(b0), "dnd"}, {"peer_left", presenceIDOf(l), ""}}
	require.Equal(t, missed, peerEventsUntil(t, w, presenceIDOf(l)))
	require.Equal(t, []peerEvent{missed[0], missed[1], missed[3]}, peerEventsUntil(t, b1, presenceIDOf(l)),
		"bob's session is not told of bob")

	// Notices of what the catch-up told, arriving after it (committed after its read): not
	// told again. Then a new event: the next each session gets.
	for _, d := range []struct {
		member string
		ev     peerEvent
	}{{alice.id, missed[1]}, {leaver.id, missed[3]}} {
		line := fmt.Sprintf(`{"k":"e","h":%q,"m":%q,"y":%q,"x":{"presenceId":%q,"pubkey":"k","displayName":"d","status":%q}}`,
			m.id, d.member, d.ev.Event, d.ev.PresenceID, d.ev.Status)
		_, err := c.pool.Exec(ctx, `SELECT pg_notify('claudemesh_all', $1)`, line)
		require.NoError(t, err)
	}
	dave := m.dial(0, m.member("dave"))
	want := peerEvent{"peer_joined", presenceIDOf(dave), "idle"}
	require.Equal(t, want, nextPeerEvent(t, w, 5*time.Second), "nothing told twice")
	require.Equal(t, want, nextPeerEvent(t, b1, 5*time.Second), "nothing told twice")
	sent := testutil.ToFloat64(c.nodes[1].Metrics().EventCatchUp.WithLabelValues("sent"))
	require.Equal(t, 4.0, sent, "each told once, whatever the number of sessions")
}

// A mesh with more changed presences in the gap than the catch-up tells (eventCatchUpPerMesh)
// gets its newest ones, oldest first, and the cap is counted and logged: never a flood of
// frames; the sessions see the rest with list_peers.
func TestSystemEventCatchUpOfAMeshWithManyChangesIsCapped(t *testing.T) {
	t.Parallel()
	c, proxy := newCutCluster(t)
	m := c.mesh(0)
	w := m.dial(1, m.member("watcher"))
	o := m.dial(0, m.member("other"))
	require.Equal(t, peerEvent{"peer_joined", presenceIDOf(o), "idle"}, nextPeerEvent(t, w, 5*time.Second))
	many := m.member("many")
	ctx := ctxT(t)
	proxy.Cut()
	dbtest.WaitFor(t, 10*time.Second, "n1's listener down", func() bool { return !c.nodes[1].BusConnected() })
	// Sessions registered on n0 whose notices n1 does not hear: written straight, one a
	// millisecond apart, so their order is known.
	n := eventCatchUpPerMesh + 5
	_, err := c.pool.Exec(ctx, `INSERT INTO claudemesh.presence (id, mesh_id, member_id, member_pubkey, node_id, session_id, connected_at)
		SELECT format('%s-%s', $1::text, lpad(i::text, 3, '0')), $1, $2, $3, 'n0', 'many-' || i,
			clock_timestamp() + i * interval '1 millisecond'
		FROM generate_series(0, $4::int - 1) AS i`, m.id, many.id, many.pub, n)
	require.NoError(t, err)
	capped := c.nodes[1].Metrics().EventCatchUp.WithLabelValues("capped")
	proxy.Restore()

	got := peerEventsUntil(t, w, fmt.Sprintf("%s-%03d", m.id, n-1))
	require.Len(t, got, eventCatchUpPerMesh)
	require.Equal(t, peerEvent{"peer_joined", m.id + "-005", "idle"}, got[0], "the newest, oldest first")
	require.Equal(t, 1.0, testutil.ToFloat64(capped))
	require.NoError(t, o.SetStatus(ctx, protocol.StatusWorking))
	require.Equal(t, peerEvent{"peer_status", presenceIDOf(o), "working"}, nextPeerEvent(t, w, 5*time.Second))
}
