package audit_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db/dbtest"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

// newMesh inserts a bare mesh row (the audit tables reference it) and returns its id.
func newMesh(t *testing.T, pool *pgxpool.Pool, slug string) string {
	t.Helper()
	var id string
	err := pool.QueryRow(context.Background(),
		`INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ($1, $1, $2) RETURNING id`,
		slug, fmt.Sprintf("%064x", 1)).Scan(&id)
	require.NoError(t, err)
	return id
}

// appendTx appends entries in a transaction of its own.
func appendTx(ctx context.Context, pool *pgxpool.Pool, entries ...audit.Entry) error {
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return audit.Append(ctx, tx, entries) })
}

func requireBroken(t *testing.T, err error, seq int64) *audit.BrokenError {
	t.Helper()
	var be *audit.BrokenError
	require.ErrorAs(t, err, &be)
	require.Equal(t, seq, be.Seq, "reason: %s", be.Reason)
	return be
}

func TestAppendVerifyTail(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	a, b := newMesh(t, pool, "a"), newMesh(t, pool, "b")

	n, err := audit.Verify(ctx, pool, a)
	require.NoError(t, err)
	require.Zero(t, n, "a mesh without entries verifies empty")

	at := time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.UTC)
	// Entries of two meshes interleaved in one batch; numbers in spellings jsonb rewrites.
	require.NoError(t, appendTx(ctx, pool,
		audit.Entry{MeshID: b, Type: audit.MemberAdded, Actor: audit.ActorOperator, Data: map[string]any{"z": 1, "a": "x"}},
		audit.Entry{MeshID: a, Type: audit.MeshCreated, Actor: "owner", At: at, Data: map[string]any{"slug": "a", "n": 1e3, "f": 1.5, "big": uint64(1) << 63}},
		audit.Entry{MeshID: b, Type: audit.InviteCreated, Actor: audit.ActorOperator, Data: map[string]any{"nested": map[string]any{"y": []any{2, "<&>"}, "x": nil}}},
		audit.Entry{MeshID: a, Type: audit.MemberJoined, Actor: "peer"},
	))
	require.NoError(t, appendTx(ctx, pool, audit.Entry{MeshID: a, Type: audit.MemberRevoked, Actor: audit.ActorOperator}))

	n, err = audit.Verify(ctx, pool, a)
	require.NoError(t, err)
	require.Equal(t, 3, n)
	n, err = audit.Verify(ctx, pool, b)
	require.NoError(t, err)
	require.Equal(t, 2, n)

	tail, err := audit.Tail(ctx, pool, a, 2)
	require.NoError(t, err)
	require.Len(t, tail, 2)
	require.Equal(t, int64(2), tail[0].Seq)
	require.Equal(t, audit.MemberJoined, tail[0].Type)
	require.Equal(t, audit.MemberRevoked, tail[1].Type)
	require.Equal(t, tail[0].Hash, tail[1].PrevHash)

	all, err := audit.Tail(ctx, pool, a, 100)
	require.NoError(t, err)
	require.Len(t, all, 3)
	require.Equal(t, audit.Genesis, all[0].PrevHash)
	require.Equal(t, at.Truncate(time.Microsecond), all[0].At, "the timestamp is kept to the microsecond")

	// Entries of one mesh keep the caller's order within a batch.
	bt, err := audit.Tail(ctx, pool, b, 10)
	require.NoError(t, err)
	require.Equal(t, []string{audit.MemberAdded, audit.InviteCreated}, []string{bt[0].Type, bt[1].Type})
}

func TestAppendRolledBackLeavesNoTrace(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	m := newMesh(t, pool, "m")
	boom := errors.New("caller failed")
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		require.NoError(t, audit.Append(ctx, tx, []audit.Entry{{MeshID: m, Type: audit.MeshCreated}}))
		return boom
	})
	require.ErrorIs(t, err, boom)
	n, err := audit.Verify(ctx, pool, m)
	require.NoError(t, err)
	require.Zero(t, n)
	require.NoError(t, appendTx(ctx, pool, audit.Entry{MeshID: m, Type: audit.MeshCreated}))
	n, err = audit.Verify(ctx, pool, m)
	require.NoError(t, err)
	require.Equal(t, 1, n)
}

func TestAppendRefusesBadEntries(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	m := newMesh(t, pool, "m")
	for _, k := range []string{"ciphertext", "nonce", "summary"} {
		err := appendTx(ctx, pool, audit.Entry{MeshID: m, Type: audit.MessageSent, Data: map[string]any{k: "x"}})
		require.ErrorIs(t, err, audit.ErrContentInData, k)
	}
	require.ErrorIs(t, appendTx(ctx, pool, audit.Entry{Type: audit.MessageSent}), audit.ErrInvalidEntry)
	require.ErrorIs(t, appendTx(ctx, pool, audit.Entry{MeshID: m}), audit.ErrInvalidEntry)
	require.NoError(t, appendTx(ctx, pool), "an empty batch is a no-op")
}

// Simulated replicas: separate pools, many goroutines, batches spanning several meshes in
// varying order. The chains must come out intact and complete.
func TestConcurrentAppendsFromSeparatePools(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	setup := dbtest.PoolFor(t, url)
	meshes := []string{newMesh(t, setup, "m1"), newMesh(t, setup, "m2"), newMesh(t, setup, "m3")}

	const replicas, workers, batches = 4, 4, 15
	var wg sync.WaitGroup
	errs := make(chan error, replicas*workers)
	for r := range replicas {
		pool := dbtest.PoolFor(t, url)
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range batches {
					// Each batch lists the meshes in a different order: Append must sort.
					var entries []audit.Entry
					for j := range meshes {
						m := meshes[(r+w+i+j)%len(meshes)]
						entries = append(entries,
							audit.Entry{MeshID: m, Type: audit.MessageSent, Actor: fmt.Sprintf("r%d-w%d", r, w), Data: map[string]any{"i": i, "k": 0}},
							audit.Entry{MeshID: m, Type: audit.MessageSent, Actor: fmt.Sprintf("r%d-w%d", r, w), Data: map[string]any{"i": i, "k": 1}})
					}
					if err := appendTx(ctx, pool, entries...); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	for _, m := range meshes {
		n, err := audit.Verify(ctx, setup, m)
		require.NoError(t, err)
		require.Equal(t, replicas*workers*batches*2, n)
	}
}

// The acceptance check: 1,000 appends spread over 4 pools verify intact, and editing
// any single row in SQL is then detected.
func TestThousandAppendsOverFourPools(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	setup := dbtest.PoolFor(t, url)
	m := newMesh(t, setup, "m")

	const pools, perPool = 4, 250
	var wg sync.WaitGroup
	errs := make(chan error, pools*2)
	for p := range pools {
		pool := dbtest.PoolFor(t, url)
		// Two goroutines per pool so appends within one replica contend too.
		for g := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range perPool / 2 {
					if err := appendTx(ctx, pool, audit.Entry{MeshID: m, Type: audit.MessageSent, Actor: fmt.Sprintf("p%d", p), Data: map[string]any{"g": g, "i": i}}); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	n, err := audit.Verify(ctx, setup, m)
	require.NoError(t, err)
	require.Equal(t, pools*perPool, n)

	_, err = setup.Exec(ctx, `UPDATE claudemesh.audit SET actor = 'mallory' WHERE mesh_id = $1 AND seq = 617`, m)
	require.NoError(t, err)
	_, err = audit.Verify(ctx, setup, m)
	requireBroken(t, err, 617)
}

// intact: a tamperCase that Verify must not call broken.
const intact = -1

// tamperCases are edits to a chain of five entries (newChainOfFive) and the entry Verify must
// name for each.
var tamperCases = []struct {
	name   string
	tamper []string // statements; $1 is the mesh id
	seq    int64    // the entry Verify must name; intact: none
}{
	{"edited data", []string{`UPDATE claudemesh.audit SET data = '{"role":"admin"}' WHERE mesh_id = $1 AND seq = 3`}, 3},
	{"rewritten with an equal value is not tampering", []string{`UPDATE claudemesh.audit SET data = '{ "role" : "member", "j" : 2.0 }' WHERE mesh_id = $1 AND seq = 3`}, intact},
	{"number edited below float precision", []string{`UPDATE claudemesh.audit SET data = '{"role":"member","j":2.000000000000000001}' WHERE mesh_id = $1 AND seq = 3`}, 3},
	{"edited actor", []string{`UPDATE claudemesh.audit SET actor = 'x' WHERE mesh_id = $1 AND seq = 1`}, 1},
	{"edited type", []string{`UPDATE claudemesh.audit SET event_type = 'member_added' WHERE mesh_id = $1 AND seq = 4`}, 4},
	{"edited timestamp", []string{`UPDATE claudemesh.audit SET ts_micros = ts_micros + 1 WHERE mesh_id = $1 AND seq = 2`}, 2},
	{"edited hash", []string{`UPDATE claudemesh.audit SET hash = repeat('a', 64) WHERE mesh_id = $1 AND seq = 2`}, 2},
	{"deleted row", []string{`DELETE FROM claudemesh.audit WHERE mesh_id = $1 AND seq = 3`}, 3},
	{"deleted first row", []string{`DELETE FROM claudemesh.audit WHERE mesh_id = $1 AND seq = 1`}, 1},
	{"deleted last row", []string{`DELETE FROM claudemesh.audit WHERE mesh_id = $1 AND seq = 5`}, 5},
	{"deleted row and renumbered", []string{
		`DELETE FROM claudemesh.audit WHERE mesh_id = $1 AND seq = 3`,
		`UPDATE claudemesh.audit SET seq = seq - 1 WHERE mesh_id = $1 AND seq > 3`,
		`UPDATE claudemesh.audit_head SET seq = seq - 1 WHERE mesh_id = $1`,
	}, 3},
	{"reordered rows", []string{
		`UPDATE claudemesh.audit SET seq = -2 WHERE mesh_id = $1 AND seq = 2`,
		`UPDATE claudemesh.audit SET seq = 2 WHERE mesh_id = $1 AND seq = 3`,
		`UPDATE claudemesh.audit SET seq = 3 WHERE mesh_id = $1 AND seq = -2`,
	}, 2},
	{"row added behind the chain's back", []string{
		`INSERT INTO claudemesh.audit (mesh_id, seq, event_type, actor, data, ts_micros, prev_hash, hash)
		 SELECT mesh_id, 6, event_type, actor, data, ts_micros, hash, hash FROM claudemesh.audit WHERE mesh_id = $1 AND seq = 5`,
	}, 6},
	{"row added below the chain", []string{
		`INSERT INTO claudemesh.audit (mesh_id, seq, event_type, actor, data, ts_micros, prev_hash, hash)
		 SELECT mesh_id, 0, event_type, actor, data, ts_micros, prev_hash, hash FROM claudemesh.audit WHERE mesh_id = $1 AND seq = 1`,
	}, 0},
	{"head edited", []string{`UPDATE claudemesh.audit_head SET hash = repeat('b', 64) WHERE mesh_id = $1`}, 5},
	{"head deleted", []string{`DELETE FROM claudemesh.audit_head WHERE mesh_id = $1`}, 5},
}

// newChainOfFive appends five entries, one transaction each, to a new mesh, seals them and
// returns the mesh id.
func newChainOfFive(t *testing.T, ctx context.Context, pool *pgxpool.Pool, slug string) string {
	t.Helper()
	m := newMesh(t, pool, slug)
	for j, typ := range []string{audit.MeshCreated, audit.MemberAdded, audit.InviteCreated, audit.MemberJoined, audit.MemberRevoked} {
		require.NoError(t, appendTx(ctx, pool, audit.Entry{MeshID: m, Type: typ, Actor: "op", Data: map[string]any{"j": j, "role": "member"}}))
	}
	_, err := audit.Seal(ctx, pool, true) // on the chain, for the tampering to edit
	require.NoError(t, err)
	return m
}

func TestVerifyDetectsTampering(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)

	for i, tc := range tamperCases {
		t.Run(tc.name, func(t *testing.T) {
			m := newChainOfFive(t, ctx, pool, fmt.Sprintf("m%d", i))
			n, err := audit.Verify(ctx, pool, m)
			require.NoError(t, err)
			require.Equal(t, 5, n)
			for _, stmt := range tc.tamper {
				_, err := pool.Exec(ctx, stmt, m)
				require.NoError(t, err)
			}
			_, err = audit.Verify(ctx, pool, m)
			if tc.seq == intact {
				require.NoError(t, err)
				return
			}
			be := requireBroken(t, err, tc.seq)
			require.Equal(t, m, be.MeshID)
			require.NotEmpty(t, be.Reason)
			t.Logf("%s: %v", tc.name, be)
		})
	}
}

// A chain longer than one verification page streams across pages.
func TestVerifyAcrossPages(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	m := newMesh(t, pool, "m")
	entries := make([]audit.Entry, 2500)
	for i := range entries {
		entries[i] = audit.Entry{MeshID: m, Type: audit.MessageSent, Data: map[string]any{"i": i}}
	}
	require.NoError(t, appendTx(ctx, pool, entries...))
	n, err := audit.Verify(ctx, pool, m)
	require.NoError(t, err)
	require.Equal(t, 2500, n)
	_, err = pool.Exec(ctx, `DELETE FROM claudemesh.audit WHERE mesh_id = $1 AND seq = 2001`, m)
	require.NoError(t, err)
	_, err = audit.Verify(ctx, pool, m)
	requireBroken(t, err, 2001)
}

func TestCanonicalJSON(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		`{"b":1,"a":{"d":[1,2],"c":null}}`: `{"a":{"c":null,"d":[1,2]},"b":1}`,
		` { "a" : 1e3 } `:                  `{"a":1000}`,
		`{"a":1000.0}`:                     `{"a":1000}`,
		`{"a":1.50}`:                       `{"a":1.5}`,
		`{"a":0.0000001}`:                  `{"a":1e-7}`,
		`{"a":1.5e30}`:                     `{"a":1500000000000000000000000000000}`,
		`{"a":9223372036854775809}`:        `{"a":9223372036854775809}`,
		`{"a":"<&>"}`:                      `{"a":"<&>"}`,
		`{"a":"\u00e9"}`:                   `{"a":"é"}`,
		`[]`:                               `[]`,
	} {
		got, err := audit.CanonicalJSON([]byte(in))
		require.NoError(t, err, in)
		require.Equal(t, want, string(got), in)
	}
	// A non-integer beyond float64's precision has no canonical form: rounded, it would hash
	// like another number.
	for _, bad := range []string{``, `{`, `{"a":1}x`, `{"a":1e99999}`, `{"a":2.000000000000000001}`, `{"a":0.10000000000000000001}`} {
		_, err := audit.CanonicalJSON([]byte(bad))
		require.Error(t, err, bad)
	}
}

func TestHashCoversEveryField(t *testing.T) {
	t.Parallel()
	base := audit.Hash(audit.Genesis, "m", "t", "a", []byte(`{}`), 1)
	require.Len(t, base, 64)
	for _, h := range []string{
		audit.Hash("1"+audit.Genesis[1:], "m", "t", "a", []byte(`{}`), 1),
		audit.Hash(audit.Genesis, "m2", "t", "a", []byte(`{}`), 1),
		audit.Hash(audit.Genesis, "m", "t2", "a", []byte(`{}`), 1),
		audit.Hash(audit.Genesis, "m", "t", "a2", []byte(`{}`), 1),
		audit.Hash(audit.Genesis, "m", "t", "a", []byte(`{"x":1}`), 1),
		audit.Hash(audit.Genesis, "m", "t", "a", []byte(`{}`), 2),
		// Moving bytes between fields changes the hash (fields are length-prefixed).
		audit.Hash(audit.Genesis, "mt", "", "a", []byte(`{}`), 1),
	} {
		require.NotEqual(t, base, h)
	}
}

// Entries are chained by whoever seals first: a reader that may write seals before it reads; a
// read-only reader (a standby, a read-only role) still verifies, from what was sealed; a bad
// entry fails its own writer, never the sealing of everyone else's.
func TestSealingAndReadOnlyReaders(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	m := newMesh(t, pool, "sealed")

	require.NoError(t, appendTx(ctx, pool, audit.Entry{MeshID: m, Type: audit.MemberAdded, Actor: audit.ActorOperator}))
	var pending int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.audit_pending WHERE mesh_id = $1`, m).Scan(&pending))
	require.Equal(t, 1, pending, "an append records the entry; nothing is chained yet")

	cfg := pool.Config().Copy()
	cfg.ConnConfig.RuntimeParams["default_transaction_read_only"] = "on"
	ro, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	defer ro.Close()
	n, err := audit.Verify(ctx, ro, m)
	require.NoError(t, err, "a read-only reader verifies what is sealed")
	require.Zero(t, n, "and cannot seal")

	n, err = audit.Verify(ctx, pool, m)
	require.NoError(t, err)
	require.Equal(t, 1, n, "a reader that may write seals first")

	// Rows only the writer's own mistakes could produce are refused at the append.
	err = audit.AppendVia(ctx, pool, []audit.Entry{{MeshID: m, Type: audit.MemberAdded, Actor: "x"},
		{MeshID: "no-such-mesh", Type: audit.MemberAdded, Actor: "x"}})
	require.Error(t, err, "an entry for a mesh that does not exist fails its writer")
	// One written past the append (meshes are never deleted, so only a bug could) has no chain
	// to go on: it stays pending, in sight of the gauges, and holds up no one's.
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.audit_pending (mesh_id, event_type, actor, data, ts_micros)
		VALUES ('no-such-mesh', 'member_added', 'x', '{}', 1)`)
	require.NoError(t, err)
	defer func() {
		var stuck int
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.audit_pending WHERE mesh_id = 'no-such-mesh'`).Scan(&stuck))
		require.Equal(t, 1, stuck, "the entry naming no mesh is still pending")
	}()
	// Data the chain could not store is refused at the append.
	_, err = pool.Exec(ctx, `INSERT INTO claudemesh.audit_pending (mesh_id, event_type, actor, data, ts_micros)
		VALUES ($1, 'member_added', 'x', '{"bad": "\u0000"}', 1)`, m)
	require.Error(t, err, "data the chain could not store fails its writer")

	require.NoError(t, appendTx(ctx, pool, audit.Entry{MeshID: m, Type: audit.MemberRevoked, Actor: audit.ActorOperator}))
	n, err = audit.Verify(ctx, ro, m)
	require.NoError(t, err)
	require.Equal(t, 1, n, "the read-only reader sees the chain as last sealed")
	sealed, err := audit.Seal(ctx, pool, false)
	require.NoError(t, err)
	require.GreaterOrEqual(t, sealed, 1)
	n, err = audit.Verify(ctx, ro, m)
	require.NoError(t, err)
	require.Equal(t, 2, n)
}

// Writers on four pools append while sealers on the same pools race each other (the replicas'
// periodic seal): every committed entry lands on the chain exactly once, each writer's entries
// in the order it committed them, a rolled-back writer's entries never, and a backlog larger
// than one seal statement takes is drained by the reader's seal.
func TestConcurrentSealersAndWriters(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	setup := dbtest.PoolFor(t, url)
	m := newMesh(t, setup, "busy")

	// A backlog bigger than one seal statement's 5,000, appended before anyone seals.
	const backlog = 6000
	big := make([]audit.Entry, backlog)
	for i := range big {
		big[i] = audit.Entry{MeshID: m, Type: audit.MessageSent, Actor: "backlog", Data: map[string]any{"i": i}}
	}
	require.NoError(t, appendTx(ctx, setup, big...))

	const writers, perWriter = 4, 150
	var writing, sealing sync.WaitGroup
	errs := make(chan error, writers*3)
	stop := make(chan struct{})
	for w := range writers {
		pool := dbtest.PoolFor(t, url)
		writing.Add(1)
		go func() {
			defer writing.Done()
			for i := range perWriter {
				if err := appendTx(ctx, pool, audit.Entry{MeshID: m, Type: audit.MessageSent, Actor: fmt.Sprintf("w%d", w), Data: map[string]any{"i": i}}); err != nil {
					errs <- err
					return
				}
			}
			// Entries of a transaction that rolls back are never chained.
			err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
				if err := audit.Append(ctx, tx, []audit.Entry{{MeshID: m, Type: audit.MessageSent, Actor: "rolled-back"}}); err != nil {
					return err
				}
				return errors.New("roll back")
			})
			if err == nil {
				errs <- errors.New("the transaction committed")
			}
		}()
		sealing.Add(1)
		go func() {
			defer sealing.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := audit.Seal(ctx, pool, false); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	writing.Wait()
	close(stop)
	sealing.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}

	n, err := audit.Verify(ctx, setup, m)
	require.NoError(t, err)
	require.Equal(t, backlog+writers*perWriter, n, "every committed entry chained once")
	rows, err := setup.Query(ctx, `SELECT actor, (data->>'i')::int FROM claudemesh.audit WHERE mesh_id = $1 ORDER BY seq`, m)
	require.NoError(t, err)
	next := map[string]int{}
	for rows.Next() {
		var actor string
		var i int
		require.NoError(t, rows.Scan(&actor, &i))
		require.NotEqual(t, "rolled-back", actor)
		require.Equal(t, next[actor], i, "%s's entries in the order it committed them", actor)
		next[actor]++
	}
	require.NoError(t, rows.Err())
	var pending int
	require.NoError(t, setup.QueryRow(ctx, `SELECT count(*) FROM claudemesh.audit_pending`).Scan(&pending))
	require.Zero(t, pending)
}
