package store_test

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
)

// With SetNotifyAfterCommit (NOTIFY_AFTER_COMMIT), a send's notifications leave after its
// commit, from a transaction of their own (migration 00033). What that must not change: a statement that fails tells no replica anything, not
// then and not with the next statement on the same connection; the connection stays usable
// (it is not dropped for being left inside a failed transaction); a send whose notifications
// could not be sent after its commit is still stored and answered as stored, and its
// notifications do not turn up later with another send's; a replica told of a push finds its
// delivery.
func TestNotificationsLeaveOnlyWithTheirCommit(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	// One connection: a failed statement's leftovers would meet the next one.
	pool, err := db.NewPool(ctx, url, db.PoolConfig{MaxConns: 1, AppName: "claudemesh-test"})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	admin := dbtest.PoolFor(t, url)
	st := store.New(pool, "t")
	st.SetNotifyAfterCommit(true)
	key := func(c byte) string { return strings.Repeat(string(c), 64) }
	var mesh, sender, recipient string
	require.NoError(t, admin.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', $1) RETURNING id`, key('0')).Scan(&mesh))
	_, err = admin.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now()), ('other', now())`)
	require.NoError(t, err)
	require.NoError(t, admin.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`, mesh, key('a')).Scan(&sender))
	require.NoError(t, admin.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`, mesh, key('b')).Scan(&recipient))
	_, err = admin.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status)
		VALUES ($1, $2, $3, 'other', 'b-other', 'idle')`, mesh, recipient, key('b'))
	require.NoError(t, err)

	listener, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer listener.Close(context.Background())
	_, err = listener.Exec(ctx, `LISTEN t_n_other`)
	require.NoError(t, err)
	// told collects what the other node hears up to a marker sent after everything else.
	told := func() string {
		t.Helper()
		_, err := admin.Exec(ctx, `SELECT pg_notify('t_n_other', 'marker')`)
		require.NoError(t, err)
		wait, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		var got []string
		for {
			n, err := listener.WaitForNotification(wait)
			require.NoError(t, err)
			if n.Payload == "marker" {
				return strings.Join(got, "\n")
			}
			got = append(got, n.Payload)
		}
	}

	_, err = pool.Exec(ctx, `SELECT 1`) // the pool's one connection, made now
	require.NoError(t, err)
	for _, path := range []string{"alone", "set-based", "flush fails"} {
		t.Run(path, func(t *testing.T) {
			// A direct push to the other node, in a batch whose statement then fails: a
			// broadcast's audit entry names a mesh that does not exist, which the append
			// refuses after the push was routed (the set-based statement appends last).
			first := directEnvelope(mesh, sender, key('a'), key('b'), "now", []byte(`{"n":"first-`+path+`"}`))
			batch := []store.OutgoingEnvelope{first}
			if path == "set-based" {
				bogus := directEnvelope("no-such-mesh", sender, key('a'), "", "now", []byte(`{"n":"bogus"}`))
				bogus.Kind, bogus.Key, bogus.TargetSpec = store.SendAll, "", "*"
				batch = append(batch, bogus)
			}
			if path == "flush fails" { // as when the notification queue is full
				_, err := admin.Exec(ctx, `ALTER FUNCTION claudemesh.flush_notes() RENAME TO flush_notes_kept`)
				require.NoError(t, err)
				_, err = admin.Exec(ctx, `CREATE FUNCTION claudemesh.flush_notes() RETURNS int LANGUAGE plpgsql AS
					$$ BEGIN RAISE EXCEPTION 'too many notifications queued' USING ERRCODE = '54000'; END $$`)
				require.NoError(t, err)
			}
			conns := pool.Stat().NewConnsCount()
			_, _, err := st.SendBatch(ctx, "here", batch)
			if path == "flush fails" {
				_, err := admin.Exec(ctx, `DROP FUNCTION claudemesh.flush_notes(); ALTER FUNCTION claudemesh.flush_notes_kept() RENAME TO flush_notes`)
				require.NoError(t, err)
			}
			if path == "set-based" {
				require.Error(t, err)
				require.True(t, store.RejectedInput(err), "a refused statement is a known failure: %v", err)
				var stored bool
				require.NoError(t, admin.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM claudemesh.envelope WHERE id = $1)`, first.ID).Scan(&stored))
				require.False(t, stored)
			} else {
				require.NoError(t, err, "stored, whether or not its notifications went out")
				var stored bool
				require.NoError(t, admin.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM claudemesh.envelope WHERE id = $1)`, first.ID).Scan(&stored))
				require.True(t, stored)
			}

			second := directEnvelope(mesh, sender, key('a'), key('b'), "now", []byte(`{"n":"second-`+path+`"}`))
			sent, _, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{second})
			require.NoError(t, err)
			require.True(t, sent[0].Queued)
			require.Equal(t, conns, pool.Stat().NewConnsCount(), "the failed statement cost the pool its connection")

			heard := told()
			require.Contains(t, heard, "second-"+path)
			if path != "alone" {
				require.NotContains(t, heard, "first-"+path, "a replica was told of a push that failed or was not sent in time")
			} else {
				require.Contains(t, heard, "first-"+path)
			}
			// Each push names a delivery the other node can already read.
			ids := regexp.MustCompile(`"i":(\d+)`).FindAllStringSubmatch(heard, -1)
			require.NotEmpty(t, ids)
			for _, m := range ids {
				var state string
				require.NoError(t, admin.QueryRow(ctx, `SELECT state FROM claudemesh.delivery WHERE id = $1`, m[1]).Scan(&state))
				require.Equal(t, "assigned", state)
			}
		})
	}
}
