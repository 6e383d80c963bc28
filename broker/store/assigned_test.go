package store_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db"
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
	local := sendOneLocal(t, st, next)
	require.True(t, local.Assigned, "bob is idle: assigned to his session")
	// His replica could not push it at once (window full), and a hook says he is at work now.
	_, err := pool.Exec(ctx, `UPDATE claudemesh.presence SET status = 'working' WHERE id = $1`, b.PresenceID)
	require.NoError(t, err)

	claim := func(c store.ClaimFor) []store.Claimed {
		t.Helper()
		c.Limit = 10
		rows, _, err := st.Claim(ctx, "here", []store.ClaimFor{c})
		require.NoError(t, err)
		return rows
	}
	retake := b
	retake.Retake = []int64{local.ID}
	require.Empty(t, claim(retake), "a next message is not pushed to a session at work")
	all := b
	all.TakeAssigned, all.IncludeHeld = true, true // its replica's status was late
	require.Empty(t, claim(all), "not when all that is assigned is taken either")
	var state string
	require.NoError(t, pool.QueryRow(ctx, `SELECT state FROM claudemesh.delivery WHERE id = $1`, local.ID).Scan(&state))
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
	local = sendOneLocal(t, st, now)
	require.True(t, local.Assigned)
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET expires_at = now() - interval '1 second' WHERE id = $1`, local.ID)
	require.NoError(t, err)
	all = b
	all.TakeAssigned, all.IncludeHeld = true, true
	require.Empty(t, claim(all), "an expired delivery is never pushed")
	stale := b
	stale.IncludeHeld = true
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET pushed_at = now() - interval '1 minute' WHERE id = $1`, local.ID)
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
	local := sendOneLocal(t, st, small)
	require.True(t, local.Assigned)
	local2 := sendOneLocal(t, st, large)
	require.False(t, local2.Assigned, "pending: claimed by the session's replica")

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

// A claim for a session at work looks for a pending "now" delivery above a recent assigned one
// (00056's overtaking check) by the index of pending "now" deliveries, not through its member's
// held backlog: with "next" messages held for the session, each claim read every one of them,
// again for each recent assigned push (00057). Counted by the rows the claim's statement read
// from the index of open deliveries by recipient, which only that walk uses for a session at work.
func TestClaimOfASessionAtWorkDoesNotReadItsHeldBacklog(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	// One connection: the claim's statistics are read back on the connection that ran it.
	one, err := db.NewPool(ctx, url, db.PoolConfig{MaxConns: 1, AppName: "claudemesh-test"})
	require.NoError(t, err)
	t.Cleanup(one.Close)
	st := store.New(one, "t")
	m := newClaimMesh(t, pool)
	b := m.recipient('b', "working")

	now := m.envelope('b', "now")
	local := sendOneLocal(t, st, now)
	require.True(t, local.Assigned, "a now message goes to a session at work")
	// Its notification is on its way (never counted lost here), and a backlog of next messages
	// is held for bob behind it.
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET pushed_at = now() + interval '1 hour' WHERE id = $1`, local.ID)
	require.NoError(t, err)
	const backlog = 2000
	_, err = pool.Exec(ctx, `
		WITH e AS (
			INSERT INTO claudemesh.envelope (mesh_id, sender_member_id, sender_pubkey, sender_member_pubkey, target_spec,
				priority, nonce, ciphertext, expires_at)
			SELECT $1, $2, $3, $3, $4, 'next', 'bg==', 'Yw==', now() + interval '1 hour' FROM generate_series(1, $5::int)
			RETURNING id)
		INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state, expires_at)
		SELECT e.id, $1, $6, 'next', 'pending', now() + interval '1 hour' FROM e`,
		m.mesh, m.alice, claimKey('a'), claimKey('b'), backlog, b.MemberID)
	require.NoError(t, err)

	read := func() int64 {
		t.Helper()
		var n int64
		require.NoError(t, one.QueryRow(ctx, `SELECT idx_tup_read FROM pg_stat_user_indexes
			WHERE schemaname = 'claudemesh' AND indexrelname = 'delivery_open_recipient'`).Scan(&n))
		return n
	}
	flush := func() {
		t.Helper()
		// Reported as the statement's backend goes idle; read in a fresh snapshot.
		_, err := one.Exec(ctx, `SELECT pg_stat_force_next_flush()`)
		require.NoError(t, err)
		_, err = one.Exec(ctx, `SELECT pg_stat_clear_snapshot()`)
		require.NoError(t, err)
	}
	flush()
	before := read()
	c := b
	c.Limit = 10
	for range 3 {
		rows, _, err := st.Claim(ctx, "here", []store.ClaimFor{c})
		require.NoError(t, err)
		require.Empty(t, rows, "nothing bob may take now: the now message is its notification's")
	}
	flush()
	require.Less(t, read()-before, int64(backlog/10), "three claims for bob read his held backlog")
}

// sendOneLocal stores env on node "here" and returns its one delivery to a session there.
func sendOneLocal(t *testing.T, st *store.Store, env store.OutgoingEnvelope) store.LocalDelivery {
	t.Helper()
	_, local, err := st.SendBatch(dbtest.Context(t), "here", []store.OutgoingEnvelope{env})
	require.NoError(t, err)
	require.Len(t, local, 1)
	return local[0]
}
