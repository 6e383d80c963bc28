package store_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
)

// An assigned push written to a socket that a reconnect has since taken over (on another node,
// or on the same node at a newer epoch) is not recorded as pushed, where only the old socket's
// end would ever have released it: it is pending again and every replica is woken for the
// member, so the new socket gets it. One written to the presence's current socket is pushed.
func TestTakenPushToATakenOverSocketIsPendingAgain(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	st := store.New(pool, "t")
	var moved, bumped, current string
	for _, p := range []struct {
		id   *string
		node string
	}{{&moved, "b"}, {&bumped, "a"}, {&current, "a"}} {
		// Each presence at epoch 2 on its node now; the pushes below were written at epoch 1
		// (the socket before the takeover) or at 2.
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, epoch)
			VALUES ('m', 'bob', repeat('b', 64), $1, gen_random_uuid()::text, 2) RETURNING id`, p.node).Scan(p.id))
	}
	rows, err := pool.Query(ctx, `INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state,
			pushed_node, pushed_presence, pushed_at, expires_at)
		VALUES ('to-moved', 'm', 'bob', 'now', 'assigned', 'a', $1, now(), now() + interval '1 hour'),
		       ('to-bumped', 'm', 'bob', 'now', 'assigned', 'a', $2, now(), now() + interval '1 hour'),
		       ('to-current', 'm', 'bob', 'now', 'assigned', 'a', $3, now(), now() + interval '1 hour')
		RETURNING id`, moved, bumped, current)
	require.NoError(t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)

	listener := dbtest.ConnFor(t, url)
	_, err = listener.Exec(ctx, `LISTEN t_all`)
	require.NoError(t, err)
	require.NoError(t, st.MarkDelivered(ctx, nil, nil, []store.Taken{{ID: ids[0], Epoch: 2}, {ID: ids[1], Epoch: 1}, {ID: ids[2], Epoch: 2}}))
	require.Equal(t, []string{"to-bumped pending -", "to-current pushed a", "to-moved pending -"},
		textColumn(t, pool, `SELECT envelope_id || ' ' || state || ' ' || coalesce(pushed_node, '-') FROM claudemesh.delivery ORDER BY envelope_id`))
	wait, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	n, err := listener.WaitForNotification(wait)
	require.NoError(t, err, "every replica is woken for the member")
	require.JSONEq(t, `{"k":"d","m":"bob"}`, n.Payload)
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	_, err = listener.WaitForNotification(short)
	require.True(t, errors.Is(err, context.DeadlineExceeded), "one wake-up for the member: %v", err)

	// A taken push already acked (its ack recorded first) stays acked.
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET state = 'acked' WHERE envelope_id = 'to-bumped'`)
	require.NoError(t, err)
	require.NoError(t, st.MarkDelivered(ctx, nil, nil, []store.Taken{{ID: ids[1], Epoch: 1}}))
	require.Equal(t, []string{"to-bumped acked"},
		textColumn(t, pool, `SELECT envelope_id || ' ' || state FROM claudemesh.delivery WHERE envelope_id = 'to-bumped'`))
}

// The end of an old socket, recorded after a reconnect took its presence over (here on the
// same node, at a newer epoch), neither ends the presence nor releases what the new socket
// holds: those would be pushed to it again. The new socket's own end releases them.
func TestAStaleEndLeavesTheNewSocketsPushes(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.mesh (id, slug, name, owner_pubkey) VALUES ('m', 'm', 'm', repeat('0', 64))`)
	require.NoError(t, err)
	var p string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, epoch)
		VALUES ('m', 'bob', repeat('b', 64), 'a', 's', 2) RETURNING id`).Scan(&p))
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state,
			pushed_node, pushed_presence, pushed_at, expires_at)
		VALUES ('assigned', 'm', 'bob', 'now', 'assigned', 'a', $1, now(), now() + interval '1 hour'),
		       ('pushed', 'm', 'bob', 'now', 'pushed', 'a', $1, now(), now() + interval '1 hour')`, p)
	require.NoError(t, err)
	state := func() string {
		return strings.Join(textColumn(t, pool, `SELECT (SELECT CASE WHEN ended_at IS NOT NULL THEN 'ended' WHEN grace_until IS NOT NULL THEN 'grace' ELSE 'live' END
			FROM claudemesh.presence) || ' ' || string_agg(envelope_id || ':' || state, ' ' ORDER BY envelope_id) FROM claudemesh.delivery`), "")
	}
	old := []store.PresenceRef{{ID: p, Epoch: 1}}
	require.NoError(t, st.EndSessions(ctx, "a", old, time.Now().Add(time.Minute), nil))
	require.Equal(t, "live assigned:assigned pushed:pushed", state(), "the old socket's grace")
	require.NoError(t, st.EndSessions(ctx, "a", nil, time.Time{}, old))
	require.Equal(t, "live assigned:assigned pushed:pushed", state(), "the old socket's end")
	require.NoError(t, st.EndSessions(ctx, "b", nil, time.Time{}, []store.PresenceRef{{ID: p, Epoch: 2}}))
	require.Equal(t, "live assigned:assigned pushed:pushed", state(), "an end from another node")

	require.NoError(t, st.EndSessions(ctx, "a", nil, time.Time{}, []store.PresenceRef{{ID: p, Epoch: 2}}))
	require.Equal(t, "ended assigned:pending pushed:pending", state(), "the new socket's own end")
}

// A replica that stopped without recording its sessions' ends (its last statement failed, or a
// hello committed as it stopped) is declared dead once silent past the deadline, like one that
// crashed: its presences enter their grace and end, and its pushes go back to pending, instead
// of staying listed, counted against the mesh's capacity and chosen for direct sends, for good.
// One that stopped cleanly left nothing, and is not counted as dead.
func TestAStoppedNodesLeftoversAreTakenOver(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at, stopped_at) VALUES
		('stopped', now() - interval '1 minute', now() - interval '1 minute'),
		('stopped-cleanly', now() - interval '1 minute', now() - interval '1 minute'),
		('stopped-with-a-push', now() - interval '1 minute', now() - interval '1 minute'),
		('stopping', now(), now())`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, last_seen_at)
		VALUES ('m', 'bob', repeat('b', 64), 'stopped', 'left', now() - interval '1 minute'),
		       ('m', 'bob', repeat('b', 64), 'stopping', 'fresh', now())`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state,
			pushed_node, pushed_presence, pushed_at, expires_at)
		VALUES ('held', 'm', 'bob', 'now', 'pushed', 'stopped-with-a-push', 'p', now() - interval '1 minute', now() + interval '1 hour')`)
	require.NoError(t, err)
	var marked []store.DeadNode
	_, err = st.InTx(ctx, nil, func(tx *store.Tx) error {
		var err error
		marked, _, err = tx.TakeOverDeadNodes(ctx, 30*time.Second, 90*time.Second)
		return err
	})
	require.NoError(t, err)
	var ids []string
	for _, n := range marked {
		ids = append(ids, n.ID)
	}
	require.ElementsMatch(t, []string{"stopped", "stopped-with-a-push"}, ids, "a clean stop is not a death")
	require.Equal(t, []string{"held pending"},
		textColumn(t, pool, `SELECT envelope_id || ' ' || state FROM claudemesh.delivery`), "its push goes back to pending")
	require.Equal(t, []string{"fresh live", "left grace"},
		textColumn(t, pool, `SELECT session_id || ' ' || CASE WHEN grace_until IS NULL THEN 'live' ELSE 'grace' END FROM claudemesh.presence ORDER BY session_id`),
		"a node stopped within the deadline is left alone")
}

// A send that read a presence while its replica was being taken over can assign a row to it
// after the take-over released that replica's pushes. When the presence's grace runs out (its
// session never came back), the row goes back to pending for the member's other sessions,
// instead of waiting for a node that is gone until it expires.
func TestAPresenceWhoseGraceRanOutReleasesWhatItHeld(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	st := store.New(pool, "t")
	var p string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, grace_until)
		VALUES ('m', 'bob', repeat('b', 64), 'dead', 's', now() - interval '1 second') RETURNING id`).Scan(&p))
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state,
			pushed_node, pushed_presence, pushed_at, expires_at)
		VALUES ('late', 'm', 'bob', 'now', 'assigned', 'dead', $1, now(), now() + interval '1 hour')`, p)
	require.NoError(t, err)
	listener := dbtest.ConnFor(t, url)
	_, err = listener.Exec(ctx, `LISTEN t_all`)
	require.NoError(t, err)
	var ended []store.EndedPresence
	_, err = st.InTx(ctx, nil, func(tx *store.Tx) error {
		var err error
		ended, err = tx.EndExpiredGrace(ctx)
		return err
	})
	require.NoError(t, err)
	require.Len(t, ended, 1)
	require.Equal(t, []string{"late pending -"},
		textColumn(t, pool, `SELECT envelope_id || ' ' || state || ' ' || coalesce(pushed_node, '-') FROM claudemesh.delivery`))
	wait, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	n, err := listener.WaitForNotification(wait)
	require.NoError(t, err, "every replica is woken for the member")
	require.JSONEq(t, `{"k":"d","m":"bob"}`, n.Payload)
}
