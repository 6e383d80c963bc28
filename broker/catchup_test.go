package broker

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// The full catch-up after a reconnect is what applies the notices lost with the connection. One
// that fails (the database slow or away at that moment) is run again in full at the next poll:
// before, the poll only claimed, so a revoked member's socket lost its close until the next
// reconnect, and lost status changes and pushes waited as long.
func TestFailedFullCatchUpIsRetriedInFull(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a, b := m.dial(0, alice), m.dial(0, bob)
	ctx := ctxT(t)
	// A revocation written without its notice, as one lost with the LISTEN connection.
	_, err := c.pool.Exec(ctx, `UPDATE claudemesh.member SET revoked_at = now() WHERE id = $1`, bob.id)
	require.NoError(t, err)

	// The catch-up's read of the node's presences waits on this lock until its deadline.
	tx, err := c.pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(ctx) }()
	_, err = tx.Exec(ctx, `LOCK TABLE claudemesh.member IN ACCESS EXCLUSIVE MODE`)
	require.NoError(t, err)
	failed := c.nodes[0].Metrics().BackgroundErrors.WithLabelValues("resync")
	before := testutil.ToFloat64(failed)
	require.Equal(t, 1, c.killListeners())
	dbtest.WaitFor(t, 2*opTimeout+5*time.Second, "the catch-up after the reconnect failed", func() bool {
		return testutil.ToFloat64(failed) > before
	})
	require.NoError(t, tx.Rollback(ctx))

	select {
	case <-b.Done():
		require.Equal(t, protocol.CloseRevoked, b.CloseCode())
	case <-time.After(4 * pollInterval):
		t.Fatal("the revoked member's socket is still open after the failed catch-up")
	}
	select {
	case <-a.Done():
		t.Fatalf("alice's socket was closed: %d", a.CloseCode())
	default:
	}
}

// nonce and ciphertext are opaque strings: the broker must route any, whatever they escape to.
// A held message small enough to ride inline as stored, but over Postgres's 8,000-byte
// notification once JSON-escaped (quotes double), is released by the recipient's change to
// idle like any other. Before, the release's notification failed the status statement: the
// recipient's set_status (and its hooks) failed with an internal error until the message
// expired, and it stayed working for the whole mesh.
func TestReleaseOfAMessageThatEscapesLargeSucceeds(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a, b := m.dial(0, alice), m.dial(1, bob)
	ctx := ctxT(t)
	require.NoError(t, b.SetStatus(ctx, protocol.StatusWorking))
	_, err := b.ListPeers(ctx) // replies come in request order: the status is set
	require.NoError(t, err)

	quoted := strings.Repeat(`"`, 5000) // 5,000 bytes stored, 10,000 escaped
	held, err := a.Send(ctx, bob.pub, protocol.PriorityNext, "n", quoted, "")
	require.NoError(t, err)
	small, err := a.Send(ctx, bob.pub, protocol.PriorityNext, "n", "c", "")
	require.NoError(t, err)

	require.NoError(t, b.SetStatus(ctx, protocol.StatusIdle))
	_, err = b.ListPeers(ctx)
	require.NoError(t, err)
	select {
	case e := <-b.Errors():
		t.Fatalf("set_status idle failed: %+v", e)
	default:
	}
	p := nextPush(t, b, 5*time.Second)
	require.Equal(t, held.MessageID, p.MessageID)
	require.Equal(t, quoted, p.Ciphertext)
	require.Equal(t, small.MessageID, nextPush(t, b, 5*time.Second).MessageID, "and in order")
}

// A state key may hold any character but NUL; control characters escape to six bytes each. A
// change whose notice, once escaped, is over Postgres's 8,000-byte notification is stored and
// reaches the other sessions (read back, as a large value is). Before, the notice failed the
// statement: set_state answered an internal error, every time.
func TestStateChangeWhoseNoticeEscapesLargeIsStoredAndSent(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, nil)
	m := c.mesh(0)
	a, b := m.dial(0, m.member("alice")), m.dial(1, m.member("bob"))
	ctx := ctxT(t)
	key := strings.Repeat("\x01", protocol.MaxStateKeyLen) // 1,536 bytes escaped, twice in the notice
	value := strings.Repeat("v", 5300)                     // the change itself stays under 7,000 bytes
	require.NoError(t, a.SetState(ctx, key, value))
	_, err := a.ListPeers(ctx) // replies come in request order: an error would be here by now
	require.NoError(t, err)
	select {
	case e := <-a.Errors():
		t.Fatalf("set_state failed: %+v", e)
	default:
	}
	ch := nextStateChange(t, b, 5*time.Second)
	require.Equal(t, protocol.StateChange{Key: key, Value: []byte(`"` + value + `"`), UpdatedBy: "alice"}, ch)
}

// newCutCluster starts n0 straight on the database and n1 through a proxy the test can cut.
func newCutCluster(t *testing.T) (*testCluster, *dbtest.Proxy) {
	t.Helper()
	url := dbtest.URL(t)
	c := &testCluster{t: t, url: url, pool: dbtest.PoolFor(t, url)}
	c.nodes = append(c.nodes, c.startNode("n0", nil))
	proxy := dbtest.NewProxy(t, url)
	c.url = proxy.URL(url)
	c.nodes = append(c.nodes, c.startNode("n1", nil))
	c.url = url
	return c, proxy
}

// stateChangesUntil collects cl's state_changes up to the one of key last.
func stateChangesUntil(t *testing.T, cl *client.Client, last string) []protocol.StateChange {
	t.Helper()
	var got []protocol.StateChange
	for {
		ch := nextStateChange(t, cl, 15*time.Second)
		got = append(got, ch)
		if ch.Key == last {
			return got
		}
	}
}

// Shared-state changes made while a replica's LISTEN connection is cut (their notices lost)
// reach its sessions once it reconnects: a key set, a key deleted (value null), a value too
// large to ride along, each once, in commit order, never to the writer; a key the sessions were
// told before the cut is not told again. Before, they were lost: the sessions kept the stale
// values until they asked.
func TestStateChangesMadeWhileTheListenerIsCutAreCaughtUp(t *testing.T) {
	t.Parallel()
	c, proxy := newCutCluster(t)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	b := m.dial(1, bob)
	a1 := m.dial(1, alice, func(o *client.Options) { o.SessionID = "alice-on-n1" })
	ctx := ctxT(t)
	require.NoError(t, a.SetState(ctx, "kept", "before"))
	require.NoError(t, a.SetState(ctx, "gone", "before"))
	for _, cl := range []*client.Client{b, a1} {
		require.Equal(t, []string{"kept", "gone"}, keys(stateChangesUntil(t, cl, "gone")))
	}

	proxy.Cut()
	dbtest.WaitFor(t, 10*time.Second, "n1's listener down", func() bool { return !c.nodes[1].BusConnected() })
	big := strings.Repeat("x", 10_000)
	require.NoError(t, a.SetState(ctx, "plan", "during"))
	require.NoError(t, a.SetState(ctx, "gone", nil))
	require.NoError(t, a.SetState(ctx, "notes", big))
	_, err := a.ListPeers(ctx) // replies come in request order: the writes are stored
	require.NoError(t, err)
	// A write by the session on n1 itself is not told back to it.
	_, err = c.pool.Exec(ctx, `SELECT count(*) FROM claudemesh.set_state('claudemesh', $1, 'own', '1', 'alice',
		1000, 1000000, $2, 'a', '{}')`, m.id, a1.HelloAck().PresenceID)
	require.NoError(t, err)
	proxy.Restore()
	dbtest.WaitFor(t, 15*time.Second, "n1's listener back", c.nodes[1].BusConnected)

	got := stateChangesUntil(t, b, "own")
	require.Equal(t, []protocol.StateChange{
		{Key: "plan", Value: []byte(`"during"`), UpdatedBy: "alice"},
		{Key: "gone", Value: []byte(`null`), UpdatedBy: "alice"},
		{Key: "notes", Value: []byte(`"` + big + `"`), UpdatedBy: "alice"},
		{Key: "own", Value: []byte(`1`), UpdatedBy: "alice"},
	}, got)
	require.NoError(t, a.SetState(ctx, "after", true))
	require.Equal(t, "after", nextStateChange(t, b, 5*time.Second).Key, "nothing told twice")
	require.Equal(t, []string{"plan", "gone", "notes", "after"}, keys(stateChangesUntil(t, a1, "after")),
		"the writer's session is not told its own change")
}

func keys(changes []protocol.StateChange) []string {
	out := make([]string, len(changes))
	for i, c := range changes {
		out[i] = c.Key
	}
	return out
}

// A mesh with more changes in the gap than the catch-up tells (stateCatchUpPerMesh) gets its
// newest ones, oldest first, and the cap is counted and logged: never a flood of frames.
func TestStateCatchUpOfAMeshWithManyChangesIsCapped(t *testing.T) {
	t.Parallel()
	c, proxy := newCutCluster(t)
	m := c.mesh(0)
	a := m.dial(0, m.member("alice"))
	b := m.dial(1, m.member("bob"))
	ctx := ctxT(t)
	proxy.Cut()
	dbtest.WaitFor(t, 10*time.Second, "n1's listener down", func() bool { return !c.nodes[1].BusConnected() })
	n := stateCatchUpPerMesh + 5
	for i := range n {
		require.NoError(t, a.SetState(ctx, fmt.Sprintf("k%03d", i), i))
	}
	_, err := a.ListPeers(ctx)
	require.NoError(t, err)
	capped := c.nodes[1].Metrics().StateCatchUp.WithLabelValues("capped")
	proxy.Restore()

	got := keys(stateChangesUntil(t, b, fmt.Sprintf("k%03d", n-1)))
	require.Len(t, got, stateCatchUpPerMesh)
	require.Equal(t, "k005", got[0], "the newest, oldest first")
	require.Equal(t, 1.0, testutil.ToFloat64(capped))
	require.NoError(t, a.SetState(ctx, "after", true))
	require.Equal(t, "after", nextStateChange(t, b, 5*time.Second).Key)
}

// A large value's change is read back by each replica; a read that fails (the database slow or
// away) is caught up at the next poll instead of lost.
func TestStateChangeWhoseReadBackFailedIsCaughtUp(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	b := m.dial(0, m.member("bob"))
	ctx := ctxT(t)
	// A large value written without its notice, the notice sent while the read back waits on a
	// lock until its deadline.
	var at int64
	require.NoError(t, c.pool.QueryRow(ctx, `INSERT INTO claudemesh.state (mesh_id, key, value, updated_by, updated_at)
		VALUES ($1, 'notes', to_jsonb(repeat('x', 8000)), 'alice', clock_timestamp())
		RETURNING (extract(epoch FROM updated_at) * 1000000)::bigint`, m.id).Scan(&at))
	tx, err := c.pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(ctx) }()
	_, err = tx.Exec(ctx, `LOCK TABLE claudemesh.state IN ACCESS EXCLUSIVE MODE`)
	require.NoError(t, err)
	failed := c.nodes[0].Metrics().BackgroundErrors.WithLabelValues("load_changed_state")
	line := fmt.Sprintf(`{"k":"t","h":%q,"y":"notes","p":"someone-else","i":%d}`, m.id, at)
	_, err = c.pool.Exec(ctx, `SELECT pg_notify('claudemesh_all', $1)`, line)
	require.NoError(t, err)
	dbtest.WaitFor(t, 2*opTimeout, "the read back failed", func() bool { return testutil.ToFloat64(failed) > 0 })
	require.NoError(t, tx.Rollback(ctx))
	ch := nextStateChange(t, b, 3*pollInterval)
	require.Equal(t, protocol.StateChange{Key: "notes", Value: []byte(`"` + strings.Repeat("x", 8000) + `"`), UpdatedBy: "alice"}, ch)
}

// The database clock can step back: corrected after it ran ahead, or a failover to a server
// whose clock is behind. The writes after the step carry the clock as it is then, so the state
// catch-up must read from what the latest ping said, not from the highest clock ever heard.
// Before, one ping an hour ahead kept the replica's "heard" an hour ahead: for that hour every
// catch-up read from the future, and the changes lost with a LISTEN connection were never told.
func TestStateCatchUpAfterTheDatabaseClockSteppedBack(t *testing.T) {
	t.Parallel()
	c, proxy := newCutCluster(t)
	m := c.mesh(0)
	a := m.dial(0, m.member("alice"))
	b := m.dial(1, m.member("bob"))
	ctx := ctxT(t)
	// n1's pings as the database would send them: its clock an hour ahead, then set right.
	for _, ahead := range []int{3600, 0} {
		_, err := c.pool.Exec(ctx, `SELECT pg_notify('claudemesh_n_n1', json_build_object('k', 'p', 'n', 'n1',
			'i', ((extract(epoch FROM clock_timestamp()) + $1::int) * 1000000)::bigint)::text)`, ahead)
		require.NoError(t, err)
	}
	// Notices arrive in commit order: once this change is told, n1 has heard both pings.
	require.NoError(t, a.SetState(ctx, "before", 1))
	require.Equal(t, "before", nextStateChange(t, b, 5*time.Second).Key)

	proxy.Cut()
	dbtest.WaitFor(t, 10*time.Second, "n1's listener down", func() bool { return !c.nodes[1].BusConnected() })
	require.NoError(t, a.SetState(ctx, "during", 2))
	_, err := a.ListPeers(ctx) // replies come in request order: the write is stored
	require.NoError(t, err)
	proxy.Restore()
	dbtest.WaitFor(t, 15*time.Second, "n1's listener back", c.nodes[1].BusConnected)
	require.Equal(t, protocol.StateChange{Key: "during", Value: []byte(`2`), UpdatedBy: "alice"}, nextStateChange(t, b, 15*time.Second))
}
