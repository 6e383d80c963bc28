package audit

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/claudemesh/broker/db"
)

// Anchor is a chain head seen at some moment: entry Seq of the mesh's chain had hash Hash.
//
// The chain alone shows edits, reordering and deletions in its middle, but its hash is not
// keyed: whoever can write to Postgres can cut its tail and set the head to the entry left
// last, or rewrite it whole and recompute every hash. An anchor kept outside the database (the
// replicas log them: Anchors) catches both: VerifyAnchor.
type Anchor struct {
	MeshID string
	Seq    int64
	Hash   string
}

// Anchors logs each mesh's chain head that moved since the last call, so that the log stream
// (shipped off the database's host) holds anchors to verify the chain against later. The first
// call records the heads without logging them: they were logged before, by another replica or
// by the replica this one replaces as it stopped (the sealer logs once more on stop). A head
// only moves forward: one that went back, changed in place or vanished was tampered with, and
// is reported (Error) rather than logged as an anchor. It holds one entry per mesh.
type Anchors struct {
	log  *slog.Logger
	seen map[string]db.ClaudemeshAuditHead
}

// NewAnchors returns an Anchors that logs to log.
func NewAnchors(log *slog.Logger) *Anchors { return &Anchors{log: log} }

// Log reads every chain head and logs those that moved; it returns how many anchors it logged.
func (a *Anchors) Log(ctx context.Context, q db.DBTX) (int, error) {
	heads, err := db.New(q).AuditHeads(ctx)
	if err != nil {
		return 0, fmt.Errorf("audit anchors: %w", err)
	}
	first := a.seen == nil
	seen := make(map[string]db.ClaudemeshAuditHead, len(heads))
	n := 0
	for _, h := range heads {
		seen[h.MeshID] = h
		was, ok := a.seen[h.MeshID]
		switch {
		case first || (ok && was == h):
		case ok && h.Seq < was.Seq:
			a.log.Error("audit head went back", "mesh", h.MeshID, "seq", h.Seq, "was", was.Seq, "hash", h.Hash)
		case ok && h.Seq == was.Seq:
			a.log.Error("audit head changed", "mesh", h.MeshID, "seq", h.Seq, "hash", h.Hash, "was", was.Hash)
		default:
			a.log.Info("audit anchor", "mesh", h.MeshID, "seq", h.Seq, "hash", h.Hash)
			n++
		}
	}
	for mesh, was := range a.seen {
		if _, ok := seen[mesh]; !ok {
			a.log.Error("audit head gone", "mesh", mesh, "was", was.Seq, "hash", was.Hash)
		}
	}
	a.seen = seen
	return n, nil
}

// VerifyAnchor verifies meshID's chain (Verify) and that it still holds the anchored entry
// unchanged: a chain cut below the anchor, or rewritten, is broken even when it is consistent
// with its own head.
func VerifyAnchor(ctx context.Context, q db.DBTX, a Anchor) (int, error) {
	return VerifyAnchors(ctx, q, a.MeshID, []Anchor{a})
}

// VerifyAnchors is VerifyAnchor for several anchors of meshID's chain, in one walk. Give every
// anchor logged since the last check: those logged after a cut or rewrite are the tampered
// chain's own, so the latest alone does not show what was done before it. The first anchor
// (by seq) the chain does not hold is named.
func VerifyAnchors(ctx context.Context, q db.DBTX, meshID string, anchors []Anchor) (int, error) {
	n, err := Verify(ctx, q, meshID)
	if err != nil {
		return n, err
	}
	anchors = slices.Clone(anchors)
	slices.SortFunc(anchors, func(a, b Anchor) int { return cmp.Compare(a.Seq, b.Seq) })
	for _, a := range anchors {
		hash, err := db.New(q).AuditEntryHash(ctx, db.AuditEntryHashParams{MeshID: meshID, Seq: a.Seq})
		switch err = db.NotFound(err); {
		case errors.Is(err, db.ErrNotFound):
			return n, &BrokenError{MeshID: meshID, Seq: a.Seq, Reason: fmt.Sprintf(
				"the anchored entry %d is gone: the chain was cut back below it (it ends at %d)", a.Seq, n)}
		case err != nil:
			return n, fmt.Errorf("verify audit anchor: %w", err)
		case hash != a.Hash:
			return n, &BrokenError{MeshID: meshID, Seq: a.Seq, Reason: "the anchored entry's hash differs: the chain was rewritten"}
		}
	}
	return n, nil
}
