package store_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
)

// A small batch of direct envelopes takes a lean path of single-row statements per envelope
// (migration 00016), every other batch the set-based statement. A recipient must not be able
// to tell which one stored a message: for every kind of target, the same answer, the same
// delivery row, the same notification to the replica holding the session, the same audit
// entry, whether the envelope was alone, in a small batch, or in a set-based one.
func TestOneDirectSendMatchesTheSetBasedForm(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	// Function call counts: which path each batch took.
	admin := dbtest.ConnFor(t, url)
	_, err := admin.Exec(ctx, `DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET track_functions = ''pl''', current_database()); END $$`)
	require.NoError(t, err)
	pool := dbtest.PoolFor(t, url)
	st := store.New(pool, "t")
	key := func(c byte) string { return strings.Repeat(string(c), 64) }

	var mesh string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', $1) RETURNING id`, key('0')).Scan(&mesh))
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now()), ('other', now())`)
	require.NoError(t, err)
	members := map[byte]string{}
	for _, c := range []byte("c123456d") {
		var id string
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`, mesh, key(c)).Scan(&id))
		members[c] = id
	}
	_, err = pool.Exec(ctx, `UPDATE claudemesh.member SET revoked_at = now() WHERE id = $1`, members['d'])
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.session_key (mesh_id, session_pubkey, member_id) VALUES ($1, $2, $3), ($1, $4, $5)`,
		mesh, key('a'), members['4'], key('b'), members['d'])
	require.NoError(t, err)
	presence := func(member byte, node, session, sessionKey, status string, grace bool) {
		t.Helper()
		var sk any
		if sessionKey != "" {
			sk = sessionKey
		}
		_, err := pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, session_pubkey, status, grace_until)
			VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $8 THEN now() + interval '1 minute' END)`,
			mesh, members[member], key(member), node, session, sk, status, grace)
		require.NoError(t, err)
	}
	presence('1', "other", "1o", "", "idle", false) // also on this node: this node's first
	presence('1', "here", "1h", "", "idle", false)
	presence('2', "other", "2o", "", "idle", false)    // only on the other node
	presence('3', "other", "3o", "", "working", false) // takes "now" only
	presence('4', "here", "4h", "", "idle", false)     // its session key's session is elsewhere
	presence('4', "other", "4k", key('a'), "idle", false)
	presence('6', "here", "6h", "", "idle", true) // in grace: never picked
	// member 5 has no session: its messages wait.

	listener, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer listener.Close(context.Background())
	for _, ch := range []string{"t_n_other", "t_all"} {
		_, err = listener.Exec(ctx, `LISTEN `+ch)
		require.NoError(t, err)
	}

	frame := []byte(`{"type":"push","n":1}`)
	// wake: the member every replica is woken for (migration 00040), when no session took the
	// message.
	cases := []struct {
		name, key, prio, cmid string
		frame                 []byte
		wake                  byte
	}{
		{"member key, a session here and one elsewhere", key('1'), "now", "", frame, 0},
		{"member key, a session elsewhere", key('2'), "now", "", frame, 0},
		{"member key, too large to ride along", key('2'), "now", "", nil, 0},
		{"member key, working, now", key('3'), "now", "", frame, 0},
		{"member key, working, next", key('3'), "next", "", frame, '3'},
		{"session key", key('4'), "now", "", frame, 0},
		{"session key's own session", key('a'), "now", "", frame, 0},
		{"session key of a revoked member", key('b'), "now", "", frame, 0},
		{"no session", key('5'), "low", "", frame, '5'},
		{"only a session in grace", key('6'), "now", "", frame, '6'},
		{"revoked member", key('d'), "now", "", frame, 0},
		{"unknown key", key('f'), "now", "", frame, 0},
		{"client message id", key('2'), "now", "cm-1", frame, 0},
	}
	sends, setSends := 0, 0
	for _, c := range cases {
		if c.cmid == "" {
			sends, setSends = sends+3, setSends+1
		} else {
			sends, setSends = sends+6, setSends+2
		}
		t.Run(c.name, func(t *testing.T) {
			send := func(cmid string, m mode) outcome {
				return sendOutcome(ctx, t, pool, st, listener, mesh, members['c'], key('c'), c.key, c.prio, cmid, c.frame, m)
			}
			if c.cmid == "" {
				alone := send("", alone)
				if c.wake != 0 {
					require.Contains(t, alone.notified, fmt.Sprintf(`t_all {"k":"d","m":"%s","y":"%s"}`, members[c.wake], c.prio))
				} else {
					require.NotContains(t, alone.notified, "t_all")
				}
				require.Equal(t, alone, send("", inSmallBatch))
				require.Equal(t, alone, send("", setBased))
				return
			}
			// Each path stores its own client message id once, then answers its retry.
			for _, retry := range []bool{false, true} {
				alone := send(c.cmid+"-alone", alone)
				require.Equal(t, alone, send(c.cmid+"-small", inSmallBatch))
				require.Equal(t, alone, send(c.cmid+"-set", setBased))
				require.Equal(t, retry, alone.row == "x", "the second send of a client message id is a retry")
			}
		})
	}
	// In a small batch each answer and local delivery is the envelope's own.
	for _, first := range []byte{'1', '2'} {
		second := byte('1' + '2' - first)
		batch := make([]store.OutgoingEnvelope, 2)
		for i, k := range []byte{first, second} {
			batch[i] = directEnvelope(mesh, members['c'], key('c'), key(k), "now", frame)
		}
		sent, local, err := st.SendBatch(ctx, "here", batch)
		require.NoError(t, err)
		require.Equal(t, []store.SentEnvelope{{Queued: true, Recipients: 1}, {Queued: true, Recipients: 1}}, sent)
		require.Len(t, local, 1, "member 1 has a session here, member 2 only elsewhere")
		require.Equal(t, map[byte]int{'1': 0, '2': 1}[first], local[0].Envelope)
		var env string
		require.NoError(t, pool.QueryRow(ctx, `SELECT envelope_id FROM claudemesh.delivery WHERE id = $1`, local[0].ID).Scan(&env))
		require.Equal(t, batch[local[0].Envelope].ID, env)
		wait, cancel := context.WithTimeout(ctx, 10*time.Second)
		n, err := listener.WaitForNotification(wait)
		cancel()
		require.NoError(t, err)
		require.Contains(t, n.Payload, `"p":"`, "member 2's session elsewhere gets its push")
	}
	sends += 2

	// Two pushes for one other node travel in one notification, one line each, in batch order.
	batch := make([]store.OutgoingEnvelope, 2)
	for i := range batch {
		batch[i] = directEnvelope(mesh, members['c'], key('c'), key('2'), "now", frame)
	}
	_, _, err = st.SendBatch(ctx, "here", batch)
	require.NoError(t, err)
	sends++
	wait, cancel := context.WithTimeout(ctx, 10*time.Second)
	n, err := listener.WaitForNotification(wait)
	cancel()
	require.NoError(t, err)
	lines := strings.Split(n.Payload, "\n")
	require.Len(t, lines, 2, "one notification, a line per push")
	var first, second int64
	require.NoError(t, pool.QueryRow(ctx, `SELECT (SELECT id FROM claudemesh.delivery WHERE envelope_id = $1),
		(SELECT id FROM claudemesh.delivery WHERE envelope_id = $2)`, batch[0].ID, batch[1].ID).Scan(&first, &second))
	require.Contains(t, lines[0], fmt.Sprintf(`"i":%d,`, first))
	require.Contains(t, lines[1], fmt.Sprintf(`"i":%d,`, second))

	for _, pc := range pool.AcquireAllIdle(ctx) { // counts reach the view when a backend next idles
		_, err := pc.Exec(ctx, `SELECT pg_stat_force_next_flush()`)
		require.NoError(t, err)
		pc.Release()
	}
	dbtest.WaitFor(t, 10*time.Second, "every one-envelope direct batch on the lean path", func() bool {
		var all, set int
		require.NoError(t, admin.QueryRow(ctx, `SELECT coalesce(sum(calls) FILTER (WHERE funcname = 'send_batch_capped'), 0),
				coalesce(sum(calls) FILTER (WHERE funcname = 'send_batch_set_capped'), 0)
			FROM pg_stat_user_functions WHERE schemaname = 'claudemesh'`).Scan(&all, &set))
		return all == sends && set == setSends
	})
}

// mode is how a send is batched: alone, with two more direct envelopes, or with a group
// envelope (which only the set-based statement takes).
type mode int

const (
	alone mode = iota
	inSmallBatch
	setBased
)

// directEnvelope is a send of a small ciphertext from sender to the target key.
func directEnvelope(mesh, sender, senderKey, target, prio string, frame []byte) store.OutgoingEnvelope {
	now := time.Now().UTC().Truncate(time.Microsecond)
	return store.OutgoingEnvelope{Kind: store.SendDirect, Key: target, Frame: frame, Envelope: store.Envelope{
		ID: uuid.NewString(), MeshID: mesh, SenderMemberID: sender, SenderPubkey: senderKey, SenderMemberPubkey: senderKey,
		TargetSpec: target, Priority: prio, Nonce: "bm9uY2U=", Ciphertext: "Y2lwaGVy", ClientID: "c1",
		CreatedAt: now, ExpiresAt: now.Add(time.Hour), SenderName: "s"}}
}

// outcome is what one send did, with its own ids replaced by placeholders.
type outcome struct {
	row      string // "e" stored or refused, "x" a retry of a stored client_message_id
	sent     store.SentEnvelope
	local    []store.LocalDelivery
	delivery string
	audit    string
	notified string
}

func sendOutcome(ctx context.Context, t *testing.T, pool *pgxpool.Pool, st *store.Store, listener *pgx.Conn,
	mesh, sender, senderKey, target, prio, cmid string, frame []byte, m mode) outcome {
	t.Helper()
	env := directEnvelope(mesh, sender, senderKey, target, prio, frame)
	env.ClientMessageID = cmid
	now := env.CreatedAt
	if cmid != "" {
		env.RequestFingerprint = "fp"
	}
	batch := []store.OutgoingEnvelope{env}
	switch m { // the others store nothing for a recipient and tell no replica
	case inSmallBatch:
		for _, k := range []string{"e", "9"} {
			other := env
			other.ID, other.Key, other.TargetSpec, other.ClientMessageID = uuid.NewString(), strings.Repeat(k, 64), strings.Repeat(k, 64), ""
			batch = append(batch, other)
		}
	case setBased:
		other := env
		other.ID, other.Kind, other.Key, other.TargetSpec, other.ClientMessageID = uuid.NewString(), store.SendGroup, "nobody", "@nobody", ""
		batch = append(batch, other)
	}
	sent, local, err := st.SendBatch(ctx, "here", batch)
	require.NoError(t, err)
	require.Len(t, sent, len(batch))
	if m == inSmallBatch {
		require.False(t, sent[1].Queued)
		require.False(t, sent[2].Queued)
	}
	out := outcome{row: "e", sent: sent[0], local: local}
	if sent[0].Original != "" {
		out.row, out.sent.Original = "x", "original"
		require.Equal(t, "fp", out.sent.StoredFingerprint)
	}
	var did int64
	var delivery string
	err = pool.QueryRow(ctx, `SELECT id, concat_ws('|', recipient_member_id, recipient_session_pubkey, recipient_session_id, priority, state,
			pushed_node, pushed_presence, pushed_at IS NOT NULL, expires_at = $2) FROM claudemesh.delivery WHERE envelope_id = $1`,
		env.ID, env.ExpiresAt).Scan(&did, &delivery)
	if err != pgx.ErrNoRows {
		require.NoError(t, err)
		out.delivery = delivery
	}
	for i := range out.local {
		require.Equal(t, did, out.local[i].ID)
		out.local[i].ID = 0
	}
	var audit string
	err = pool.QueryRow(ctx, `SELECT concat_ws('|', mesh_id, event_type, actor, data, ts_micros) FROM claudemesh.audit_pending
		WHERE data::jsonb->>'message_id' = $1`, env.ID).Scan(&audit)
	if err != pgx.ErrNoRows {
		require.NoError(t, err)
		out.audit = strings.ReplaceAll(audit, env.ID, "E")
		out.audit = strings.ReplaceAll(out.audit, fmt.Sprint(now.UnixMicro()), "T")
	}
	// Whatever the send told the other node.
	for _, n := range noticesSoFar(ctx, t, pool, listener, "t_n_other") {
		out.notified += n.Channel + " " + strings.ReplaceAll(n.Payload, fmt.Sprintf(`"i":%d`, did), `"i":ID`) + "\n"
	}
	return out
}

// noticesSoFar is what listener (LISTENing on channel, among others) was sent by the
// transactions committed so far: notices arrive in commit order, so all of them come before a
// marker sent now.
func noticesSoFar(ctx context.Context, t *testing.T, pool *pgxpool.Pool, listener *pgx.Conn, channel string) []*pgconn.Notification {
	t.Helper()
	_, err := pool.Exec(ctx, `SELECT pg_notify($1, 'marker')`, channel)
	require.NoError(t, err)
	wait, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var got []*pgconn.Notification
	for {
		n, err := listener.WaitForNotification(wait)
		require.NoError(t, err)
		if n.Channel == channel && n.Payload == "marker" {
			return got
		}
		got = append(got, n)
	}
}

// A direct send reads its recipient's sessions, not every session of its mesh, whatever the
// statistics say. Until presence is first analyzed (a fresh database, a small table autovacuum
// has not reached) every index on live sessions looks about empty, and the recipient lookup
// walked the mesh's live sessions by presence_live_mesh, which migration 00028 drops: at 1,000
// msgs/s in a mesh of 100 sessions, two thirds of the pages a send read. Alone (the
// single-row statements) and five at once (the set-based one), to a member key and to a
// session key, in a mesh of 2,000 sessions. Both statements plan generically from their first
// call (their functions set plan_cache_mode), so this is the plan every connection keeps.
func TestDirectSendReadsOnlyItsRecipientsSessions(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	_, err := pool.Exec(ctx, `ALTER TABLE claudemesh.presence SET (autovacuum_enabled = off)`) // no statistics
	require.NoError(t, err)
	memberKey := func(i int) string { return fmt.Sprintf("%064x", i) }
	sessionKey := func(i int) string { return fmt.Sprintf("%064x", 100000+i) }
	var mesh, sender string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', $1) RETURNING id`, memberKey(0)).Scan(&mesh))
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) SELECT $1, lpad(to_hex(i), 64, '0') FROM generate_series(1, 2000) AS i`, mesh)
	require.NoError(t, err)
	// Every member has a live session elsewhere, known by its session key too.
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.session_key (mesh_id, session_pubkey, member_id)
		SELECT $1, lpad(to_hex(100000 + i), 64, '0'), m.id FROM generate_series(1, 2000) AS i
		JOIN claudemesh.member m ON m.mesh_id = $1 AND m.pubkey = lpad(to_hex(i), 64, '0')`, mesh)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, session_pubkey)
		SELECT m.mesh_id, m.id, m.pubkey, 'other', 's-' || s.session_pubkey, s.session_pubkey
		FROM claudemesh.member m JOIN claudemesh.session_key s ON s.member_id = m.id WHERE m.mesh_id = $1`, mesh)
	require.NoError(t, err)
	require.NoError(t, pool.QueryRow(ctx, `SELECT id FROM claudemesh.member WHERE pubkey = $1`, memberKey(1)).Scan(&sender))

	next := 2
	for _, size := range []int{1, 5} {
		for _, bySession := range []bool{false, true} {
			t.Run(fmt.Sprintf("batch=%d/sessionKey=%v", size, bySession), func(t *testing.T) {
				tx, err := pool.Begin(ctx)
				require.NoError(t, err)
				defer func() { _ = tx.Rollback(ctx) }()
				batch := make([]store.OutgoingEnvelope, size)
				for i := range batch {
					target := memberKey(next)
					if bySession {
						target = sessionKey(next)
					}
					next++
					batch[i] = directEnvelope(mesh, sender, memberKey(1), target, "now", []byte(`{"type":"push"}`))
				}
				before := presencePagesRead(ctx, t, tx)
				rows, err := db.New(tx).SendBatch(ctx, store.SendBatchParams(st, "here", batch))
				require.NoError(t, err)
				read := presencePagesRead(ctx, t, tx) - before
				stored := 0
				for _, r := range rows {
					if r.RowKind == "e" {
						require.True(t, r.Queued, "envelope %d stored", r.Idx)
						require.EqualValues(t, 1, r.Recipients, "envelope %d", r.Idx)
						stored++
					}
				}
				require.Equal(t, size, stored)
				var pushed int
				require.NoError(t, tx.QueryRow(ctx, `SELECT count(*) FROM claudemesh.delivery
						WHERE envelope_id = ANY ($1) AND pushed_node = 'other'`, envelopeIDs(batch)).Scan(&pushed))
				require.Equal(t, size, pushed, "each taken by its recipient's session")
				t.Logf("%d pages of presence for %d envelopes", read, size)
				// A probe of one member's sessions is 3-5 pages; the walk of the mesh's 2,000 live
				// sessions, before 00028, was 115-117.
				require.Less(t, read, int64(12*size), "pages of presence and its indexes read")
			})
		}
	}
}

func envelopeIDs(batch []store.OutgoingEnvelope) []string {
	ids := make([]string, len(batch))
	for i, e := range batch {
		ids[i] = e.ID
	}
	return ids
}

// A broadcast or group send reads its own mesh's sessions, not the cluster's. Migration 00030:
// the set-based statement joined multicast envelopes to presence with a hash join (its nested
// loops are off), reading every live session of the cluster: 5,128 pages of presence for a
// broadcast to a mesh of 10 while other meshes had 5,000 sessions.
func TestMulticastReadsOnlyItsMesh(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	key := func(i int) string { return fmt.Sprintf("%064x", i) }
	// The large meshes sort before and after the small one: a merge join on mesh reads one of
	// them whole, a hash join both.
	small, before, after := "m-small", "a-large", "z-large"
	for _, c := range []struct {
		mesh     string
		from, to int
	}{{small, 1, 10}, {before, 11, 2510}, {after, 2511, 5010}} {
		_, err := pool.Exec(ctx, `INSERT INTO claudemesh.mesh (id, slug, name, owner_pubkey) VALUES ($1, $1, $1, $2)`, c.mesh, key(0))
		require.NoError(t, err)
		_, err = pool.Exec(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) SELECT $1, lpad(to_hex(i), 64, '0') FROM generate_series($2::int, $3::int) AS i`, c.mesh, c.from, c.to)
		require.NoError(t, err)
		// Every third session of every mesh is in the group "ops".
		_, err = pool.Exec(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, groups)
			SELECT mesh_id, id, pubkey, 'other', 's-' || pubkey,
			       CASE WHEN ('x' || right(pubkey, 8))::bit(32)::int % 3 = 0 THEN '[{"name":"ops"}]'::jsonb ELSE '[]'::jsonb END
			FROM claudemesh.member WHERE mesh_id = $1`, c.mesh)
		require.NoError(t, err)
	}
	_, err := pool.Exec(ctx, `ANALYZE claudemesh.presence`)
	require.NoError(t, err)
	var sender string
	require.NoError(t, pool.QueryRow(ctx, `SELECT id FROM claudemesh.member WHERE pubkey = $1`, key(1)).Scan(&sender))

	frame := []byte(`{"type":"push"}`)
	all := directEnvelope(small, sender, key(1), "*", "now", frame)
	all.Kind, all.Key, all.TargetSpec = store.SendAll, "", "*"
	group := directEnvelope(small, sender, key(1), "@ops", "now", frame)
	group.Kind, group.Key, group.TargetSpec = store.SendGroup, "ops", "@ops"
	// Twice on one connection: the second runs the plan the first left.
	conn, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	for round := range 2 {
		tx, err := conn.Begin(ctx)
		require.NoError(t, err)
		func() {
			defer func() { _ = tx.Rollback(ctx) }()
			before := presencePagesRead(ctx, t, tx)
			rows, err := db.New(tx).SendBatch(ctx, store.SendBatchParams(st, "here", []store.OutgoingEnvelope{all, group}))
			require.NoError(t, err)
			read := presencePagesRead(ctx, t, tx) - before
			recipients := map[int32]int32{}
			for _, r := range rows {
				if r.RowKind == "e" {
					recipients[r.Idx] = r.Recipients
				}
			}
			// Sessions 2-10 of the small mesh; of those, 3, 6 and 9 are in "ops".
			require.Equal(t, map[int32]int32{1: 9, 2: 3}, recipients)
			t.Logf("round %d: %d pages of presence", round, read)
			require.Less(t, read, int64(100), "pages of presence and its indexes read")
		}()
		all.ID, group.ID = uuid.NewString(), uuid.NewString()
	}
}

// presencePagesRead is how many pages of presence and its indexes tx has read so far.
func presencePagesRead(ctx context.Context, t *testing.T, tx pgx.Tx) int64 {
	t.Helper()
	var n int64
	require.NoError(t, tx.QueryRow(ctx, `SELECT sum(pg_stat_get_xact_blocks_fetched(c.oid))::bigint
		FROM pg_class c WHERE c.oid = 'claudemesh.presence'::regclass
		   OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'claudemesh.presence'::regclass)`).Scan(&n))
	return n
}

// A claim takes held priorities only when the session is idle both in its replica's copy and
// in the database (migration 00036). The replica read its copy before the statement ran: a
// "next" message held for a session at work is not taken by a claim whose replica still thinks
// the session idle; nor by one whose replica has not yet heard that it became idle (the
// change's own release goes first); it is taken when both say idle. And only for the
// registration the socket owns (00041).
func TestClaimGoesByTheStatusInTheDatabase(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	m := newClaimMesh(t, pool)
	b := m.recipient('b', "working")
	presence, epoch := b.PresenceID, b.Epoch

	env := m.envelope('b', "next")
	sent, _, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{env})
	require.NoError(t, err)
	require.True(t, sent[0].Queued, "held: bob is working")

	claim := func(replicaSaysIdle bool) []store.Claimed {
		t.Helper()
		c := b
		c.Epoch, c.IncludeHeld, c.Limit = epoch, replicaSaysIdle, 10
		rows, _, err := st.Claim(ctx, "here", []store.ClaimFor{c})
		require.NoError(t, err)
		return rows
	}
	require.Equal(t, 0, len(claim(true)), "held while bob works, though his replica has not heard of it")
	_, err = pool.Exec(ctx, `UPDATE claudemesh.presence SET status = 'idle' WHERE id = $1`, presence)
	require.NoError(t, err)
	require.Equal(t, 0, len(claim(false)), "not before his replica has heard he is idle")
	rows := claim(true)
	require.Len(t, rows, 1, "taken once bob is idle")
	require.Equal(t, env.ID, rows[0].Push.EnvelopeID)

	// A socket whose registration was taken over (migration 00041) takes nothing, on this node
	// (the epoch moved on) or another (the presence moved).
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL
		WHERE envelope_id = $1`, env.ID)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `UPDATE claudemesh.presence SET epoch = epoch + 1 WHERE id = $1`, presence)
	require.NoError(t, err)
	require.Empty(t, claim(true), "replaced on this node")
	epoch++
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('there', now())`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `UPDATE claudemesh.presence SET node_id = 'there' WHERE id = $1`, presence)
	require.NoError(t, err)
	require.Empty(t, claim(true), "taken over elsewhere")
	_, err = pool.Exec(ctx, `UPDATE claudemesh.presence SET node_id = 'here' WHERE id = $1`, presence)
	require.NoError(t, err)
	require.Len(t, claim(true), 1, "its own registration takes it")
}

// A multicast wakes every replica only for its rows that no session took because their session
// is in its grace (migration 00040): for that one session ("p"), which a hello may be resuming
// on any replica. A row held for a session at work waits for its change of status, which
// releases it, and wakes no one.
func TestMulticastWakesEveryReplicaForASessionInItsGrace(t *testing.T) {
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	st := store.New(pool, "t")
	key := func(c byte) string { return strings.Repeat(string(c), 64) }
	var mesh string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', $1) RETURNING id`, key('0')).Scan(&mesh))
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now()), ('other', now())`)
	require.NoError(t, err)
	// a sends; b's session is in its grace, c's at work, d's idle.
	members, presences := map[byte]string{}, map[byte]string{}
	for _, m := range []struct {
		c            byte
		status       string
		grace, alive bool
	}{{'a', "idle", false, false}, {'b', "idle", true, true}, {'c', "working", false, true}, {'d', "idle", false, true}} {
		var id string
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`, mesh, key(m.c)).Scan(&id))
		members[m.c] = id
		if !m.alive {
			continue
		}
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status, grace_until)
			VALUES ($1, $2, $3, 'other', $4, $5, CASE WHEN $6 THEN now() + interval '1 minute' END) RETURNING id`,
			mesh, id, key(m.c), "s-"+string(m.c), m.status, m.grace).Scan(&id))
		presences[m.c] = id
	}
	listener := dbtest.ConnFor(t, url)
	for _, ch := range []string{"t_n_other", "t_all"} {
		_, err = listener.Exec(ctx, `LISTEN `+ch)
		require.NoError(t, err)
	}
	env := directEnvelope(mesh, members['a'], key('a'), "", "next", []byte(`{"type":"push"}`))
	env.Kind, env.Key, env.TargetSpec = store.SendAll, "", "*"
	sent, _, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{env})
	require.NoError(t, err)
	require.Equal(t, []store.SentEnvelope{{Queued: true, Recipients: 3}}, sent, "a row for each session but the sender's")
	_, err = pool.Exec(ctx, `SELECT pg_notify('t_all', 'marker')`)
	require.NoError(t, err)
	var lines []string
	for {
		n, err := listener.WaitForNotification(ctx)
		require.NoError(t, err)
		if n.Payload == "marker" {
			break
		}
		for line := range strings.SplitSeq(n.Payload, "\n") {
			if n.Channel == "t_n_other" && strings.HasPrefix(line, `{"k":"w"`) {
				line = line[:strings.Index(line, `,"i":`)] // the idle session's push: to its presence
			}
			lines = append(lines, n.Channel+" "+line)
		}
	}
	require.ElementsMatch(t, []string{
		fmt.Sprintf(`t_n_other {"k":"w","p":"%s"`, presences['d']),
		fmt.Sprintf(`t_all {"k":"d","m":"%s","p":"%s","y":"next"}`, members['b'], presences['b']),
		// The session at work: its replica claims for it if its change to idle raced this send.
		fmt.Sprintf(`t_n_other {"k":"d","m":"%s","p":"%s","y":"next"}`, members['c'], presences['c']),
	}, lines)
}

// A claim takes a session's assigned deliveries only when asked: the ones its replica lists to
// take again (a retake, matched by session and id), all of them (take_assigned), or none while
// they are recent (their notifications may have pushed them already). In id order, at most the
// limit.
func TestClaimTakesAssignedOnlyWhenAsked(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	m := newClaimMesh(t, pool)
	b := m.recipient('b', "idle")
	var envs []store.OutgoingEnvelope
	for range 4 {
		envs = append(envs, m.envelope('b', "now"))
	}
	_, local, err := st.SendBatch(ctx, "here", envs)
	require.NoError(t, err)
	require.Len(t, local, 4)
	ids := make([]int64, 4)
	for i, l := range local {
		require.True(t, l.Assigned, "assigned to bob's session")
		ids[i] = l.ID
	}
	claim := func(c store.ClaimFor) []int64 {
		t.Helper()
		c.PresenceID, c.Epoch, c.MemberID, c.SessionID, c.Limit = b.PresenceID, b.Epoch, b.MemberID, b.SessionID, 2
		rows, _, err := st.Claim(ctx, "here", []store.ClaimFor{c})
		require.NoError(t, err)
		var got []int64
		for _, r := range rows {
			require.True(t, r.FromAssigned)
			got = append(got, r.ID)
		}
		slices.Sort(got)
		return got
	}
	require.Empty(t, claim(store.ClaimFor{}), "recent ones may have been pushed from their notifications")
	require.Equal(t, []int64{ids[2]}, claim(store.ClaimFor{Retake: []int64{ids[2]}}), "the listed one")
	require.Equal(t, []int64{ids[0], ids[1]}, claim(store.ClaimFor{TakeAssigned: true}), "all, the oldest first, at most the limit")
	require.Equal(t, []int64{ids[3]}, claim(store.ClaimFor{TakeAssigned: true}))
}

// A claim reads about as many deliveries as it takes, however many wait: a session behind a
// burst (hundreds pending for its member, or assigned to it) is claimed for a window at a
// time, and each claim walked and sorted the whole backlog (migration 00043). Counted in index
// tuples read, so it holds on any machine.
func TestClaimReadsAWindowNotTheBacklog(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := oneConnection(t)
	st := store.New(pool, "t")
	m := newClaimMesh(t, pool)
	recipient := func(k byte, status string) store.ClaimFor {
		c := m.recipient(k, status)
		c.IncludeHeld, c.Limit = true, 16
		return c
	}
	const backlog = 600
	send := func(k byte, prio string) {
		t.Helper()
		envs := make([]store.OutgoingEnvelope, backlog)
		for i := range envs {
			envs[i] = m.envelope(k, prio)
		}
		_, _, err := st.SendBatch(ctx, "here", envs)
		require.NoError(t, err)
	}
	claim := func(c store.ClaimFor) (taken int, tuples int64) {
		t.Helper()
		before := deliveryTuplesRead(t, pool)
		rows, _, err := st.Claim(ctx, "here", []store.ClaimFor{c})
		require.NoError(t, err)
		return len(rows), deliveryTuplesRead(t, pool) - before
	}

	bob := recipient('b', "working")
	send('b', "next") // held while bob works: pending for him
	_, err := pool.Exec(ctx, `UPDATE claudemesh.presence SET status = 'idle' WHERE id = $1`, bob.PresenceID)
	require.NoError(t, err)
	taken, tuples := claim(bob)
	require.Equal(t, 16, taken)
	require.Less(t, tuples, int64(100), "pending for the member: a window's worth read, not %d", backlog)

	carol := recipient('c', "idle")
	send('c', "now") // assigned to her session
	carol.TakeAssigned = true
	taken, tuples = claim(carol)
	require.Equal(t, 16, taken)
	require.Less(t, tuples, int64(100), "assigned to the session: a window's worth read, not %d", backlog)

	// At work behind a held backlog, with a "now" message assigned and on its way: whether a
	// pending message would overtake it is asked of what came after it, not of the backlog.
	dave := recipient('d', "working")
	send('d', "next")
	envs := []store.OutgoingEnvelope{m.envelope('d', "now")}
	_, _, err = st.SendBatch(ctx, "here", envs)
	require.NoError(t, err)
	taken, tuples = claim(dave)
	require.Equal(t, 0, taken, "the held ones wait, the assigned one is on its way")
	require.Less(t, tuples, int64(100), "behind a held backlog: a window's worth read, not %d", backlog)

	// The catch-up poll asks the same of every session of the replica, every few seconds.
	before := deliveryTuplesRead(t, pool)
	sessions, _, err := st.SessionsWithClaimable(ctx, "here")
	require.NoError(t, err)
	require.NotContains(t, sessions, dave.PresenceID, "nothing dave may take while he works")
	require.Contains(t, sessions, bob.PresenceID, "bob, idle, has the rest of his backlog to take")
	require.Less(t, deliveryTuplesRead(t, pool)-before, int64(100), "the poll walked a held backlog")
}

// oneConnection is a pool of one connection on a fresh database: the statistics a statement
// leaves are its backend's, flushed when that backend is told (deliveryTuplesRead).
func oneConnection(t *testing.T) *pgxpool.Pool {
	t.Helper()
	pool, err := db.NewPool(dbtest.Context(t), dbtest.URL(t), db.PoolConfig{MaxConns: 1, AppName: "claudemesh-test"})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

// deliveryTuplesRead is how many index entries of claudemesh.delivery the database has read so
// far, up to date with everything pool's one connection ran.
func deliveryTuplesRead(t *testing.T, pool *pgxpool.Pool) int64 {
	t.Helper()
	return tuplesRead(t, pool, "delivery")
}

// tuplesRead is how many index entries of the table the database has read so far, up to date
// with everything pool's one connection ran.
func tuplesRead(t *testing.T, pool *pgxpool.Pool, table string) (n int64) {
	t.Helper()
	ctx := dbtest.Context(t)
	_, err := pool.Exec(ctx, `SELECT pg_stat_force_next_flush()`) // flushed as this statement ends
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `SELECT pg_stat_clear_snapshot()`)
	require.NoError(t, err)
	require.NoError(t, pool.QueryRow(ctx, `SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes
		WHERE schemaname = 'claudemesh' AND relname = $1`, table).Scan(&n))
	return n
}

// A claim finds each session it claims for by its key, whatever else the replica holds
// (migration 00044): it read every live session of the node, 3,000 here, for a claim of one.
func TestClaimReadsOnlyItsSessions(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := oneConnection(t)
	st := store.New(pool, "t")
	var mesh string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', repeat('0', 64)) RETURNING id`).Scan(&mesh))
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now())`)
	require.NoError(t, err)
	const live = 3000
	_, err = pool.Exec(ctx, `WITH m AS (
			INSERT INTO claudemesh.member (mesh_id, pubkey) SELECT $1, lpad(to_hex(i), 64, '0') FROM generate_series(1, $2) AS i
			RETURNING id, pubkey)
		INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status)
		SELECT $1, m.id, m.pubkey, 'here', 's-' || m.pubkey, 'idle' FROM m`, mesh, live)
	require.NoError(t, err)
	rows, err := pool.Query(ctx, `SELECT id, epoch, member_id, session_id FROM claudemesh.presence LIMIT 64`)
	require.NoError(t, err)
	var sessions []store.ClaimFor
	for rows.Next() {
		c := store.ClaimFor{IncludeHeld: true, Limit: 16}
		require.NoError(t, rows.Scan(&c.PresenceID, &c.Epoch, &c.MemberID, &c.SessionID))
		sessions = append(sessions, c)
	}
	require.NoError(t, rows.Err())
	for _, n := range []int{1, 64} {
		before := tuplesRead(t, pool, "presence")
		_, _, err := st.Claim(ctx, "here", sessions[:n])
		require.NoError(t, err)
		require.LessOrEqual(t, tuplesRead(t, pool, "presence")-before, int64(2*n), "a claim for %d of the node's %d sessions", n, live)
	}
}

// An ack of a broadcast reads its own delivery, not every recipient's (migration 00042): the
// record probed the envelope's entries one by one, 200 here, for each ack.
func TestBroadcastAckReadsItsOwnDelivery(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := oneConnection(t)
	st := store.New(pool, "t")
	key := func(i int) string { return fmt.Sprintf("%064x", i) }
	var mesh, sender string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', $1) RETURNING id`, key(0)).Scan(&mesh))
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now())`)
	require.NoError(t, err)
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`, mesh, key(1)).Scan(&sender))
	const recipients = 200
	_, err = pool.Exec(ctx, `WITH m AS (
			INSERT INTO claudemesh.member (mesh_id, pubkey) SELECT $1, lpad(to_hex(i), 64, '0') FROM generate_series(2, $2 + 1) AS i
			RETURNING id, pubkey)
		INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status)
		SELECT $1, m.id, m.pubkey, 'here', 's-' || m.pubkey, 'idle' FROM m`, mesh, recipients)
	require.NoError(t, err)
	env := directEnvelope(mesh, sender, key(1), "", "now", []byte(`{}`))
	env.Kind, env.Key, env.TargetSpec = store.SendAll, "", "*"
	_, local, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{env})
	require.NoError(t, err)
	require.Len(t, local, recipients)
	var member, session string
	require.NoError(t, pool.QueryRow(ctx, `SELECT member_id, session_id FROM claudemesh.presence WHERE member_pubkey = $1`, key(7)).Scan(&member, &session))

	before := deliveryTuplesRead(t, pool)
	require.NoError(t, st.MarkDelivered(ctx, []store.Ack{{EnvelopeID: env.ID, MemberID: member, SessionID: session}}, nil, nil))
	read := deliveryTuplesRead(t, pool) - before
	require.Less(t, read, int64(10), "one ack reads its own delivery, not the broadcast's %d", recipients)
	var state string
	require.NoError(t, pool.QueryRow(ctx, `SELECT state FROM claudemesh.delivery WHERE envelope_id = $1 AND recipient_member_id = $2`,
		env.ID, member).Scan(&state))
	require.Equal(t, "acked", state)
}

// claimMesh is a mesh for the claim tests: node "here" and a sender, alice (key 'a'), whose
// envelopes go to recipients made with recipient.
type claimMesh struct {
	t           *testing.T
	pool        *pgxpool.Pool
	mesh, alice string
}

func claimKey(c byte) string { return strings.Repeat(string(c), 64) }

func newClaimMesh(t *testing.T, pool *pgxpool.Pool) *claimMesh {
	t.Helper()
	ctx := dbtest.Context(t)
	m := &claimMesh{t: t, pool: pool}
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', $1) RETURNING id`,
		claimKey('0')).Scan(&m.mesh))
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now())`)
	require.NoError(t, err)
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`,
		m.mesh, claimKey('a')).Scan(&m.alice))
	return m
}

// recipient is a member (key k) with a live session "s-<k>" on "here" in the given status; the
// claim for it, with its identity filled in.
func (m *claimMesh) recipient(k byte, status string) store.ClaimFor {
	m.t.Helper()
	ctx := dbtest.Context(m.t)
	c := store.ClaimFor{SessionID: "s-" + string(k)}
	require.NoError(m.t, m.pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`,
		m.mesh, claimKey(k)).Scan(&c.MemberID))
	require.NoError(m.t, m.pool.QueryRow(ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status)
		VALUES ($1, $2, $3, 'here', $4, $5) RETURNING id, epoch`, m.mesh, c.MemberID, claimKey(k), c.SessionID, status).Scan(&c.PresenceID, &c.Epoch))
	return c
}

// envelope is a direct envelope from alice to recipient k.
func (m *claimMesh) envelope(k byte, prio string) store.OutgoingEnvelope {
	return directEnvelope(m.mesh, m.alice, claimKey('a'), claimKey(k), prio, []byte(`{}`))
}

// A hello batch taking over two sessions of a claim, in the other order than the claim locks
// them, deadlocked with it until Postgres's deadlock check a second later. The claim now skips
// a session whose row another transaction holds (00045), takes what the others have, and says
// which it skipped; claimed again once the takeover committed, the skipped one gives nothing.
func TestClaimSkipsASessionATakeoverHolds(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	m := newClaimMesh(t, pool)
	b, c := m.recipient('b', "idle"), m.recipient('c', "idle")
	_, _, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{m.envelope('b', "now"), m.envelope('c', "now")})
	require.NoError(t, err)
	// Left pending, as a send leaves what no session could take.
	_, err = pool.Exec(ctx, `UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL, pushed_at = NULL`)
	require.NoError(t, err)
	b.Limit, c.Limit = 8, 8

	takeover, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = takeover.Rollback(context.Background()) }()
	moveTo := func(p store.ClaimFor) error {
		_, err := takeover.Exec(ctx, `UPDATE claudemesh.presence SET node_id = 'there', epoch = epoch + 1 WHERE id = $1`, p.PresenceID)
		return err
	}
	require.NoError(t, moveTo(c))
	rows, skipped, err := st.Claim(ctx, "here", []store.ClaimFor{b, c})
	require.NoError(t, err, "no wait for c's row")
	require.Equal(t, []string{c.PresenceID}, skipped)
	require.Len(t, rows, 1)
	require.Equal(t, b.PresenceID, rows[0].PresenceID, "b's delivery, taken")
	require.NoError(t, moveTo(b), "the takeover takes b: the claim held no lock past its commit")
	require.NoError(t, takeover.Commit(ctx))

	rows, skipped, err = st.Claim(ctx, "here", []store.ClaimFor{c})
	require.NoError(t, err)
	require.Empty(t, rows, "c is now another node's")
	require.Empty(t, skipped, "and not skipped: gone from here")
}
