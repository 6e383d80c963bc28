package store_test

import (
	"context"
	"crypto/md5"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

// A send batch whose answer never came must not be refused as if it had not committed: the
// committer tells these cases apart by OutcomeUnknown, against a real Postgres.
func TestOutcomeUnknown(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)

	// Postgres answered with an error: the statement rolled back.
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, "SELECT 1/0")
	require.Error(t, err)
	require.False(t, store.OutcomeUnknown(err), "a Postgres error: rolled back, known")

	// No connection at all: nothing was sent.
	_, err = pgx.Connect(ctx, "postgres://postgres@127.0.0.1:1/none?sslmode=disable&connect_timeout=2")
	require.Error(t, err)
	require.False(t, store.OutcomeUnknown(err), "refused connection: never sent, known")

	// The statement ran past the deadline: it may still commit.
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	_, err = conn.Exec(short, "SELECT pg_sleep(5)")
	require.Error(t, err)
	require.True(t, store.OutcomeUnknown(err), "deadline while it ran: unknown (%v)", err)

	// The connection broke while the statement ran (a proxy between us and Postgres cut).
	proxy := dbtest.NewProxy(t, url)
	pool := dbtest.PoolFor(t, url)
	victim, err := pgx.Connect(ctx, proxy.URL(url))
	require.NoError(t, err)
	pid := victim.PgConn().PID()
	done := make(chan error, 1)
	go func() { _, err := victim.Exec(ctx, "SELECT pg_sleep(5)"); done <- err }()
	dbtest.WaitFor(t, 5*time.Second, "the statement running", func() bool {
		var n int
		_ = pool.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", pid).Scan(&n)
		return n == 1
	})
	proxy.Cut()
	err = <-done
	_ = victim.Close(context.Background())
	require.Error(t, err)
	require.True(t, store.OutcomeUnknown(err), "connection lost mid-statement: unknown (%v)", err)
}

// Taking over a dead node never waits on a presence another statement holds (a hello batch
// moving it elsewhere locks its presences in its own order; waiting deadlocked with it in
// reconnect storms): the held presence is left, the others enter their grace, and the next
// check graces the held one if it is still on the dead node.
func TestTakeOverSkipsHeldPresencesAndConverges(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	var mesh, member string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', repeat('a', 64)) RETURNING id`).Scan(&mesh))
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, repeat('b', 64)) RETURNING id`, mesh).Scan(&member))
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('gone', now() - interval '1 minute'), ('alive', now())`)
	require.NoError(t, err)
	var held string
	for i, node := range []string{"gone", "gone", "gone", "alive"} {
		var id string
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id)
			VALUES ($1, $2, repeat('b', 64), $3, $4) RETURNING id`, mesh, member, node, fmt.Sprintf("s%d", i)).Scan(&id))
		if i == 0 {
			held = id
		}
	}
	graced := func() map[string]bool {
		rows, err := pool.Query(ctx, `SELECT id, grace_until IS NOT NULL FROM claudemesh.presence`)
		require.NoError(t, err)
		out := map[string]bool{}
		for rows.Next() {
			var id string
			var g bool
			require.NoError(t, rows.Scan(&id, &g))
			out[id] = g
		}
		require.NoError(t, rows.Err())
		return out
	}

	hello, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer hello.Rollback(context.Background()) //nolint:errcheck // released below
	_, err = hello.Exec(ctx, `SELECT 1 FROM claudemesh.presence WHERE id = $1 FOR UPDATE`, held)
	require.NoError(t, err)

	short, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var marked []store.DeadNode
	_, err = st.InTx(short, nil, func(tx *store.Tx) error {
		var err error
		marked, _, err = tx.TakeOverDeadNodes(short, 30*time.Second, 90*time.Second)
		return err
	})
	require.NoError(t, err, "the take-over does not wait for the held presence")
	require.Len(t, marked, 1)
	require.Equal(t, "gone", marked[0].ID)
	g := graced()
	require.False(t, g[held], "the held presence is left for now")
	n := 0
	for id, v := range g {
		if v {
			n++
			require.NotEqual(t, held, id)
		}
	}
	require.Equal(t, 2, n, "the dead node's other presences are in grace; the live node's are not")

	// A node declared dead while it still runs (a late heartbeat) serves until it re-registers:
	// a session that connects to it meanwhile is not taken from it.
	var late string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id)
		VALUES ($1, $2, repeat('b', 64), 'gone', 'late') RETURNING id`, mesh, member).Scan(&late))

	require.NoError(t, hello.Rollback(ctx))
	_, err = st.InTx(ctx, nil, func(tx *store.Tx) error {
		marked, _, err = tx.TakeOverDeadNodes(ctx, 30*time.Second, 90*time.Second)
		return err
	})
	require.NoError(t, err)
	require.Empty(t, marked, "the node was marked dead once")
	g = graced()
	require.True(t, g[held], "the next check graces what was held")
	require.False(t, g[late], "a session that connected after the node was declared dead is left alone")
}

// Sessions that arrive faster than autovacuum looks (a fresh database, a morning after a quiet
// night) leave the planner believing there are hardly any live sessions, so every partial index
// on them looks empty and a walk of one as cheap as a probe; every connection keeps the plans
// it made then. The replicas' refresh analyzes such a table once, one replica at a time, never
// waits for another maintenance command's lock, and leaves a table alone that only churns.
func TestStatisticsFollowFastGrowth(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	// Autovacuum would analyze it too, at a moment of its own choosing.
	_, err := pool.Exec(ctx, `ALTER TABLE claudemesh.presence SET (autovacuum_enabled = off)`)
	require.NoError(t, err)
	flushed := func(sql string, args ...any) {
		conn, err := pool.Acquire(ctx)
		require.NoError(t, err)
		defer conn.Release()
		_, err = conn.Exec(ctx, sql, args...)
		require.NoError(t, err)
		_, err = conn.Exec(ctx, `SELECT pg_stat_force_next_flush()`) // counts reach the view once it idles
		require.NoError(t, err)
	}
	live := func() int64 { // what the planner expects a query for every live session to return
		var plan []map[string]map[string]any
		require.NoError(t, pool.QueryRow(ctx, `EXPLAIN (FORMAT JSON) SELECT * FROM claudemesh.presence WHERE ended_at IS NULL`).Scan(&plan))
		return int64(plan[0]["Plan"]["Plan Rows"].(float64))
	}
	refresh := func() []string {
		names, err := st.RefreshStatistics(ctx)
		require.NoError(t, err)
		return names
	}

	flushed(`INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, cwd)
		SELECT 'mesh-' || (i % 30), 'member-' || i, md5(i::text) || md5(i::text), 'node-' || (i % 3), 's' || i, '/w/' || i
		FROM generate_series(1, 3000) AS i`)
	dbtest.WaitFor(t, 10*time.Second, "the inserted rows counted as live", func() bool {
		var n int64
		require.NoError(t, pool.QueryRow(ctx, `SELECT n_live_tup FROM pg_stat_user_tables
			WHERE schemaname = 'claudemesh' AND relname = 'presence'`).Scan(&n))
		return n >= 3000
	})
	require.Less(t, live(), int64(300), "before: the planner takes the 3,000 live sessions for a handful")

	// Another replica refreshing: this one leaves it to that one.
	other, err := pool.Begin(ctx)
	require.NoError(t, err)
	_, err = other.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('claudemesh.refresh_statistics', 0))`)
	require.NoError(t, err)
	require.Empty(t, refresh())
	require.NoError(t, other.Rollback(ctx))

	// A maintenance command holding the table (an index build, a VACUUM): skipped, not waited for.
	maint, err := pool.Begin(ctx)
	require.NoError(t, err)
	_, err = maint.Exec(ctx, `LOCK TABLE claudemesh.presence IN SHARE UPDATE EXCLUSIVE MODE`)
	require.NoError(t, err)
	short, cancel := context.WithTimeout(ctx, 10*time.Second) // waiting would hang, not fail
	names, err := st.RefreshStatistics(short)
	cancel()
	require.NoError(t, err, "the refresh does not wait for the lock")
	require.Empty(t, names)
	require.NoError(t, maint.Rollback(ctx))

	require.Equal(t, []string{"presence"}, refresh())
	require.Greater(t, live(), int64(2000), "after: the planner knows the live sessions are many")
	require.Empty(t, refresh(), "analyzed once, not again while it has not grown")

	// Status flips rewrite rows all day without the table growing: no ANALYZE (each one makes
	// every connection plan its statements again).
	for _, status := range []string{"working", "idle", "working"} {
		flushed(`UPDATE claudemesh.presence SET status = $1`, status)
	}
	dbtest.WaitFor(t, 10*time.Second, "the updates counted", func() bool {
		var n int64
		require.NoError(t, pool.QueryRow(ctx, `SELECT n_mod_since_analyze FROM pg_stat_user_tables
			WHERE schemaname = 'claudemesh' AND relname = 'presence'`).Scan(&n))
		return n >= 9000
	})
	require.Empty(t, refresh())
}

// Every new session adds a presence row; ended ones go an hour after they end, so a client
// reconnecting in a loop cannot grow the table without bound. Live ones and recent ones stay;
// a backlog of several pages goes in one sweep.
func TestEndedPresencesArePruned(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, ended_at)
		VALUES ('m', 'a', repeat('a', 64), 'n', 'live', NULL),
		       ('m', 'a', repeat('a', 64), 'n', 'recent', now() - interval '10 minutes')`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, ended_at)
		SELECT 'm', 'a', repeat('a', 64), 'n', 'old-' || i, now() - $1 * interval '1 second' - interval '1 minute'
		FROM generate_series(1, 12000) AS i`, store.EndedPresenceRetention.Seconds())
	require.NoError(t, err)
	require.NoError(t, st.DeleteExpired(ctx))
	require.Equal(t, []string{"live", "recent"}, textColumn(t, pool, `SELECT session_id FROM claudemesh.presence ORDER BY session_id`))
}

// textColumn runs a query of one text column and returns its rows.
func textColumn(t *testing.T, pool *pgxpool.Pool, query string) []string {
	t.Helper()
	rows, err := pool.Query(dbtest.Context(t), query)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return out
}

// Every start of a replica with a generated id registers a new node; the rows of nodes gone a
// day go, unless something live still names them (the takeover has yet to move it).
func TestGoneNodesArePruned(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at, stopped_at, dead_at) VALUES
		('live', now(), NULL, NULL),
		('stopped-recently', now() - interval '1 hour', now() - interval '1 hour', NULL),
		('stopped-long-ago', now() - interval '2 days', now() - interval '2 days', NULL),
		('dead-long-ago', now() - interval '2 days', NULL, now() - interval '2 days'),
		('dead-with-live-presence', now() - interval '2 days', NULL, now() - interval '2 days'),
		('dead-with-held-push', now() - interval '2 days', NULL, now() - interval '2 days'),
		('silent-long-ago', now() - interval '2 days', NULL, NULL)`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id)
		VALUES ('m', 'a', repeat('a', 64), 'dead-with-live-presence', 's')`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state,
			pushed_node, pushed_presence, pushed_at, expires_at)
		VALUES ('e', 'm', 'b', 'now', 'pushed', 'dead-with-held-push', 'p', now() - interval '2 days', now() + interval '1 hour')`)
	require.NoError(t, err)
	require.NoError(t, st.DeleteExpired(ctx))
	// A node silent for days but never declared dead is left to the dead-node check first.
	require.Equal(t, []string{"dead-with-held-push", "dead-with-live-presence", "live", "silent-long-ago", "stopped-recently"},
		textColumn(t, pool, `SELECT id FROM claudemesh.node ORDER BY id`))
}

// The poll's give-back takes back only what is still as the poll saw it: old, assigned on this
// node, to a session no longer live here. A row assigned anew since, or to a live session, or
// by another node, is left alone.
func TestGiveBackTakesOnlyOrphanedPushes(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	var live, gone string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id)
		VALUES ('m', 'a', repeat('a', 64), 'n', 'live') RETURNING id`).Scan(&live))
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, ended_at)
		VALUES ('m', 'a', repeat('a', 64), 'n', 'gone', now()) RETURNING id`).Scan(&gone))
	rows, err := pool.Query(ctx, `INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state,
			pushed_node, pushed_presence, pushed_at, expires_at)
		VALUES ('to-live', 'm', 'a', 'now', 'assigned', 'n', $1, now() - interval '1 minute', now() + interval '1 hour'),
		       ('orphan', 'm', 'a', 'now', 'assigned', 'n', $2, now() - interval '1 minute', now() + interval '1 hour'),
		       ('fresh', 'm', 'a', 'now', 'assigned', 'n', $2, now(), now() + interval '1 hour'),
		       ('other-node', 'm', 'a', 'now', 'assigned', 'o', $2, now() - interval '1 minute', now() + interval '1 hour')
		RETURNING id`, live, gone)
	require.NoError(t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	n, err := st.GiveBack(ctx, "n", ids)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.Equal(t, []string{"fresh assigned", "orphan pending", "other-node assigned", "to-live assigned"},
		textColumn(t, pool, `SELECT envelope_id || ' ' || state FROM claudemesh.delivery ORDER BY envelope_id`))
}

// A hello's capacity count and presence lookup read their own mesh's live sessions, whatever
// the statistics say. Until presence is first analyzed (a fresh database: the first seconds of
// a connect storm) every index on live sessions looks about empty, so walking one whole costs
// the planner no more than a probe, and hellos walked the one by cwd: in a 10,000-session
// connect, 5,392 of their statements read every live session of the cluster. Migrations 00025
// and 00026 leave them only indexes led by mesh. The test asks the planner for every index it
// would use for those statements, with their values (a custom plan) and without (a generic
// plan), taking each away in turn until only a sequential scan is left.
func TestHelloStatementsOnlyUseIndexesLedByMesh(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	_, err := pool.Exec(ctx, `ALTER TABLE claudemesh.presence SET (autovacuum_enabled = off)`) // no statistics
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, cwd)
		SELECT 'mesh-' || (i % 60), 'member-' || i, md5(i::text) || md5(i::text), 'node-1', 's' || i, '/bench/idle'
		FROM generate_series(1, 300) AS i`)
	require.NoError(t, err)
	// As claudemesh.hello has them (00024), its variables as parameters; both take the same four
	// (the lookup's last one is unused).
	statements := map[string]string{
		"capacity count": `SELECT count(*) FROM claudemesh.presence x
			WHERE x.mesh_id = $1 AND x.ended_at IS NULL
			  AND NOT (x.session_id = $2 AND x.member_pubkey = $3)
			  AND NOT ($4 <> '' AND x.session_pubkey IS NOT DISTINCT FROM $4)`,
		"presence lookup": `SELECT x.id, x.node_id, x.grace_until FROM claudemesh.presence x
			WHERE x.mesh_id = $1 AND x.member_id = $2 AND x.session_id = $3 AND x.ended_at IS NULL AND $4::text IS NOT NULL`,
		// Whether the hello moves a live session from another replica (00072), by sessionId and
		// by session key.
		"move probe": `SELECT EXISTS (SELECT 1 FROM (SELECT x.node_id, x.grace_until FROM claudemesh.presence x
			WHERE x.mesh_id = $1 AND x.member_id = $2 AND x.session_id = $3 AND x.ended_at IS NULL OFFSET 0) y
			WHERE y.grace_until IS NULL AND y.node_id <> $4)`,
		"move probe by key": `SELECT EXISTS (SELECT 1 FROM (SELECT x.node_id, x.grace_until FROM claudemesh.presence x
			WHERE x.mesh_id = $1 AND x.session_pubkey = $3 AND x.ended_at IS NULL AND x.member_id = $2 OFFSET 0) y
			WHERE y.grace_until IS NULL AND y.node_id <> $4)`,
	}
	for name, sql := range statements {
		for _, generic := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/generic=%v", name, generic), func(t *testing.T) {
				conn, err := pool.Acquire(ctx)
				require.NoError(t, err)
				defer conn.Release()
				tx, err := conn.Begin(ctx)
				require.NoError(t, err)
				defer func() { _ = tx.Rollback(ctx) }()
				explain := func() map[string]any {
					var plan []map[string]any
					if generic {
						require.NoError(t, tx.QueryRow(ctx, `EXPLAIN (FORMAT JSON) EXECUTE hello_stmt('mesh-1', 's1', 'k', '')`).Scan(&plan))
					} else {
						require.NoError(t, tx.QueryRow(ctx, `EXPLAIN (FORMAT JSON) `+sql, "mesh-1", "s1", "k", "").Scan(&plan))
					}
					return plan[0]["Plan"].(map[string]any)
				}
				if generic {
					_, err = tx.Exec(ctx, `PREPARE hello_stmt(text, text, text, text) AS `+sql)
					require.NoError(t, err)
					defer func() { _, _ = conn.Exec(ctx, `DEALLOCATE hello_stmt`) }()
					_, err = tx.Exec(ctx, `SET LOCAL plan_cache_mode = force_generic_plan`)
					require.NoError(t, err)
				}
				var walked []string
				for {
					index := indexScanned(explain())
					if index == "" {
						break
					}
					walked = append(walked, index)
					require.Less(t, len(walked), 20, "indexes dropped one by one")
					var first string
					require.NoError(t, tx.QueryRow(ctx, `SELECT a.attname FROM pg_index i
						JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
						WHERE i.indexrelid = ('claudemesh.' || $1)::regclass`, index).Scan(&first))
					require.Equal(t, "mesh_id", first, "%s may walk %s (after %v)", name, index, walked[:len(walked)-1])
					_, err = tx.Exec(ctx, `DROP INDEX claudemesh.`+pgx.Identifier{index}.Sanitize())
					require.NoError(t, err)
				}
				require.NotEmpty(t, walked)
				t.Logf("%v, then a sequential scan", walked)
			})
		}
	}
}

// indexScanned is the index a plan's presence scan uses, "" for a sequential scan.
func indexScanned(node map[string]any) string {
	if name, ok := node["Index Name"].(string); ok {
		return name
	}
	children, _ := node["Plans"].([]any)
	for _, c := range children {
		if name := indexScanned(c.(map[string]any)); name != "" {
			return name
		}
	}
	return ""
}

// A hook finds its session by sessionId and member key without reading the other sessions of
// the cluster. Before migration 00026 no index was led by sessionId: a hook read every live
// session's entry of an index, or every presence row, live or ended.
func TestHookFindsItsSessionWithoutReadingOthers(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, cwd, pid, ended_at)
		SELECT 'mesh-' || (i % 60), 'member-' || i, md5(i::text) || md5(i::text), 'node-1', 's' || i, '/w/' || i, i,
		       CASE WHEN i % 3 = 0 THEN now() END
		FROM generate_series(1, 12000) AS i`)
	require.NoError(t, err)
	// The signed hooks' keys are live members' (a key no member holds is answered without a
	// look at presence: TestHookOfNoLiveMemberWritesNothing).
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.mesh (id, slug, name, owner_pubkey) VALUES ('mesh-7', 'm7', 'm7', repeat('0', 64));
		INSERT INTO claudemesh.member (mesh_id, pubkey) SELECT 'mesh-7', md5(i::text) || md5(i::text) FROM generate_series(7, 8) AS i`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `ANALYZE claudemesh.presence`)
	require.NoError(t, err)
	// Signed (the member's key) and unsigned (HOOK_ALLOW_UNSIGNED: any member's session), with
	// the statement's values (a custom plan) and without (the generic plan a connection
	// settles on).
	for i, c := range []struct {
		target int
		signed bool
		mode   string
	}{{7, true, "auto"}, {8, true, "force_generic_plan"}, {10, false, "auto"}, {11, false, "force_generic_plan"}} {
		target := c.target
		func() {
			tx, err := pool.Begin(ctx)
			require.NoError(t, err)
			defer func() { _ = tx.Rollback(ctx) }()
			_, err = tx.Exec(ctx, `SELECT set_config('plan_cache_mode', $1, true)`, c.mode)
			require.NoError(t, err)
			member := fmt.Sprintf("%x%[1]x", md5.Sum([]byte(fmt.Sprint(target))))
			if !c.signed {
				member = ""
			}
			var want string
			require.NoError(t, tx.QueryRow(ctx, `SELECT id FROM claudemesh.presence WHERE session_id = $1`, fmt.Sprint("s", target)).Scan(&want))
			before := presencePagesRead(ctx, t, tx)
			rows, err := db.New(tx).HookStatus(ctx, db.HookStatusParams{MemberPubkey: member,
				SessionID: fmt.Sprint("s", target), Cwd: "/elsewhere", Status: "working", FreshSeconds: 60, Ns: "t",
				ReleaseLimit: 10, Signature: fmt.Sprint("sig", target), SigExpires: time.Now().Add(time.Minute)})
			require.NoError(t, err)
			require.Len(t, rows, 1)
			require.Equal(t, want, rows[0].PresenceID, "the hook's own session")
			read := presencePagesRead(ctx, t, tx) - before
			t.Logf("hook %d (signed %v, %s): %d pages", i, c.signed, c.mode, read)
			// A probe and the status update: a few pages per index. Reading the 8,000 live
			// sessions' entries of an index is over a hundred.
			require.Less(t, read, int64(60), "pages of presence and its indexes read")
		}()
	}
}

// A signed hook proves its key, not that the key is anyone's. Anyone can make a fresh key per
// request, so a hook of a key no live member holds (never a member, or revoked) must write
// nothing: no remembered signature, no pending signal, no status (migration 00048). A live
// member's hook, with no session yet, still waits for its hello.
func TestHookOfNoLiveMemberWritesNothing(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	key := func(c byte) string { return strings.Repeat(string(c), 64) }
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.mesh (id, slug, name, owner_pubkey) VALUES ('m', 'm', 'm', repeat('0', 64));
		INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ('m', repeat('a', 64));
		INSERT INTO claudemesh.member (mesh_id, pubkey, revoked_at) VALUES ('m', repeat('b', 64), now());
		INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, cwd, pid)
		VALUES ('m', 'x', repeat('c', 64), 'node-1', 'claude-1', '/w', 1)`)
	require.NoError(t, err)
	written := func() (sigs, pending int) {
		require.NoError(t, pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM claudemesh.seen_signature),
			(SELECT count(*) FROM claudemesh.pending_status)`).Scan(&sigs, &pending))
		return sigs, pending
	}
	hook := func(member, sig string) store.HookOutcome {
		o, err := st.HookStatus(ctx, store.HookQuery{MemberPubkey: member, SessionID: "claude-1", CWD: "/w", PID: 1}, "working",
			time.Minute, sig, time.Now().Add(time.Minute))
		require.NoError(t, err)
		return o
	}
	// 'c' has a live session (a presence row) but is no member: presence alone proves nothing.
	for _, k := range []string{key('d'), key('b'), key('c')} {
		require.Equal(t, store.HookOutcome{NotMember: true}, hook(k, "sig-"+k[:1]), "key %.1s…", k)
	}
	sigs, pending := written()
	require.Zero(t, sigs, "no signature remembered for a key no live member holds")
	require.Zero(t, pending, "no pending signal for a key no live member holds")
	var status string
	require.NoError(t, pool.QueryRow(ctx, `SELECT status FROM claudemesh.presence WHERE session_id = 'claude-1'`).Scan(&status))
	require.Equal(t, "idle", status, "no status changed")

	// A live member with no session yet: the signal waits, once per signature.
	require.Equal(t, store.HookOutcome{Pending: true}, hook(key('a'), "sig-a"))
	require.Equal(t, store.HookOutcome{Replayed: true}, hook(key('a'), "sig-a"))
	sigs, pending = written()
	require.Equal(t, 1, sigs)
	require.Equal(t, 1, pending)

	// The look-up by key alone is one probe of an index, whatever the number of members.
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey)
		SELECT 'm', md5(i::text) || md5(i::text) FROM generate_series(1, 20000) AS i; ANALYZE claudemesh.member`)
	require.NoError(t, err)
	var plan string
	require.NoError(t, pool.QueryRow(ctx, `EXPLAIN (COSTS OFF) SELECT 1 FROM claudemesh.member m
		WHERE m.pubkey = $1 AND m.revoked_at IS NULL`, key('e')).Scan(&plan))
	require.Contains(t, plan, "member_live_by_key")
}

// Deliveries held by presences that went away (a takeover, a session's end) are pending again,
// and every replica is woken for their members, once, on the cluster channel (migration 00040):
// each looks for its own sessions of them, one registering right then included. Until 00040
// only the replicas of the members' live sessions were woken, by node; none is any more. A
// takeover calls release_held; the end of closed sockets (end_sessions, putting the presence
// in its grace or ending it) calls it too since 00031, where it had a copy of its own; so does a
// replica's release of pushes it could not write (store.Release). Each is called twice on one
// connection: the second runs the plan PL/pgSQL kept from the first.
func TestReleasedDeliveriesWakeTheirMembersReplicas(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.mesh (id, slug, name, owner_pubkey) VALUES ('m', 'm', 'm', repeat('0', 64))`)
	require.NoError(t, err) // an ended presence's audit entry names it
	var ids []string
	rows, err := pool.Query(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, grace_until)
		VALUES ('m', 'gone', repeat('a', 64), 'dead', 'old', NULL),         -- the released one
		       ('m', 'gone', repeat('a', 64), 'n1', 'live', NULL),          -- the member's live session
		       ('m', 'gone', repeat('a', 64), 'n2', 'grace', now() + interval '1 minute'),
		       ('m', 'other', repeat('b', 64), 'n3', 'bystander', NULL)
		RETURNING id`)
	require.NoError(t, err)
	ids, err = pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state,
			pushed_node, pushed_presence, pushed_at, expires_at)
		VALUES ('e1', 'm', 'gone', 'now', 'pushed', 'dead', $1, now(), now() + interval '1 day'),
		       ('e2', 'm', 'gone', 'now', 'assigned', 'dead', $1, now(), now() + interval '1 day'),
		       ('e3', 'm', 'other', 'now', 'pushed', 'n3', $2, now(), now() + interval '1 day')`, ids[0], ids[3])
	require.NoError(t, err)

	listener := dbtest.ConnFor(t, url)
	for _, ch := range []string{"t_n_dead", "t_n_n1", "t_n_n2", "t_n_n3", "t_all"} {
		_, err = listener.Exec(ctx, `LISTEN `+ch)
		require.NoError(t, err)
	}
	release := map[string]string{
		"takeover": `SELECT 0 FROM claudemesh.release_held('t', ARRAY[$1::text])`,
		"grace":    `SELECT claudemesh.end_sessions('dead', 't', ARRAY[$1::text], ARRAY[1::bigint], now() + interval '1 minute', '{}', '{}')`,
		"end":      `SELECT claudemesh.end_sessions('dead', 't', '{}', '{}', NULL, ARRAY[$1::text], ARRAY[1::bigint])`,
	}
	// What each call returns (sessions ended) and the released presence's state after it.
	want := []struct {
		how, state string
		ended      int
	}{
		{"takeover", "live", 0}, {"takeover", "live", 0},
		{"grace", "grace", 0}, {"grace", "grace", 0},
		{"end", "ended", 1}, {"end", "ended", 0},
		// A replica's own release of pushes it could not write (store.Release).
		{"unwritten", "ended", 0}, {"unwritten", "ended", 0},
	}
	st := store.New(pool, "t")
	var held []int64
	rows, err = pool.Query(ctx, `SELECT id FROM claudemesh.delivery WHERE envelope_id IN ('e1', 'e2')`)
	require.NoError(t, err)
	held, err = pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	conn, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	for i, w := range want {
		how := w.how
		if i > 0 {
			_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET state = 'pushed', pushed_presence = $1 WHERE envelope_id IN ('e1', 'e2')`, ids[0])
			require.NoError(t, err)
		}
		var ended int
		if how == "unwritten" {
			n, err := st.Release(ctx, "n1", held, false)
			require.NoError(t, err)
			require.Equal(t, 2, n, "released")
		} else {
			require.NoError(t, conn.QueryRow(ctx, release[how], ids[0]).Scan(&ended), how)
		}
		require.Equal(t, w.ended, ended, "%s: sessions ended", how)
		var state string
		require.NoError(t, pool.QueryRow(ctx, `SELECT CASE WHEN ended_at IS NOT NULL THEN 'ended' WHEN grace_until IS NOT NULL THEN 'grace' ELSE 'live' END
			FROM claudemesh.presence WHERE id = $1`, ids[0]).Scan(&state))
		require.Equal(t, w.state, state, how)
		rows, err = pool.Query(ctx, `SELECT envelope_id || ':' || state || ':' || coalesce(pushed_presence, '-') FROM claudemesh.delivery ORDER BY envelope_id`)
		require.NoError(t, err)
		states, err := pgx.CollectRows(rows, pgx.RowTo[string])
		require.NoError(t, err)
		require.Equal(t, []string{"e1:pending:-", "e2:pending:-", "e3:pushed:" + ids[3]}, states, how)
		// Notifications of one transaction arrive together: every one of them within a moment of
		// the first; one for the cluster, for the member whose deliveries were released, and
		// none for the bystander's.
		// (Ending a session also tells the cluster peer_left.)
		var woken []string
		for timeout := 5 * time.Second; ; timeout = 200 * time.Millisecond {
			wait, cancel := context.WithTimeout(ctx, timeout)
			n, err := listener.WaitForNotification(wait)
			cancel()
			if errors.Is(err, context.DeadlineExceeded) && timeout < time.Second {
				break
			}
			require.NoError(t, err, how)
			for line := range strings.SplitSeq(n.Payload, "\n") {
				var m map[string]any
				require.NoError(t, json.Unmarshal([]byte(line), &m), line)
				if m["k"] != "e" {
					woken = append(woken, fmt.Sprint(n.Channel, " ", m))
				}
			}
		}
		require.Equal(t, []string{"t_all map[k:d m:gone]"}, woken, "%s: every replica, once", how)
	}
}

// A full hello batch (64, the registrar's limit) over several meshes registers every hello in
// one statement: each in its own subtransaction, 64 being as many as Postgres caches per
// backend.
func TestFullHelloBatchRegistersEveryHello(t *testing.T) {
	ctx, pool, st := helloStore(t)
	hs := make([]store.HelloParams, 64)
	var meshes [4]string
	for i := range meshes {
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ($1, $1, $2) RETURNING id`,
			fmt.Sprint("m", i), fmt.Sprintf("%064d", i)).Scan(&meshes[i]))
	}
	for i := range hs {
		key := fmt.Sprintf("%064x", 1000+i)
		mesh := meshes[i%len(meshes)] // interleaved: the statement orders them by mesh
		var member string
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`, mesh, key).Scan(&member))
		hs[i] = store.HelloParams{MeshID: mesh, MemberID: member, MemberPubkey: key, SessionID: fmt.Sprint("s", i),
			Role: "control-plane", PID: 100 + i, CWD: "/w", Signature: fmt.Sprint("sig-", i), SignatureExpires: time.Now().Add(time.Minute)}
	}
	res, err := st.Hellos(ctx, "here", 100, hs)
	require.NoError(t, err)
	require.Len(t, res, len(hs))
	for i, r := range res {
		require.NoError(t, r.Err, "hello %d", i)
		require.Empty(t, r.Refusal, "hello %d", i)
		require.Equal(t, hs[i].MemberID, r.MemberID, "hello %d answered in its own place", i)
		require.NotEmpty(t, r.Registration.PresenceID, "hello %d", i)
	}
	var live int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.presence WHERE node_id = 'here' AND ended_at IS NULL`).Scan(&live))
	require.Equal(t, len(hs), live)
}

// A hello says whether something may wait for its session (migration 00039): a pending
// delivery for its member, or a push to an earlier connection of the session it resumed (the
// hello makes it pending again). A delivery already pushed to another of the member's sessions
// is not waiting for this one, and a session taken over from another replica with nothing
// held for it has nothing to claim (a failover's hellos claim nothing).
func TestHelloSaysWhatWaitsForItsSession(t *testing.T) {
	ctx, pool, st := helloStore(t)
	var mesh string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('w', 'w', $1) RETURNING id`,
		fmt.Sprintf("%064d", 0)).Scan(&mesh))
	members := map[string]string{}
	key := func(name string) string { return fmt.Sprintf("%064x", name) }
	for _, name := range []string{"queued", "pushed", "resumed", "moved", "session", "none"} {
		var id string
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`,
			mesh, key(name)).Scan(&id))
		members[name] = id
	}
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state,
			pushed_node, pushed_at, expires_at)
		VALUES ('e1', $1, $2, 'now', 'pending', NULL, NULL, now() + interval '1 day'),
		       ('e2', $1, $3, 'now', 'pushed', 'here', now(), now() + interval '1 day'),
		       ('e3', $1, $4, 'next', 'pending', NULL, NULL, now() + interval '1 day')`,
		mesh, members["queued"], members["pushed"], members["session"])
	require.NoError(t, err)
	// resumed: in its grace on this replica, with a push written to its old socket and never
	// acked; moved: live on another replica, with nothing held for it.
	var resumed string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, grace_until)
		VALUES ($1, $2, $3, 'here', 's-resumed', now() + interval '1 minute') RETURNING id`, mesh, members["resumed"], key("resumed")).Scan(&resumed))
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state,
			pushed_node, pushed_presence, pushed_at, expires_at)
		VALUES ('e4', $1, $2, 'now', 'pushed', 'here', $3, now(), now() + interval '1 day')`, mesh, members["resumed"], resumed)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('there', now())`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id)
		VALUES ($1, $2, $3, 'there', 's-moved')`, mesh, members["moved"], key("moved"))
	require.NoError(t, err)

	var hs []store.HelloParams
	for i, name := range []string{"queued", "pushed", "resumed", "moved", "session", "none"} {
		h := store.HelloParams{MeshID: mesh, MemberID: members[name], MemberPubkey: key(name), SessionID: "s-" + name,
			Role: "control-plane", CWD: "/w", Signature: fmt.Sprint("sig-", i), SignatureExpires: time.Now().Add(time.Minute)}
		if name == "session" {
			h.Role, h.MemberID = "session", "" // known by its parent's key alone
		}
		hs = append(hs, h)
	}
	res, err := st.Hellos(ctx, "here", 100, hs)
	require.NoError(t, err)
	got := map[string]bool{}
	for i, name := range []string{"queued", "pushed", "resumed", "moved", "session", "none"} {
		require.NoError(t, res[i].Err)
		require.Empty(t, res[i].Refusal, name)
		got[name] = res[i].Waiting
	}
	require.Equal(t, "there", res[3].Registration.OldNode, "moved: taken over from the other replica")
	require.Equal(t, map[string]bool{"queued": true, "pushed": false, "resumed": true, "moved": false, "session": true, "none": false}, got)
}

// helloStore is a store on a fresh database whose replica, "here", is registered: what a
// hello batch needs.
func helloStore(t testing.TB) (context.Context, *pgxpool.Pool, *store.Store) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now())`)
	require.NoError(t, err)
	return ctx, pool, store.New(pool, "t")
}

// A hello tells the cluster peer_joined only when a live session of another member of its mesh
// takes system events (migration 00073): a notice every replica reads and decodes is not sent
// for no one. Today's CLI does not ask for events, so a mesh of its sessions sends none.
func TestHelloTellsJoinsOnlyWhenAnotherMembersSessionListens(t *testing.T) {
	ctx, pool, st := helloStore(t)
	var mesh string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('j', 'j', $1) RETURNING id`,
		fmt.Sprintf("%064d", 0)).Scan(&mesh))
	key := func(name string) string { return fmt.Sprintf("%064x", name) }
	members := map[string]string{}
	for _, name := range []string{"plain", "listener", "late"} {
		var id string
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`,
			mesh, key(name)).Scan(&id))
		members[name] = id
	}
	listener := dbtest.ConnFor(t, pool.Config().ConnString()) // notices stay in their database
	_, err := listener.Exec(ctx, `LISTEN t_all`)
	require.NoError(t, err)
	hello := func(name, session string, caps ...string) string {
		res, err := st.Hellos(ctx, "here", 100, []store.HelloParams{{MeshID: mesh, MemberID: members[name], MemberPubkey: key(name),
			SessionID: session, Role: "control-plane", CWD: "/w", Capabilities: caps, Signature: "sig-" + session,
			SignatureExpires: time.Now().Add(time.Minute)}})
		require.NoError(t, err)
		require.NoError(t, res[0].Err)
		require.Empty(t, res[0].Refusal)
		return res[0].Registration.PresenceID
	}
	hello("plain", "s-plain")                                   // no one listens yet
	hello("listener", "s-listener", protocol.CapSystemEvents)   // nor does anyone for its own join
	hello("listener", "s-listener-2", protocol.CapSystemEvents) // its own member's session is never told
	late := hello("late", "s-late")                             // the listener is told
	var joined []string
	for _, n := range noticesSoFar(ctx, t, pool, listener, "t_all") {
		for line := range strings.SplitSeq(n.Payload, "\n") {
			var m struct {
				K, Y string
				X    struct{ PresenceID string }
			}
			require.NoError(t, json.Unmarshal([]byte(line), &m), line)
			if m.K == "e" {
				joined = append(joined, m.Y+" "+m.X.PresenceID)
			}
		}
	}
	require.Equal(t, []string{"peer_joined " + late}, joined)
}

// A hello of a session whose live presence a close ends while the hello waits for its row
// (closes take no mesh lock) registers a new presence: the session is live afterwards, not
// refused or failed, and the presence is a new one: not reported resumed or moved from the
// replica whose close ended it (that replica would be told to close a socket already gone). The
// hello reads the presence under its mesh's lock and updates it by id, inserting instead when
// the update finds it ended (migrations 00074-00075).
func TestHelloRacingItsSessionsCloseRegistersANewPresence(t *testing.T) {
	ctx, pool, st := helloStore(t)
	var mesh, member string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('r', 'r', $1) RETURNING id`,
		fmt.Sprintf("%064d", 0)).Scan(&mesh))
	key := fmt.Sprintf("%064x", "racer")
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`,
		mesh, key).Scan(&member))
	hello := func(node, sig string) (store.HelloResult, error) {
		res, err := st.Hellos(ctx, node, 100, []store.HelloParams{{MeshID: mesh, MemberID: member, MemberPubkey: key,
			SessionID: "s", Role: "control-plane", CWD: "/w", Signature: sig, SignatureExpires: time.Now().Add(time.Minute)}})
		if err != nil {
			return store.HelloResult{}, err
		}
		return res[0], nil
	}
	res, err := hello("here", "sig-1")
	require.NoError(t, err)
	require.NoError(t, res.Err)
	first := res.Registration.PresenceID

	// The close: it holds the row, ended, until it commits.
	closer, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = closer.Rollback(ctx) }()
	_, err = closer.Exec(ctx, `UPDATE claudemesh.presence SET ended_at = now() WHERE id = $1`, first)
	require.NoError(t, err)
	type result struct {
		store.HelloResult
		err error
	}
	second := make(chan result, 1)
	go func() {
		r, err := hello("there", "sig-2")
		second <- result{r, err}
	}()
	// The hello (on another replica) has read the presence live and waits for its row.
	require.Eventually(t, func() bool {
		var waiting bool
		err := pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = 'transactionid'
			  AND query LIKE '%hello_batch%')`).Scan(&waiting)
		return err == nil && waiting
	}, 10*time.Second, 5*time.Millisecond)
	require.NoError(t, closer.Commit(ctx))

	var got result
	select {
	case got = <-second:
	case <-time.After(30 * time.Second):
		t.Fatal("the hello did not return")
	}
	require.NoError(t, got.err)
	require.NoError(t, got.Err)
	require.Empty(t, got.Refusal)
	res = got.HelloResult
	require.NotEqual(t, first, res.Registration.PresenceID, "the ended presence is not the session's")
	require.Empty(t, res.Registration.OldNode, "a new presence, moved from no replica")
	require.False(t, res.Resumed)
	live := textColumn(t, pool, `SELECT id FROM claudemesh.presence WHERE member_id = '`+member+`' AND ended_at IS NULL`)
	require.Equal(t, []string{res.Registration.PresenceID}, live)
}

// A hello whose capabilities are not a JSON array fails alone; the batch's other hellos are
// registered (hello_batch converts them in its own query since migration 00075). The broker
// always sends an array: this is the statement's own guard.
func TestHelloBatchFailsABadHelloAlone(t *testing.T) {
	ctx, pool, _ := helloStore(t)
	var mesh string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('b', 'b', $1) RETURNING id`,
		fmt.Sprintf("%064d", 0)).Scan(&mesh))
	keys := []string{fmt.Sprintf("%064x", "bad"), fmt.Sprintf("%064x", "good")}
	for _, k := range keys {
		_, err := pool.Exec(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2)`, mesh, k)
		require.NoError(t, err)
	}
	rows, err := pool.Query(ctx, `SELECT idx, code, coalesce(failure, ''), coalesce(presence_id, '')
		FROM claudemesh.hello_batch('here', 't', 100, ARRAY[$1, $1], ARRAY['', ''], ARRAY[$2, $3], ARRAY['s1', 's2'],
			ARRAY['', ''], ARRAY['', ''], ARRAY[1, 2], ARRAY['/w', '/w'], ARRAY['[]', '[]']::jsonb[],
			ARRAY['{"system_events": true}', '["system_events"]']::jsonb[], ARRAY['sig-1', 'sig-2'],
			ARRAY[now() + interval '1 minute', now() + interval '1 minute'], ARRAY[false, false],
			ARRAY['control-plane', 'control-plane'], ARRAY['h', 'h'], ARRAY['', ''], ARRAY['', ''], ARRAY['', ''])
		ORDER BY idx`, mesh, keys[0], keys[1])
	require.NoError(t, err)
	type answer struct {
		idx                       int
		code, failure, presenceID string
	}
	var got []answer
	for rows.Next() {
		var a answer
		require.NoError(t, rows.Scan(&a.idx, &a.code, &a.failure, &a.presenceID))
		got = append(got, a)
	}
	require.NoError(t, rows.Err())
	require.Len(t, got, 2)
	require.Equal(t, "failed", got[0].code)
	require.Contains(t, got[0].failure, "capabilities are not a JSON array")
	require.Empty(t, got[1].code, "the other hello is registered")
	require.NotEmpty(t, got[1].presenceID)
}
