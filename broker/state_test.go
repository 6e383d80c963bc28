package broker

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/protocol"
)

// nextStateChange waits for cl's next state_change.
func nextStateChange(t *testing.T, cl *client.Client, within time.Duration) protocol.StateChange {
	t.Helper()
	select {
	case ch := <-cl.StateChanges():
		return ch
	case <-time.After(within):
		t.Fatalf("no state_change within %s", within)
		return protocol.StateChange{}
	}
}

// A value that is short on the wire but long as Postgres stores it (numbers are written out in
// full) is refused before the database: a huge exponent as bad_request, a value over the limit
// once written out as too_large. The session stays open, and no one's state changes.
func TestSetStateNumbersAreSizedAsStored(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	a, b := m.dial(0, m.member("alice")), m.dial(0, m.member("bob"))
	ctx := ctxT(t)
	require.NoError(t, b.SetState(ctx, "build", "green"))
	require.Equal(t, "build", nextStateChange(t, a, 5*time.Second).Key)

	// 3,000 numbers of 131,001 digits each fit a 32 KB frame; stored they were 393 MB.
	huge := "[" + strings.TrimSuffix(strings.Repeat("1e131000,", 3000), ",") + "]"
	require.NoError(t, a.SendRaw(ctx, []byte(`{"type":"set_state","_reqId":"huge","key":"build","value":`+huge+`}`)))
	e, err := a.NextError(ctx)
	require.NoError(t, err)
	require.Equal(t, protocol.CodeBadRequest, e.Code)
	require.Equal(t, "huge", e.ReqID)
	require.Contains(t, e.Message, "value: number 1e131000 has an exponent beyond ±400")

	// Within the exponent bound, but 200 × 301 bytes once written out: over 32 KiB.
	long := "[" + strings.TrimSuffix(strings.Repeat("1e300,", 200), ",") + "]"
	require.Less(t, len(long), 2000)
	require.NoError(t, a.SendRaw(ctx, []byte(`{"type":"set_state","_reqId":"long","key":"build","value":`+long+`}`)))
	e, err = a.NextError(ctx)
	require.NoError(t, err)
	require.Equal(t, protocol.CodeTooLarge, e.Code)
	require.Equal(t, "long", e.ReqID)
	require.Contains(t, e.Message, "value: 60600 bytes as stored")
	require.Contains(t, e.Message, "MAX_STATE_VALUE_BYTES")

	// The same numbers, fewer of them, are stored and read back written out.
	require.NoError(t, a.SetState(ctx, "few", []any{1e300, 2.5e-3}))
	got := nextStateChange(t, b, 5*time.Second)
	require.Equal(t, "few", got.Key, "the refused writes told no one")
	require.Equal(t, "["+"1"+strings.Repeat("0", 300)+", 0.0025]", string(got.Value))

	r, err := b.GetState(ctx, "build")
	require.NoError(t, err)
	require.Equal(t, `"green"`, string(r.Value), "bob's value is untouched")
	require.Equal(t, "bob", r.UpdatedBy)
	list, err := a.ListState(ctx)
	require.NoError(t, err)
	require.Len(t, list, 2)
}

// A full mesh frees room by setting a key to null: the key is deleted (not stored as null), the
// other sessions, on every replica, get state_change with value null, and it is gone from
// get_state and list_state.
func TestSetStateNullDeletesTheKey(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, func(cfg *Config) { cfg.MaxStateKeysPerMesh = 3 })
	m := c.mesh(0)
	a, b := m.dial(0, m.member("alice")), m.dial(1, m.member("bob"))
	ctx := ctxT(t)
	for _, k := range []string{"k1", "k2", "k3"} {
		require.NoError(t, a.SetState(ctx, k, k))
		require.Equal(t, k, nextStateChange(t, b, 5*time.Second).Key)
	}
	require.NoError(t, a.Notify(ctx, &protocol.SetState{Key: "k4", Value: []byte(`4`)}))
	e, err := a.NextError(ctx)
	require.NoError(t, err)
	require.Equal(t, protocol.CodeQuotaExceeded, e.Code)
	require.Contains(t, e.Message, "delete keys by setting them to null")

	require.NoError(t, a.SetState(ctx, "k2", nil))
	ch := nextStateChange(t, b, 5*time.Second)
	require.Equal(t, protocol.StateChange{Key: "k2", Value: []byte("null"), UpdatedBy: "alice"}, ch)
	r, err := b.GetState(ctx, "k2")
	require.NoError(t, err)
	require.Equal(t, protocol.StateResult{Key: "k2", Value: []byte("null"), ReqID: r.ReqID}, r, "answered as for a missing key")

	require.NoError(t, a.SetState(ctx, "k4", 4), "the freed key's room is taken")
	require.Equal(t, "k4", nextStateChange(t, b, 5*time.Second).Key)
	list, err := b.ListState(ctx)
	require.NoError(t, err)
	var keys []string
	for _, e := range list {
		keys = append(keys, e.Key)
	}
	require.Equal(t, []string{"k1", "k3", "k4"}, keys)

	// Deleting a key that is not there is no error.
	require.NoError(t, a.SetState(ctx, "never", nil))
	_, err = a.ListPeers(ctx) // replies come in request order: an error would be here by now
	require.NoError(t, err)
	select {
	case e := <-a.Errors():
		t.Fatalf("deleting a missing key: %v", e)
	default:
	}
}

// A change too large to ride along is read back by each replica; when the key was deleted in
// the meantime, the sessions are told the key with value null (not a state_change without a
// key).
func TestStateChangeReadBackOfADeletedKey(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	b := m.dial(0, m.member("bob"))
	ctx := ctxT(t)
	// The line set_state sends for a large value: no "x", so the replica reads the key back.
	line := fmt.Sprintf(`{"k":"t","h":%q,"y":"gone","p":"someone-else"}`, m.id)
	_, err := c.pool.Exec(ctx, `SELECT pg_notify('claudemesh_all', $1)`, line)
	require.NoError(t, err)
	require.Equal(t, protocol.StateChange{Key: "gone", Value: []byte("null")}, nextStateChange(t, b, 5*time.Second))
}

// A value too large to ride in the notification (over about 7,000 bytes, within
// MAX_STATE_VALUE_BYTES) reaches the other sessions, on every replica, as a state_change with
// that value. Before, set_state's notice carried "x": null for it and each replica wrote that
// null to its sessions as the whole frame: no state_change at all.
func TestStateChangeOfALargeValueReachesEveryReplica(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, nil)
	m := c.mesh(0)
	a, b, d := m.dial(0, m.member("alice")), m.dial(1, m.member("bob")), m.dial(0, m.member("carol"))
	ctx := ctxT(t)
	big := strings.Repeat("x", 10_000)
	require.NoError(t, a.SetState(ctx, "notes", big))
	for _, cl := range []*client.Client{b, d} {
		ch := nextStateChange(t, cl, 5*time.Second)
		require.Equal(t, protocol.StateChange{Key: "notes", Value: []byte(`"` + big + `"`), UpdatedBy: "alice"}, ch)
	}
}

// A change too large to ride along is read back; by then the key may have changed again. The
// sessions get each key's changes once and in commit order: a read-back that finds a later
// write gives nothing (that write's own notice follows), so no one is told the newer value,
// then the older one, then the newer again.
func TestStateChangesOfLargeValuesInCommitOrder(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	b := m.dial(0, m.member("bob"))
	ctx := ctxT(t)
	large := func(c byte) string { return `"` + strings.Repeat(string(c), 8000) + `"` }
	// Three writes committed before the replica reads any of their notices back (as when it
	// falls behind a burst): large, small, large.
	tx, err := c.pool.Begin(ctx)
	require.NoError(t, err)
	for _, v := range []string{large('a'), `"small"`, large('c')} {
		_, err := tx.Exec(ctx, `SELECT count(*) FROM claudemesh.set_state('claudemesh', $1, 'plan', $2::jsonb, 'alice',
			1000, 1000000, 'someone-else', 'a', '{}')`, m.id, v)
		require.NoError(t, err)
	}
	require.NoError(t, tx.Commit(ctx))
	a := m.dial(0, m.member("alice"))
	require.NoError(t, a.SetState(ctx, "done", true))

	var got []string
	for {
		ch := nextStateChange(t, b, 5*time.Second)
		if ch.Key == "done" {
			break
		}
		require.Equal(t, "plan", ch.Key)
		got = append(got, string(ch.Value))
	}
	require.Equal(t, []string{`"small"`, large('c')}, got, "plan's changes as bob was told them")
}
