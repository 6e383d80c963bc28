package store_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
)

// A claim retaking what a send assigned to a session keeps the priority gate and expiry, as it
// does for pending deliveries. A "next" message assigned while the session was idle, behind a
// full push window, is not pushed once the session is at work: it goes back to pending, held,
// and is released when the session is idle again. An expired one is never pushed.
func TestClaimOfAssignedKeepsThePriorityGateAndExpiry(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	m := newClaimMesh(t, pool)
	b := m.recipient('b', "idle")

	next := m.envelope('b', "next")
	_, local, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{next})
	require.NoError(t, err)
	require.Len(t, local, 1)
	require.True(t, local[0].Assigned, "bob is idle: assigned to his session")
	// His replica could not push it at once (window full), and a hook says he is at work now.
	_, err = pool.Exec(ctx, `UPDATE claudemesh.presence SET status = 'working' WHERE id = $1`, b.PresenceID)
	require.NoError(t, err)

	claim := func(c store.ClaimFor) []store.Claimed {
		t.Helper()
		c.Limit = 10
		rows, _, err := st.Claim(ctx, "here", []store.ClaimFor{c})
		require.NoError(t, err)
		return rows
	}
	retake := b
	retake.Retake = []int64{local[0].ID}
	require.Empty(t, claim(retake), "a next message is not pushed to a session at work")
	all := b
	all.TakeAssigned, all.IncludeHeld = true, true // its replica's status was late
	require.Empty(t, claim(all), "not when all that is assigned is taken either")
	var state string
	require.NoError(t, pool.QueryRow(ctx, `SELECT state FROM claudemesh.delivery WHERE id = $1`, local[0].ID).Scan(&state))
	require.Equal(t, "pending", state, "held for bob, as a next message sent while he works")

	_, err = pool.Exec(ctx, `UPDATE claudemesh.presence SET status = 'idle' WHERE id = $1`, b.PresenceID)
	require.NoError(t, err)
	idle := b
	idle.IncludeHeld = true
	rows := claim(idle)
	require.Len(t, rows, 1, "pushed once bob is idle")
	require.Equal(t, next.ID, rows[0].Push.EnvelopeID)

	// Expired while assigned: never pushed.
	now := m.envelope('b', "now")
	_, local, err = st.SendBatch(ctx, "here", []store.OutgoingEnvelope{now})
	require.NoError(t, err)
	require.Len(t, local, 1)
	require.True(t, local[0].Assigned)
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET expires_at = now() - interval '1 second' WHERE id = $1`, local[0].ID)
	require.NoError(t, err)
	all = b
	all.TakeAssigned, all.IncludeHeld = true, true
	require.Empty(t, claim(all), "an expired delivery is never pushed")
	stale := b
	stale.IncludeHeld = true
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET pushed_at = now() - interval '1 minute' WHERE id = $1`, local[0].ID)
	require.NoError(t, err)
	require.Empty(t, claim(stale), "nor when its notification counts as lost")
}

// A claim never pushes a session's pending delivery ahead of an older one assigned to it whose
// notification has not reached the replica yet: a small message, assigned to the recipient's
// session, followed by a large one (too large to ride in a notification, so pending), with a
// claim for the session (the catch-up poll, a freed window) running before the small one's
// notification is applied. The claim takes the older one too, in order; the replica's memo of
// what claims took keeps its late notification from pushing it twice.
func TestClaimKeepsOrderWithAssignedStillOnTheirWay(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	m := newClaimMesh(t, pool)
	b := m.recipient('b', "idle")

	small := m.envelope('b', "now")
	small.Frame = []byte(`{"type":"push"}`)
	large := m.envelope('b', "now")
	large.Frame = nil // too large to ride in a notification
	_, local, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{small})
	require.NoError(t, err)
	require.Len(t, local, 1)
	require.True(t, local[0].Assigned)
	_, local2, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{large})
	require.NoError(t, err)
	require.Len(t, local2, 1)
	require.False(t, local2[0].Assigned, "pending: claimed by the session's replica")

	c := b
	c.IncludeHeld, c.Limit = true, 10
	rows, _, err := st.Claim(ctx, "here", []store.ClaimFor{c})
	require.NoError(t, err)
	var got []string
	for _, r := range rows {
		got = append(got, r.Push.EnvelopeID)
	}
	require.Equal(t, []string{small.ID, large.ID}, got, "pushed in the order they were sent")
	require.True(t, rows[0].FromAssigned, "the replica knows it was assigned: a late notification is not pushed again")

	// Nothing newer pending: a recent assigned one is left to its notification, as before.
	third := m.envelope('b', "now")
	third.Frame = []byte(`{"type":"push"}`)
	_, _, err = st.SendBatch(ctx, "here", []store.OutgoingEnvelope{third})
	require.NoError(t, err)
	rows, _, err = st.Claim(ctx, "here", []store.ClaimFor{c})
	require.NoError(t, err)
	require.Empty(t, rows)
}
