package broker

import (
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
