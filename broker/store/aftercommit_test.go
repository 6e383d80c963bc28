package store_test

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
)

// A send's statement runs inside a transaction of the store's making in two modes: with
// SetPushBeforeFlush it commits without waiting for its flush and a second transaction
// confirms the flush (flushBehind); with SetNotifyAfterCommit (NOTIFY_AFTER_COMMIT), its notifications leave after
// its commit, from a transaction of their own (migration 00033). What neither may change: a
// statement that fails tells no replica anything, not then and not with the next statement on
// the same connection; the connection stays usable (it is not dropped for being left inside a
// failed transaction); a replica told of a push finds its delivery. A send whose
// notifications could not be sent after its commit is still stored and answered as stored,
// and its notifications do not turn up later with another send's. A send whose flush could
// not be confirmed is answered "outcome unknown", never "failed": it is stored.
func TestNotificationsLeaveOnlyWithTheirCommit(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	// One connection: a failed statement's leftovers would meet the next one.
	pool, err := db.NewPool(ctx, url, db.PoolConfig{MaxConns: 1, AppName: "claudemesh-test"})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	admin := dbtest.PoolFor(t, url)
	key := func(c byte) string { return strings.Repeat(string(c), 64) }
	mesh, sender, _ := pushFixture(ctx, t, admin)

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
	for _, mode := range []string{"notify after commit", "flush behind"} {
		st := store.New(pool, "t")
		st.SetNotifyAfterCommit(mode == "notify after commit")
		st.SetPushBeforeFlush(mode == "flush behind")
		for _, path := range []string{"alone", "set-based", "flush fails"} {
			t.Run(mode+"/"+path, func(t *testing.T) {
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
				if path == "flush fails" && mode == "flush behind" { // the connection lost, Postgres stopping
					t.Cleanup(store.SetFlushStatement("SELECT 1/0"))
				}
				if path == "flush fails" && mode == "notify after commit" { // as when the notification queue is full
					_, err := admin.Exec(ctx, `ALTER FUNCTION claudemesh.flush_notes() RENAME TO flush_notes_kept`)
					require.NoError(t, err)
					_, err = admin.Exec(ctx, `CREATE FUNCTION claudemesh.flush_notes() RETURNS int LANGUAGE plpgsql AS
					$$ BEGIN RAISE EXCEPTION 'too many notifications queued' USING ERRCODE = '54000'; END $$`)
					require.NoError(t, err)
				}
				conns := pool.Stat().NewConnsCount()
				_, _, err := st.SendBatch(ctx, "here", batch)
				if path == "flush fails" && mode == "flush behind" {
					require.True(t, store.OutcomeUnknown(err), "a commit whose flush is not confirmed may be stored or not: %v", err)
					err = nil
					store.SetFlushStatement("")
				}
				if path == "flush fails" && mode == "notify after commit" {
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
				if path == "set-based" || path == "flush fails" && mode == "notify after commit" {
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
}

// With SetPushBeforeFlush a send batch is committed, visible and told to the other replicas
// before Postgres has confirmed its flush; the batch is stored only once flushed says so. The test
// holds the confirmation (its statement made to wait for a lock the test holds).
func TestSendBatchIsToldAtCommitAndStoredOnceFlushed(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	admin := dbtest.ConnFor(t, url)
	st := store.New(pool, "t")
	st.SetPushBeforeFlush(true)
	key := func(c byte) string { return strings.Repeat(string(c), 64) }
	mesh, sender, _ := pushFixture(ctx, t, admin)
	listener := dbtest.ConnFor(t, url)
	_, err := listener.Exec(ctx, `LISTEN t_n_other`)
	require.NoError(t, err)

	t.Cleanup(store.SetFlushStatement(`SELECT pg_advisory_xact_lock_shared(4242), pg_logical_emit_message(true, 'claudemesh.flush', '')`))
	_, err = admin.Exec(ctx, `SELECT pg_advisory_lock(4242)`)
	require.NoError(t, err)
	e := directEnvelope(mesh, sender, key('a'), key('b'), "now", []byte(`{"n":"held"}`))
	sent, _, flushed, err := st.SendBatchCommitted(ctx, "here", []store.OutgoingEnvelope{e})
	require.NoError(t, err)
	require.True(t, sent[0].Queued)
	wait, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	n, err := listener.WaitForNotification(wait)
	require.NoError(t, err)
	require.Contains(t, n.Payload, `"n":"held"`, "the other replica is told at the commit")
	var visible bool
	require.NoError(t, admin.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM claudemesh.envelope WHERE id = $1)`, e.ID).Scan(&visible))
	require.True(t, visible)

	confirmed := make(chan error, 1)
	go func() { confirmed <- flushed() }()
	dbtest.WaitFor(t, 10*time.Second, "the flush confirmation waiting", func() bool {
		var waiting bool
		require.NoError(t, admin.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted)`).Scan(&waiting))
		return waiting
	})
	select {
	case err := <-confirmed:
		t.Fatalf("flushed returned before its confirmation: %v", err)
	default:
	}
	_, err = admin.Exec(ctx, `SELECT pg_advisory_unlock(4242)`)
	require.NoError(t, err)
	select {
	case err := <-confirmed:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("flushed did not return once confirmed")
	}
}

// execer is a pool or a connection.
type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// pushFixture makes the nodes "here" and "other" and a mesh with a sender (key 'a'…) and a
// recipient (key 'b'…) whose one session is on "other".
func pushFixture(ctx context.Context, t *testing.T, admin execer) (mesh, sender, recipient string) {
	t.Helper()
	key := func(c byte) string { return strings.Repeat(string(c), 64) }
	require.NoError(t, admin.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', $1) RETURNING id`, key('0')).Scan(&mesh))
	_, err := admin.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now()), ('other', now())`)
	require.NoError(t, err)
	require.NoError(t, admin.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`, mesh, key('a')).Scan(&sender))
	require.NoError(t, admin.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`, mesh, key('b')).Scan(&recipient))
	_, err = admin.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status)
		VALUES ($1, $2, $3, 'other', 'b-other', 'idle')`, mesh, recipient, key('b'))
	require.NoError(t, err)
	return mesh, sender, recipient
}

// A connection whose named statements are gone (a DEALLOCATE ALL, a DISCARD ALL from a tool)
// refuses one send, a known failure, and is replaced: the next send is stored, not refused
// for as long as the connection lives.
func TestPushBeforeFlushSurvivesLostStatements(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	pool, err := db.NewPool(ctx, url, db.PoolConfig{MaxConns: 1, AppName: "claudemesh-test", Named: store.NamedSQL()})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	admin := dbtest.PoolFor(t, url)
	st := store.New(pool, "t")
	st.SetPushBeforeFlush(true)
	mesh, sender, _ := pushFixture(ctx, t, admin)
	key := func(c byte) string { return strings.Repeat(string(c), 64) }
	send := func(text string) (bool, error) {
		e := directEnvelope(mesh, sender, key('a'), key('b'), "now", []byte(`{"n":"`+text+`"}`))
		_, _, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{e})
		var stored bool
		require.NoError(t, admin.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM claudemesh.envelope WHERE id = $1)`, e.ID).Scan(&stored))
		return stored, err
	}
	stored, err := send("before")
	require.NoError(t, err)
	require.True(t, stored)
	_, err = pool.Exec(ctx, `DEALLOCATE ALL`) // the pool's one connection
	require.NoError(t, err)
	stored, err = send("lost")
	require.Error(t, err)
	require.False(t, store.OutcomeUnknown(err), "nothing ran: a known failure, %v", err)
	require.False(t, stored)
	stored, err = send("after")
	require.NoError(t, err, "the connection whose statements were lost was replaced")
	require.True(t, stored)
}
