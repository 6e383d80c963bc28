package audit_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
)

// A verify of a long chain runs for hours; it must not hold one snapshot all that time, which
// keeps VACUUM from removing the rows other tables churn (deliveries). Between two pages, rows
// deleted after the walk began are reclaimed, and the verifying connection holds no snapshot.
func TestVerifyHoldsNoSnapshotBetweenPages(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	m := newChainOfFive(t, ctx, pool, "long")
	// Autovacuum off, so that its analyze never holds a snapshot of its own while we vacuum.
	_, err := pool.Exec(ctx, `CREATE TABLE churn (id int) WITH (autovacuum_enabled = false)`)
	require.NoError(t, err)

	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(context.WithoutCancel(ctx))

	for _, tc := range []struct {
		name string
		q    db.DBTX
		pid  uint32 // the verifying backend, when known
	}{
		{"pool", pool, 0},
		{"connection", conn, conn.PgConn().PID()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := pool.Exec(ctx, `INSERT INTO churn SELECT generate_series(1, 100)`)
			require.NoError(t, err)
			pages := 0
			n, err := audit.VerifyPaged(ctx, tc.q, m, 2, func(int64) {
				pages++
				if tc.pid != 0 {
					var state string
					var holdsSnapshot bool
					require.NoError(t, pool.QueryRow(ctx, `SELECT state, backend_xmin IS NOT NULL FROM pg_stat_activity WHERE pid = $1`, tc.pid).Scan(&state, &holdsSnapshot))
					require.Equal(t, "idle", state, "between pages the verifying connection is in no transaction")
					require.False(t, holdsSnapshot)
				}
				if pages != 1 {
					return
				}
				_, err := pool.Exec(ctx, `DELETE FROM churn`)
				require.NoError(t, err)
				_, err = pool.Exec(ctx, `VACUUM churn`)
				require.NoError(t, err)
				var size int64
				require.NoError(t, pool.QueryRow(ctx, `SELECT pg_relation_size('churn')`).Scan(&size))
				require.Zero(t, size, "rows deleted while the chain is verified are removed (and the emptied table truncated)")
			})
			require.NoError(t, err)
			require.Equal(t, 5, n)
			require.Equal(t, 3, pages, "five entries in pages of two")
		})
	}
}

// Every kind of tampering is found wherever the pages end: each page is checked against the seq
// and hash carried from the one before.
func TestVerifyDetectsTamperingAcrossPages(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)

	for _, size := range []int32{1, 2, 3, 4} {
		for i, tc := range tamperCases {
			t.Run(fmt.Sprintf("pages of %d/%s", size, tc.name), func(t *testing.T) {
				m := newChainOfFive(t, ctx, pool, fmt.Sprintf("p%d-m%d", size, i))
				for _, stmt := range tc.tamper {
					_, err := pool.Exec(ctx, stmt, m)
					require.NoError(t, err)
				}
				n, err := audit.VerifyPaged(ctx, pool, m, size, nil)
				if tc.seq == intact {
					require.NoError(t, err)
					require.Equal(t, 5, n)
					return
				}
				be := requireBroken(t, err, tc.seq)
				require.Equal(t, m, be.MeshID)
			})
		}
	}
}

// The chain is checked up to the head read when the walk starts. Entries sealed while it runs
// are left for the next run; tampering done while it runs is still found: a row slipped in
// beyond the head, a head cut back or edited after the walk passed it.
func TestVerifyWhileTheChainChanges(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)

	exec := func(t *testing.T, stmt, m string) {
		t.Helper()
		_, err := pool.Exec(ctx, stmt, m)
		require.NoError(t, err)
	}
	cases := []struct {
		name string
		// during runs after the page that ends at seq.
		during func(t *testing.T, m string, seq int64)
		want   int64 // the entry Verify must name; intact: none
	}{
		{"entries sealed meanwhile are past the range", func(t *testing.T, m string, seq int64) {
			if seq == 2 {
				require.NoError(t, appendTx(ctx, pool,
					audit.Entry{MeshID: m, Type: audit.MessageSent, Actor: "late"},
					audit.Entry{MeshID: m, Type: audit.MessageSent, Actor: "late"}))
				_, err := audit.Seal(ctx, pool, true)
				require.NoError(t, err)
			}
		}, intact},
		{"a row slipped in beyond the head", func(t *testing.T, m string, seq int64) {
			if seq == 2 {
				exec(t, `INSERT INTO claudemesh.audit (mesh_id, seq, event_type, actor, data, ts_micros, prev_hash, hash)
					SELECT mesh_id, 6, event_type, actor, data, ts_micros, hash, hash FROM claudemesh.audit WHERE mesh_id = $1 AND seq = 5`, m)
			}
		}, 6},
		{"rows cut ahead of the walk", func(t *testing.T, m string, seq int64) {
			if seq == 2 {
				exec(t, `DELETE FROM claudemesh.audit WHERE mesh_id = $1 AND seq > 3`, m)
				exec(t, `UPDATE claudemesh.audit_head h SET seq = a.seq, hash = a.hash
					FROM claudemesh.audit a WHERE h.mesh_id = $1 AND a.mesh_id = $1 AND a.seq = 3`, m)
			}
		}, 4},
		{"rows cut behind the walk", func(t *testing.T, m string, seq int64) {
			if seq == 5 {
				exec(t, `DELETE FROM claudemesh.audit WHERE mesh_id = $1 AND seq > 3`, m)
				exec(t, `UPDATE claudemesh.audit_head h SET seq = a.seq, hash = a.hash
					FROM claudemesh.audit a WHERE h.mesh_id = $1 AND a.mesh_id = $1 AND a.seq = 3`, m)
			}
		}, 4},
		{"head edited behind the walk", func(t *testing.T, m string, seq int64) {
			if seq == 5 {
				exec(t, `UPDATE claudemesh.audit_head SET hash = repeat('b', 64) WHERE mesh_id = $1`, m)
			}
		}, 5},
		{"head deleted behind the walk", func(t *testing.T, m string, seq int64) {
			if seq == 5 {
				exec(t, `DELETE FROM claudemesh.audit_head WHERE mesh_id = $1`, m)
			}
		}, 5},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := newChainOfFive(t, ctx, pool, fmt.Sprintf("m%d", i))
			n, err := audit.VerifyPaged(ctx, pool, m, 2, func(seq int64) { tc.during(t, m, seq) })
			if tc.want != intact {
				be := requireBroken(t, err, tc.want)
				t.Logf("%s: %v", tc.name, be)
				return
			}
			require.NoError(t, err)
			require.Equal(t, 5, n, "the entries up to the head read at the start")
			n, err = audit.Verify(ctx, pool, m)
			require.NoError(t, err)
			require.Equal(t, 7, n, "the next run checks the entries sealed meanwhile")
		})
	}
}
