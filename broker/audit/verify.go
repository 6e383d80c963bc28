package audit

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/claudemesh/broker/db"
)

// verifyPageSize bounds the entries Verify reads at once. Each page is a statement of its own,
// so a walk of hours holds a snapshot (which keeps VACUUM from removing dead rows in every
// table of the database) for one page's read, not for the whole walk.
const verifyPageSize = 1000

// walk is how Verify reads a chain: pages of pageSize entries, with between (tests only) called
// after each page is checked, given the seq checked last.
type walk struct {
	pageSize int32
	between  func(seq int64)
}

// txBeginner is what a pool or a connection offers and a transaction does not.
type txBeginner interface {
	BeginTx(ctx context.Context, opts pgx.TxOptions) (pgx.Tx, error)
}

// Verify walks meshID's chain in seq order and returns how many entries it checked. When an
// entry does not check out it returns a *BrokenError naming the first such entry and why: a
// missing seq (a deleted row), a prev_hash that is not the previous entry's hash (a deleted,
// inserted or reordered row), a hash that does not match the entry's fields (an edited row), or
// a head that does not match the last entry (rows deleted at the end, or added behind the
// chain's back).
//
// Given a pool or a connection it first seals what is pending (Seal), then checks the chain up
// to the head it reads next; entries other replicas seal while it walks are past that head and
// left for the next run, never mistaken for tampering. Pages are read in statements of their
// own, each checked against the seq and hash carried from the page before, so a cut, rewrite,
// gap or reordering is found wherever a page ends. At the end the head is read again: an entry
// beyond it was not sealed, and a head that moved back or changed was cut or edited meanwhile.
// Given a transaction it reads the chain as that transaction sees it.
func Verify(ctx context.Context, q db.DBTX, meshID string) (int, error) {
	return verify(ctx, q, meshID, walk{pageSize: verifyPageSize})
}

func verify(ctx context.Context, q db.DBTX, meshID string, w walk) (int, error) {
	if _, ok := q.(txBeginner); ok {
		if err := sealToRead(ctx, q); err != nil {
			return 0, fmt.Errorf("verify audit: %w", err)
		}
	}
	qs := db.New(q)
	head, hasHead, err := readHead(ctx, qs, meshID)
	if err != nil {
		return 0, fmt.Errorf("verify audit: read head: %w", err)
	}
	// The range checked. Without a head there is no chain and any entry is one too many: all
	// are walked, so the error names the last, as it always has.
	end := int64(math.MaxInt64)
	if hasHead {
		end = head.Seq
	}

	broken := func(seq int64, format string, args ...any) error {
		return &BrokenError{MeshID: meshID, Seq: seq, Reason: fmt.Sprintf(format, args...)}
	}
	prev, seq, count := Genesis, int64(0), 0
	// The first page starts below 1 so that rows slipped in with seq <= 0 are seen too.
	after := int64(math.MinInt64)
	for {
		page, err := qs.AuditPage(ctx, db.AuditPageParams{MeshID: meshID, AfterSeq: after, PageSize: w.pageSize})
		if err != nil {
			return count, fmt.Errorf("verify audit: read entries: %w", err)
		}
		past := false
		for _, r := range page {
			switch {
			case r.Seq < 1:
				return count, broken(r.Seq, "entry with seq %d: chains start at 1, it was not appended through the chain", r.Seq)
			case r.Seq != seq+1 && seq == 0:
				return count, broken(1, "%s: the chain starts at seq %d", missing(1, r.Seq-1), r.Seq)
			case r.Seq != seq+1:
				return count, broken(seq+1, "%s: the chain goes from seq %d to %d", missing(seq+1, r.Seq-1), seq, r.Seq)
			case r.Seq > end:
				// Sealed after the head was read: the next run checks it (an entry that was
				// not sealed at all is found beyond the head below).
				past = true
			case r.PrevHash != prev:
				if seq == 0 {
					return count, broken(r.Seq, "prev_hash is not the genesis value: entries before it were deleted or it was moved")
				}
				return count, broken(r.Seq, "prev_hash is not the hash of entry %d: an entry was deleted, inserted or reordered, or entry %d was rewritten", seq, seq)
			}
			if past {
				break
			}
			data, err := CanonicalJSON(r.Data)
			if err != nil {
				return count, broken(r.Seq, "data is not valid or not canonical JSON (%v): the entry was edited", err)
			}
			if Hash(r.PrevHash, r.MeshID, r.EventType, r.Actor, data, r.TsMicros) != r.Hash {
				return count, broken(r.Seq, "hash does not match the entry's contents: the entry was edited")
			}
			prev, seq, after = r.Hash, r.Seq, r.Seq
			count++
		}
		if w.between != nil {
			w.between(seq)
		}
		if past || seq == end || len(page) < int(w.pageSize) {
			break
		}
	}

	switch {
	case hasHead && head.Seq > seq:
		return count, broken(seq+1, "%s: the head is at seq %d but the chain ends at %d", missing(seq+1, head.Seq), head.Seq, seq)
	case hasHead && head.Hash != prev:
		return count, broken(seq, "the head's hash does not match the last entry: the entry or the head was edited")
	}

	// The chain's last entry, read before the head: an entry a seal committed is seen with the
	// head that seal set, so an entry past the head now was not sealed.
	last, err := qs.AuditTail(ctx, db.AuditTailParams{MeshID: meshID, N: 1})
	if err != nil {
		return count, fmt.Errorf("verify audit: read last entry: %w", err)
	}
	now, hasNow, err := readHead(ctx, qs, meshID)
	if err != nil {
		return count, fmt.Errorf("verify audit: read head: %w", err)
	}
	switch {
	case !hasHead && !hasNow && count == 0 && len(last) == 0:
		return 0, nil
	case !hasHead && !hasNow && count == 0:
		return 0, broken(last[0].Seq, "the chain has no head row: it was deleted")
	case !hasNow:
		return count, broken(seq, "the chain has no head row: it was deleted")
	case !hasHead:
		// The mesh's first entries were sealed while the walk ran: nothing was in its range.
		return 0, nil
	case now.Seq < head.Seq:
		return count, broken(now.Seq+1, "the head moved back from seq %d to %d while the chain was verified: entries were cut", head.Seq, now.Seq)
	case now.Seq == head.Seq && now.Hash != head.Hash:
		return count, broken(now.Seq, "the head's hash changed while the chain was verified: the head was edited")
	case len(last) > 0 && last[0].Seq > now.Seq:
		return count, broken(now.Seq+1, "entry beyond the head (seq %d): it was not appended through the chain", now.Seq)
	}
	return count, nil
}

// readHead returns meshID's chain head, and false when it has none.
func readHead(ctx context.Context, qs *db.Queries, meshID string) (db.ClaudemeshAuditHead, bool, error) {
	h, err := qs.AuditHead(ctx, meshID)
	if err = db.NotFound(err); errors.Is(err, db.ErrNotFound) {
		return h, false, nil
	}
	return h, err == nil, err
}

// sealToRead seals what is pending before a read, so the read sees every entry committed before
// it. A reader that may not write (a read-only role, a standby, a read-only default) reads the
// chain as the replicas last sealed it instead: entries of the last second may be missing,
// never wrong.
func sealToRead(ctx context.Context, q db.DBTX) error {
	_, err := Seal(ctx, q, true)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && (pgErr.Code == "25006" || pgErr.Code == "42501") {
		return nil // read_only_sql_transaction, insufficient_privilege
	}
	return err
}

func missing(from, to int64) string {
	if from == to {
		return fmt.Sprintf("entry %d missing", from)
	}
	return fmt.Sprintf("entries %d to %d missing", from, to)
}

// Tail returns the newest n entries of meshID's chain, oldest first; given a pool or a
// connection, what is pending is sealed first.
func Tail(ctx context.Context, q db.DBTX, meshID string, n int) ([]Record, error) {
	if n <= 0 {
		return []Record{}, nil
	}
	if _, ok := q.(txBeginner); ok {
		if err := sealToRead(ctx, q); err != nil {
			return nil, fmt.Errorf("audit tail: %w", err)
		}
	}
	rows, err := db.New(q).AuditTail(ctx, db.AuditTailParams{MeshID: meshID, N: int32(min(n, 1<<30))})
	if err != nil {
		return nil, fmt.Errorf("audit tail: %w", err)
	}
	out := make([]Record, len(rows))
	for i, r := range rows {
		out[i] = Record{
			Seq: r.Seq, MeshID: r.MeshID, Type: r.EventType, Actor: r.Actor, Data: r.Data,
			At: time.UnixMicro(r.TsMicros).UTC(), PrevHash: r.PrevHash, Hash: r.Hash,
		}
	}
	return out, nil
}
