package store_test

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
)

// What waits for one member is bounded: once a sweep finds a member at the bound, a send that
// would wait for it (no session takes it now, or the one that would is stuck behind its full
// push window) is not stored. A direct send is refused, a
// multicast leaves that member out and stores the others' copies; a send a session takes at
// once still goes through. Once the member reads, the next sweep lifts the refusal. Both forms
// of the send statement (one envelope, a set) answer alike.
func TestWaitingMessagesAreBoundedPerMember(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.PoolFor(t, dbtest.URL(t))
	st := store.New(pool, "t")
	// Members by role: s sends, a is away (no session), w at work, i idle, r idle until its
	// session ends, k away with a session key (K), q connected and reading slowly; their keys
	// are hex.
	key := func(c byte) string {
		return strings.Repeat(map[byte]string{'s': "1", 'a': "a", 'w': "b", 'i': "c", 'r': "d", 'k': "e", 'K': "f", 'q': "9", '0': "0"}[c], 64)
	}
	var mesh string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', $1) RETURNING id`, key('0')).Scan(&mesh))
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now())`)
	require.NoError(t, err)
	members := map[byte]string{}
	for _, c := range []byte("sawirkq") {
		var id string
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`, mesh, key(c)).Scan(&id))
		members[c] = id
	}
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.session_key (mesh_id, session_pubkey, member_id) VALUES ($1, $2, $3)`,
		mesh, key('K'), members['k'])
	require.NoError(t, err)
	for _, c := range []byte("wi") {
		status := map[byte]string{'w': "working", 'i': "idle"}[c]
		_, err := pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status)
			VALUES ($1, $2, $3, 'here', $4, $5)`, mesh, members[c], key(c), string(c), status)
		require.NoError(t, err)
	}
	frame := []byte(`{"type":"push"}`)
	send := func(target byte, prio string, batch int) []store.SentEnvelope {
		t.Helper()
		envs := make([]store.OutgoingEnvelope, batch)
		for i := range envs {
			envs[i] = directEnvelope(mesh, members['s'], key('s'), key(target), prio, frame)
		}
		sent, _, err := st.SendBatch(ctx, "here", envs)
		require.NoError(t, err)
		return sent
	}
	broadcast := func(prio string) store.SentEnvelope {
		t.Helper()
		all := directEnvelope(mesh, members['s'], key('s'), "*", prio, frame)
		all.Kind, all.Key, all.TargetSpec = store.SendAll, "", "*"
		sent, _, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{all})
		require.NoError(t, err)
		return sent[0]
	}
	stored := func() (n int) {
		t.Helper()
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.envelope`).Scan(&n))
		return n
	}
	const bound = 3
	sweep := func() map[string]store.BacklogChange {
		t.Helper()
		changes, ran, err := st.SweepBacklog(ctx, bound, 0)
		require.NoError(t, err)
		require.True(t, ran, "no other sweep runs")
		out := map[string]store.BacklogChange{}
		for _, c := range changes {
			out[c.MemberID] = c
		}
		return out
	}

	// Three wait for the member away, three next ones for the member at work.
	send('a', "now", 1)
	send('a', "now", 2)
	send('w', "next", bound)
	require.Equal(t, map[string]store.BacklogChange{
		members['a']: {MemberID: members['a'], MeshID: mesh, Waiting: bound, AtBound: true},
		members['w']: {MemberID: members['w'], MeshID: mesh, Waiting: bound, AtBound: true},
	}, sweep(), "the first sweep finds both at the bound")
	require.Empty(t, sweep(), "nothing changed: nothing to report")

	before := stored()
	// Refused alone, in a small batch and in a set (five envelopes); nothing stored.
	for _, n := range []int{1, 2, 5} {
		for _, s := range send('a', "now", n) {
			require.Equal(t, store.SentEnvelope{Skipped: 1}, s)
		}
		for _, s := range send('w', "low", n) {
			require.Equal(t, store.SentEnvelope{Skipped: 1}, s, "held for a member at work: it would wait")
		}
	}
	require.Equal(t, before, stored())
	// A session that takes it now gets it, bound or not.
	for _, n := range []int{1, 5} {
		for _, s := range send('w', "now", n) {
			require.Equal(t, store.SentEnvelope{Queued: true, Recipients: 1}, s)
		}
	}
	// A multicast stores the idle member's copy and leaves the held one out.
	require.Equal(t, store.SentEnvelope{Queued: true, Recipients: 1, Skipped: 1}, broadcast("next"))
	require.Equal(t, store.SentEnvelope{Queued: true, Recipients: 2}, broadcast("now"), "taken at once by both sessions")
	var waitingForW int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.delivery WHERE recipient_member_id = $1 AND state = 'pending'`,
		members['w']).Scan(&waitingForW))
	require.Equal(t, bound, waitingForW, "nothing more waits for the member at the bound")

	// The member away reads one (its oldest): the next sweep lifts the refusal; the member at
	// work reads none and stays refused.
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET state = 'acked'
		WHERE id = (SELECT min(id) FROM claudemesh.delivery WHERE recipient_member_id = $1)`, members['a'])
	require.NoError(t, err)
	require.Equal(t, map[string]store.BacklogChange{
		members['a']: {MemberID: members['a'], MeshID: mesh, Waiting: bound - 1},
	}, sweep())
	require.Equal(t, []store.SentEnvelope{{Queued: true, Recipients: 1}}, send('a', "now", 1))
	require.Equal(t, []store.SentEnvelope{{Skipped: 1}}, send('w', "next", 1))

	// One replica sweeps at a time: while another holds the sweep, a call returns at once.
	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(ctx) }()
	_, err = tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('claudemesh.sweep_backlog', 0))`)
	require.NoError(t, err)
	changes, ran, err := st.SweepBacklog(ctx, bound, 0)
	require.NoError(t, err)
	require.False(t, ran)
	require.Empty(t, changes, "the member away is at the bound again, but this sweep did not run")
	require.NoError(t, tx.Rollback(ctx))
	require.Equal(t, map[string]store.BacklogChange{
		members['a']: {MemberID: members['a'], MeshID: mesh, Waiting: bound, AtBound: true},
	}, sweep())
	// Nor does it run within the gap after another.
	_, ran, err = st.SweepBacklog(ctx, bound, time.Hour)
	require.NoError(t, err)
	require.False(t, ran)

	// Copies held for a session count while it lives: the idle member goes to work and gets
	// three next broadcasts, held for its session; its next copy is left out.
	_, err = pool.Exec(ctx, `UPDATE claudemesh.presence SET status = 'working' WHERE member_id = $1`, members['i'])
	require.NoError(t, err)
	for range bound {
		require.Equal(t, store.SentEnvelope{Queued: true, Recipients: 1, Skipped: 1}, broadcast("next"), "the member at work's copy is left out")
	}
	// (The two copies its session took at once, still on their way, are not counted.)
	require.Equal(t, map[string]store.BacklogChange{
		members['i']: {MemberID: members['i'], MeshID: mesh, Waiting: bound, AtBound: true},
	}, sweep())
	require.Equal(t, store.SentEnvelope{Queued: true, Skipped: 2}, broadcast("next"))
	// Once that session has ended, only it could take them: they no longer hold the member's
	// messages back, at its next count (a minute after the last, here made to have passed).
	backdate := func(member byte, by string) {
		t.Helper()
		_, err := pool.Exec(ctx, `UPDATE claudemesh.backlog SET checked_at = checked_at - $2::interval WHERE member_id = $1`, members[member], by)
		require.NoError(t, err)
	}
	estimate := func(member byte) (n int, unsure bool) {
		t.Helper()
		require.NoError(t, pool.QueryRow(ctx, `SELECT estimate, unsure FROM claudemesh.backlog WHERE member_id = $1`, members[member]).Scan(&n, &unsure))
		return n, unsure
	}
	_, err = pool.Exec(ctx, `UPDATE claudemesh.presence SET ended_at = now() WHERE member_id = $1`, members['i'])
	require.NoError(t, err)
	backdate('i', "2 minutes")
	require.Equal(t, map[string]store.BacklogChange{
		members['i']: {MemberID: members['i'], MeshID: mesh, Waiting: 0},
	}, sweep())
	n, unsure := estimate('i')
	require.True(t, unsure, "the copies may count again")
	require.GreaterOrEqual(t, n, bound)
	require.Equal(t, []store.SentEnvelope{{Queued: true, Recipients: 1}}, send('i', "now", 1), "waits for the member's next session")
	checkedAt := func(member byte) (at time.Time) {
		t.Helper()
		require.NoError(t, pool.QueryRow(ctx, `SELECT checked_at FROM claudemesh.backlog WHERE member_id = $1`, members[member]).Scan(&at))
		return at
	}
	counted := checkedAt('i')
	require.Empty(t, sweep())
	require.Equal(t, counted, checkedAt('i'), "unsure, counted less than 5 s ago: not walked again on every new row")
	// The session comes back (same session id): its copies count again, at its next count (a
	// minute after the last without new rows, here made to have passed).
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status)
		VALUES ($1, $2, $3, 'here', 'i', 'working')`, mesh, members['i'], key('i'))
	require.NoError(t, err)
	backdate('i', "10 seconds")
	require.Empty(t, sweep(), "no new rows: counted again a minute after its last count")
	backdate('i', "2 minutes")
	require.Equal(t, map[string]store.BacklogChange{
		members['i']: {MemberID: members['i'], MeshID: mesh, Waiting: bound + 1, AtBound: true},
	}, sweep())

	// Direct sends to a session key wait for that key, which outlives its sessions: they count,
	// however the sender wrote the key.
	for i := range bound {
		env := directEnvelope(mesh, members['s'], key('s'), key('K'), "now", frame)
		if i%2 == 0 {
			env.TargetSpec = strings.ToUpper(env.TargetSpec)
		}
		sent, _, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{env})
		require.NoError(t, err)
		require.Equal(t, []store.SentEnvelope{{Queued: true, Recipients: 1}}, sent)
	}
	require.Equal(t, map[string]store.BacklogChange{
		members['k']: {MemberID: members['k'], MeshID: mesh, Waiting: bound, AtBound: true},
	}, sweep())
	require.Equal(t, []store.SentEnvelope{{Skipped: 1}}, send('K', "now", 1))

	// What a session takes at once is not refused, nor counted while on its way; the estimate
	// keeps it, and if the session ends first, it waits and counts.
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status)
		VALUES ($1, $2, $3, 'here', 'r', 'idle')`, mesh, members['r'], key('r'))
	require.NoError(t, err)
	for range bound {
		require.Equal(t, []store.SentEnvelope{{Queued: true, Recipients: 1}}, send('r', "now", 1))
	}
	require.Empty(t, sweep(), "on their way, not waiting: not at the bound")
	n, unsure = estimate('r')
	require.Equal(t, bound, n)
	require.True(t, unsure)
	_, err = pool.Exec(ctx, `UPDATE claudemesh.presence SET ended_at = now() WHERE member_id = $1`, members['r'])
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL, pushed_at = NULL
		WHERE recipient_member_id = $1`, members['r']) // as end_sessions releases them
	require.NoError(t, err)
	// The next send to it is counted with them once 5 s have passed since its last count.
	require.Equal(t, []store.SentEnvelope{{Queued: true, Recipients: 1}}, send('r', "now", 1))
	backdate('r', "10 seconds")
	require.Equal(t, map[string]store.BacklogChange{
		members['r']: {MemberID: members['r'], MeshID: mesh, Waiting: bound + 1, AtBound: true},
	}, sweep(), "released, they wait")
	require.Equal(t, []store.SentEnvelope{{Skipped: 1}}, send('r', "now", 1))

	// A session that reads slowly (its socket alive, its push window full): what is assigned to
	// it and still there 5 s later waits behind the window, and counts. At the bound, what that
	// session would take is refused too; a session that reads is never stuck that way.
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status)
		VALUES ($1, $2, $3, 'here', 'q', 'idle')`, mesh, members['q'], key('q'))
	require.NoError(t, err)
	for range bound {
		require.Equal(t, []store.SentEnvelope{{Queued: true, Recipients: 1}}, send('q', "now", 1))
	}
	require.Empty(t, sweep(), "on their way: not waiting yet")
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET pushed_at = pushed_at - interval '10 seconds' WHERE recipient_member_id = $1`, members['q'])
	require.NoError(t, err)
	backdate('q', "10 seconds")
	require.Equal(t, []store.SentEnvelope{{Queued: true, Recipients: 1}}, send('q', "now", 1), "not known to be at the bound yet")
	require.Equal(t, map[string]store.BacklogChange{
		members['q']: {MemberID: members['q'], MeshID: mesh, Waiting: bound, AtBound: true},
	}, sweep(), "the rows stuck behind the window count; the one just assigned does not")
	require.Equal(t, []store.SentEnvelope{{Skipped: 1}}, send('q', "now", 1), "refused though its session would take it")
	for _, s := range send('q', "now", 5) {
		require.Equal(t, store.SentEnvelope{Skipped: 1}, s, "in a set too")
	}
	// It reads what was stuck: its next count (a minute after the last, here made to have
	// passed) lifts the refusal.
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET state = 'acked' WHERE recipient_member_id = $1 AND pushed_at < now() - interval '5 seconds'`, members['q'])
	require.NoError(t, err)
	backdate('q', "2 minutes")
	require.Equal(t, map[string]store.BacklogChange{
		members['q']: {MemberID: members['q'], MeshID: mesh, Waiting: 0},
	}, sweep())
	require.Equal(t, []store.SentEnvelope{{Queued: true, Recipients: 1}}, send('q', "now", 1))
}

// Whether a session at the bound is stuck behind its window is one probe of assigned rows by
// age (migration 00051): a recipient that never acks what it was pushed, at the bound, made
// every send to it walk its whole backlog of pushed rows inside the group commit.
func TestSendToAMemberAtTheBoundReadsNotItsBacklog(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := oneConnection(t)
	st := store.New(pool, "t")
	var mesh, sender, bob, p string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', repeat('0', 64)) RETURNING id`).Scan(&mesh))
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, repeat('1', 64)) RETURNING id`, mesh).Scan(&sender))
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, repeat('b', 64)) RETURNING id`, mesh).Scan(&bob))
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now())`)
	require.NoError(t, err)
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status)
		VALUES ($1, $2, repeat('b', 64), 'here', 's', 'idle') RETURNING id`, mesh, bob).Scan(&p))
	const backlog = 2000
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state,
			pushed_node, pushed_presence, pushed_at, expires_at)
		SELECT 'e' || i, $1, $2, 'now', 'pushed', 'here', $3, now() - interval '1 minute', now() + interval '1 hour'
		FROM generate_series(1, $4) AS i`, mesh, bob, p, backlog)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.backlog (member_id, mesh_id, estimate, at_bound) VALUES ($1, $2, $3, true)`, bob, mesh, backlog)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `ANALYZE claudemesh.delivery`)
	require.NoError(t, err)
	frame := []byte(`{"type":"push"}`)
	for _, n := range []int{1, 5} { // the per-row form and the set-based one
		envs := make([]store.OutgoingEnvelope, n)
		for i := range envs {
			envs[i] = directEnvelope(mesh, sender, strings.Repeat("1", 64), strings.Repeat("b", 64), "now", frame)
		}
		before := deliveryTuplesRead(t, pool)
		sent, _, err := st.SendBatch(ctx, "here", envs)
		require.NoError(t, err)
		for _, s := range sent {
			require.Equal(t, store.SentEnvelope{Queued: true, Recipients: 1}, s, "its session reads: it takes it")
		}
		require.Less(t, deliveryTuplesRead(t, pool)-before, int64(100), "a batch of %d, %d pushed rows unacked", n, backlog)
	}
}
