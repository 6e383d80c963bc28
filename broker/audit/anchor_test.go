package audit_test

import (
	"bytes"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db/dbtest"
)

// The chain's hash is not keyed, so whoever writes to Postgres can cut the chain's tail and
// set its head to match, or rewrite it whole: Verify, which has only the database, calls both
// intact. An anchor kept outside (a head the replicas logged) shows either.
func TestAnchorsCatchACutOrRewrittenChain(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	var logged bytes.Buffer
	anchors := audit.NewAnchors(slog.New(slog.NewTextHandler(&logged, nil)))
	cut, rewritten := newMesh(t, pool, "cut"), newMesh(t, pool, "rewritten")
	n, err := anchors.Log(ctx, pool)
	require.NoError(t, err)
	require.Zero(t, n, "the first call only records the heads")
	for i := range 5 {
		for _, m := range []string{cut, rewritten} {
			require.NoError(t, appendTx(ctx, pool, audit.Entry{MeshID: m, Type: audit.MemberAdded, Actor: "op", Data: map[string]any{"i": i}}))
		}
	}
	_, err = audit.Seal(ctx, pool, true)
	require.NoError(t, err)
	n, err = anchors.Log(ctx, pool)
	require.NoError(t, err)
	require.Equal(t, 2, n, "both heads moved")
	require.Contains(t, logged.String(), `msg="audit anchor" mesh=`+cut+" seq=5 hash=")
	n, err = anchors.Log(ctx, pool)
	require.NoError(t, err)
	require.Zero(t, n, "nothing moved since")
	anchor := func(mesh string) audit.Anchor {
		a := audit.Anchor{MeshID: mesh}
		require.NoError(t, pool.QueryRow(ctx, `SELECT seq, hash FROM claudemesh.audit_head WHERE mesh_id = $1`, mesh).Scan(&a.Seq, &a.Hash))
		return a
	}
	cutAt, rewrittenAt := anchor(cut), anchor(rewritten)
	for _, a := range []audit.Anchor{cutAt, rewrittenAt} {
		n, err := audit.VerifyAnchor(ctx, pool, a)
		require.NoError(t, err)
		require.Equal(t, 5, n)
	}

	// The last two entries deleted, the head set to the entry left last.
	_, err = pool.Exec(ctx, `DELETE FROM claudemesh.audit WHERE mesh_id = $1 AND seq > 3`, cut)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `UPDATE claudemesh.audit_head h SET seq = a.seq, hash = a.hash
		FROM claudemesh.audit a WHERE h.mesh_id = $1 AND a.mesh_id = $1 AND a.seq = 3`, cut)
	require.NoError(t, err)
	onlyTheAnchorSees := func(a audit.Anchor, entries int) {
		t.Helper()
		n, err := audit.Verify(ctx, pool, a.MeshID)
		require.NoError(t, err, "consistent with its own head")
		require.Equal(t, entries, n)
		_, err = audit.VerifyAnchor(ctx, pool, a)
		requireBroken(t, err, a.Seq)
	}
	onlyTheAnchorSees(cutAt, 3)

	// Entry 2 edited and every hash from it on recomputed, the head too.
	rows, err := pool.Query(ctx, `SELECT seq, event_type, actor, data, ts_micros FROM claudemesh.audit WHERE mesh_id = $1 ORDER BY seq`, rewritten)
	require.NoError(t, err)
	type entry struct {
		seq, ts    int64
		typ, actor string
		data       []byte
	}
	var entries []entry
	for rows.Next() {
		var e entry
		require.NoError(t, rows.Scan(&e.seq, &e.typ, &e.actor, &e.data, &e.ts))
		entries = append(entries, e)
	}
	require.NoError(t, rows.Err())
	prev := audit.Genesis
	for _, e := range entries {
		if e.seq == 2 {
			e.data = []byte(`{"i":99}`)
		}
		data, err := audit.CanonicalJSON(e.data)
		require.NoError(t, err)
		h := audit.Hash(prev, rewritten, e.typ, e.actor, data, e.ts)
		_, err = pool.Exec(ctx, `UPDATE claudemesh.audit SET data = $3, prev_hash = $4, hash = $5 WHERE mesh_id = $1 AND seq = $2`,
			rewritten, e.seq, string(data), prev, h)
		require.NoError(t, err)
		prev = h
	}
	_, err = pool.Exec(ctx, `UPDATE claudemesh.audit_head SET hash = $2 WHERE mesh_id = $1`, rewritten, prev)
	require.NoError(t, err)
	onlyTheAnchorSees(rewrittenAt, 5)
}

// A chain's head only ever moves forward. A running replica that sees one go back, or change
// in place, or vanish, says so at once (Error), instead of logging the cut chain's head as a
// fresh anchor for the operator to verify against.
func TestAnchorsReportAHeadThatWentBack(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	var logged bytes.Buffer
	anchors := audit.NewAnchors(slog.New(slog.NewTextHandler(&logged, nil)))
	back, edited, gone := newMesh(t, pool, "back"), newMesh(t, pool, "edited"), newMesh(t, pool, "gone")
	for range 3 {
		for _, m := range []string{back, edited, gone} {
			require.NoError(t, appendTx(ctx, pool, audit.Entry{MeshID: m, Type: audit.MemberAdded, Actor: "op"}))
		}
	}
	_, err := audit.Seal(ctx, pool, true)
	require.NoError(t, err)
	_, err = anchors.Log(ctx, pool)
	require.NoError(t, err)

	for _, stmt := range []string{
		`UPDATE claudemesh.audit_head h SET seq = a.seq, hash = a.hash FROM claudemesh.audit a
		 WHERE h.mesh_id = $1 AND a.mesh_id = $1 AND a.seq = 2`,
	} {
		_, err = pool.Exec(ctx, stmt, back)
		require.NoError(t, err)
	}
	_, err = pool.Exec(ctx, `UPDATE claudemesh.audit_head SET hash = repeat('c', 64) WHERE mesh_id = $1`, edited)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `DELETE FROM claudemesh.audit_head WHERE mesh_id = $1`, gone)
	require.NoError(t, err)
	n, err := anchors.Log(ctx, pool)
	require.NoError(t, err)
	require.Zero(t, n, "no anchor of a tampered head")
	out := logged.String()
	require.Contains(t, out, `level=ERROR msg="audit head went back" mesh=`+back+" seq=2 was=3")
	require.Contains(t, out, `level=ERROR msg="audit head changed" mesh=`+edited+" seq=3")
	require.Contains(t, out, `level=ERROR msg="audit head gone" mesh=`+gone+" was=3")
	require.NotContains(t, out, "audit anchor")
}
