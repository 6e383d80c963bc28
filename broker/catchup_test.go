package broker

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

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
