package store_test

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
)

// helloWorld is one copy of the fixture below: the same meshes, members and earlier state under
// its own ids, keys and signatures, so two copies can be registered side by side.
type helloWorld struct {
	hs    []store.HelloParams
	names map[string]string // mesh and member ids → fixture names
	ids   []string          // the world's mesh ids
}

func (w *helloWorld) name(id string) string {
	if n, ok := w.names[id]; ok {
		return n
	}
	return id
}

// A batch is decided as the per-hello path decides its hellos one at a time (00039): the same
// answers, the same rows and the same peer_joined lines. Only the meshes whose hellos resume,
// replace, take a hook's status or repeat one another go the per-hello way; the rest are
// decided by the set-based statement, refusals included.
func TestHelloBatchDecidesAsHellosOneAtATime(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now())`)
	require.NoError(t, err)

	listener, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer listener.Release()
	_, err = listener.Exec(ctx, `LISTEN t_all`)
	require.NoError(t, err)

	build := func(world int) *helloWorld {
		w := &helloWorld{names: map[string]string{}}
		key := func(n int) string { return fmt.Sprintf("%060d%04d", world, n) } // the world, then the key's number
		sig := func(s string) string { return fmt.Sprintf("w%d-%s", world, s) }
		mesh := func(name string, maxPeers int, archived bool) string {
			var id string
			require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey, max_peers, archived_at)
				VALUES ($1, $1, $2, $3, CASE WHEN $4 THEN now() END) RETURNING id`,
				fmt.Sprintf("%s-w%d", strings.ToLower(name), world), key(999), maxPeers, archived).Scan(&id))
			w.names[id] = name
			w.ids = append(w.ids, id)
			return id
		}
		member := func(meshID, name string, k int) string {
			var id string
			require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey, display_name)
				VALUES ($1, $2, $3) RETURNING id`, meshID, key(k), "member "+name).Scan(&id))
			w.names[id] = name
			return id
		}
		exec := func(sql string, args ...any) {
			_, err := pool.Exec(ctx, sql, args...)
			require.NoError(t, err)
		}
		m1, m2, m3, m4, m5, mx := mesh("M1", 3, false), mesh("M2", 0, false), mesh("M3", 0, false),
			mesh("M4", 0, false), mesh("M5", 0, false), mesh("MX", 0, true)
		m1a, m1b, m1c, m1d := member(m1, "m1a", 1), member(m1, "m1b", 2), member(m1, "m1c", 3), member(m1, "m1d", 4)
		m1e, m1f := member(m1, "m1e", 5), member(m1, "m1f", 6)
		m2a, m2b := member(m2, "m2a", 7), member(m2, "m2b", 8)
		m3a := member(m3, "m3a", 9)
		m4a := member(m4, "m4a", 10)
		m5a := member(m5, "m5a", 11)
		member(m5, "m5b", 12)
		mxa := member(mx, "mxa", 13)
		exec(`UPDATE claudemesh.member SET revoked_at = now() WHERE id = $1`, m1e)
		// M1 has one live session of its three; M2 one in its grace on a replica that is gone.
		exec(`INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id)
			VALUES ($1, $2, $3, 'here', 'old1')`, m1, m1a, key(1))
		exec(`INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, grace_until)
			VALUES ($1, $2, $3, 'gone', 's-resume', now() + interval '1 minute')`, m2, m2a, key(7))
		exec(`INSERT INTO claudemesh.seen_signature (signature, expires_at) VALUES ($1, now() + interval '1 minute')`, sig("replayed"))
		exec(`INSERT INTO claudemesh.session_key (mesh_id, session_pubkey, member_id) VALUES ($1, $2, $3)`, m1, key(500), m1c)
		// A hook's status waiting for M4's session, by its working directory.
		exec(`INSERT INTO claudemesh.pending_status (cwd, status, expires_at) VALUES ($1, 'working', now() + interval '1 minute')`,
			fmt.Sprintf("/hooked-%d", world))

		n := 0
		hello := func(meshID, memberID string, k int, session string, edit func(*store.HelloParams)) {
			p := store.HelloParams{MeshID: meshID, MemberID: memberID, MemberPubkey: key(k), SessionID: session,
				Role: "control-plane", PID: 100 + n, CWD: "/w", Signature: sig(fmt.Sprint("hello-", n)),
				SignatureExpires: time.Now().Add(time.Minute), Groups: []store.Group{{Name: "g"}}, Capabilities: []string{"c"}}
			if edit != nil {
				edit(&p)
			}
			w.hs = append(w.hs, p)
			n++
		}
		hello(m1, m1b, 2, "s0", nil)                                                                      // registered
		hello(m2, m2b, 8, "s1", func(p *store.HelloParams) { p.DisplayName = "bee" })                     // registered, per-hello mesh
		hello(m1, m1b, 777, "s2", nil)                                                                    // unauthorized: not its key
		hello(m1, m1c, 3, "s3", nil)                                                                      // registered: the third of three
		hello(m3, m3a, 9, "dup", nil)                                                                     // registered, then replaced
		hello(m1, m1d, 4, "s5", nil)                                                                      // capacity
		hello(m3, m3a, 9, "dup", func(p *store.HelloParams) { p.PID = 999 })                              // replaces the one before
		hello(m1, m1e, 5, "s7", nil)                                                                      // revoked
		hello(m4, m4a, 10, "s8", func(p *store.HelloParams) { p.CWD = fmt.Sprintf("/hooked-%d", world) }) // takes the hook's status
		hello(m1, m1b, 3, "s9", func(p *store.HelloParams) { p.Role = "session" })                        // parent_member_id_mismatch
		hello(m2, m2a, 7, "s-resume", nil)                                                                // resumed
		hello(m1, m1f, 6, "s11", func(p *store.HelloParams) { p.Signature = sig("replayed") })            // hello_replayed
		hello(m5, m5a, 11, "s12", func(p *store.HelloParams) { p.SessionPubkey = key(600) })              // registered, binds its key
		hello(m1, m1f, 6, "s13", func(p *store.HelloParams) { p.SessionPubkey = key(1) })                 // session_key_taken: m1a's own key
		hello(m1, m1b, 2, "s14", func(p *store.HelloParams) { p.SessionPubkey = key(500) })               // session_key_taken: bound to m1c
		hello("no-such-mesh", m1b, 2, "s15", nil)                                                         // unauthorized
		hello(mx, mxa, 13, "s16", nil)                                                                    // unauthorized: archived
		hello(m5, "", 12, "s17", func(p *store.HelloParams) { p.Role = "session" })                       // registered by its key alone
		return w
	}
	set, oneByOne := build(1), build(2)

	// run registers a world's batch in one transaction and counts the per-hello calls it made.
	run := func(w *helloWorld, oneAtATime bool) ([]store.HelloResult, int) {
		tx, err := pool.Begin(ctx)
		require.NoError(t, err)
		defer func() { _ = tx.Rollback(ctx) }()
		_, err = tx.Exec(ctx, `SET LOCAL track_functions = 'pl'`)
		require.NoError(t, err)
		if oneAtATime {
			_, err = tx.Exec(ctx, `SET LOCAL claudemesh.hello_one_at_a_time = on`)
			require.NoError(t, err)
		}
		// The backend's count not yet flushed to the statistics includes its earlier
		// transactions': the difference is this batch's.
		calls := func() (n int) {
			require.NoError(t, tx.QueryRow(ctx, `SELECT coalesce(sum(pg_stat_get_xact_function_calls(p.oid)), 0)::int
				FROM pg_proc p WHERE p.proname = 'hello' AND p.pronamespace = 'claudemesh'::regnamespace`).Scan(&n))
			return n
		}
		before := calls()
		res, err := store.HelloBatch(ctx, tx, st, "here", 100, w.hs)
		require.NoError(t, err)
		after := calls()
		require.NoError(t, tx.Commit(ctx))
		return res, after - before
	}
	got, perHello := run(set, false)
	want, all := run(oneByOne, true)
	require.Equal(t, len(oneByOne.hs), all, "one at a time, every hello is its own call")
	require.Equal(t, 5, perHello, "only M2's, M3's and M4's hellos go the per-hello way")

	describe := func(w *helloWorld, r store.HelloResult) string {
		require.NoError(t, r.Err)
		return fmt.Sprintf("refusal=%q member=%s limit=%d name=%q registered=%v status=%q epoch=%d resumed=%v old=%q",
			r.Refusal, w.name(r.MemberID), r.Limit, r.DisplayName, r.Registration.PresenceID != "", r.Registration.Status,
			r.Registration.Epoch, r.Resumed, r.Registration.OldNode)
	}
	for i := range want {
		require.Equal(t, describe(oneByOne, want[i]), describe(set, got[i]), "hello %d", i)
	}
	require.Equal(t, []string{"", "", "unauthorized", "", "", "capacity", "", "revoked", "", "parent_member_id_mismatch",
		"", "hello_replayed", "", "session_key_taken", "session_key_taken", "unauthorized", "unauthorized", ""},
		func() (codes []string) {
			for _, r := range got {
				codes = append(codes, r.Refusal)
			}
			return codes
		}())

	// What each world wrote, in fixture names.
	rows := func(w *helloWorld, sql string) []string {
		rs, err := pool.Query(ctx, sql, w.ids)
		require.NoError(t, err)
		var out []string
		for rs.Next() {
			vals, err := rs.Values()
			require.NoError(t, err)
			var parts []string
			for _, v := range vals {
				s := fmt.Sprint(v)
				if len(s) == 64 { // a key: by its number, without its world
					s = "key" + s[60:]
				}
				parts = append(parts, w.name(s))
			}
			out = append(out, strings.Join(parts, " "))
		}
		require.NoError(t, rs.Err())
		slices.Sort(out)
		return out
	}
	for name, sql := range map[string]string{
		"live sessions": `SELECT mesh_id, member_id, session_id, node_id, status, status_source, pid, coalesce(session_pubkey, ''),
			display_name, groups::text, capabilities::text, grace_until IS NULL, epoch
			FROM claudemesh.presence WHERE mesh_id = ANY ($1) AND ended_at IS NULL`,
		"ended sessions": `SELECT mesh_id, member_id, session_id FROM claudemesh.presence WHERE mesh_id = ANY ($1) AND ended_at IS NOT NULL`,
		"session keys":   `SELECT mesh_id, session_pubkey, member_id FROM claudemesh.session_key WHERE mesh_id = ANY ($1)`,
		"audit entries":  `SELECT mesh_id, event_type, actor, data::jsonb - 'presence_id' FROM claudemesh.audit_pending WHERE mesh_id = ANY ($1)`,
	} {
		require.Equal(t, rows(oneByOne, sql), rows(set, sql), name)
	}
	for _, world := range []int{1, 2} {
		var spent, hooks int
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.seen_signature WHERE signature LIKE $1`,
			fmt.Sprintf("w%d-%%", world)).Scan(&spent))
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.pending_status WHERE cwd = $1`,
			fmt.Sprintf("/hooked-%d", world)).Scan(&hooks))
		require.Equal(t, 13, spent, "world %d: the replayed one and every hello that passed membership", world)
		require.Equal(t, 0, hooks, "world %d: the hook's status was taken", world)
	}

	// The peer_joined lines each world sent, read up to a marker sent after both commits.
	_, err = pool.Exec(ctx, `SELECT pg_notify('t_all', 'end')`)
	require.NoError(t, err)
	joined := map[*helloWorld][]string{}
	for {
		n, err := listener.Conn().WaitForNotification(ctx)
		require.NoError(t, err)
		if n.Payload == "end" {
			break
		}
		for _, line := range strings.Split(n.Payload, "\n") {
			var ev struct {
				Y string `json:"y"`
				H string `json:"h"`
				M string `json:"m"`
				X struct {
					PresenceID  string `json:"presenceId"`
					DisplayName string `json:"displayName"`
					Status      string `json:"status"`
				} `json:"x"`
			}
			require.NoError(t, json.Unmarshal([]byte(line), &ev), line)
			if ev.Y != "peer_joined" {
				continue
			}
			for _, w := range []*helloWorld{set, oneByOne} {
				if _, ok := w.names[ev.H]; ok {
					require.NotEmpty(t, ev.X.PresenceID)
					joined[w] = append(joined[w], fmt.Sprintf("%s %s %q %s", w.name(ev.H), w.name(ev.M), ev.X.DisplayName, ev.X.Status))
				}
			}
		}
	}
	slices.Sort(joined[set])
	slices.Sort(joined[oneByOne])
	require.Len(t, joined[oneByOne], 7, "one line per new session")
	require.Equal(t, joined[oneByOne], joined[set])
}
