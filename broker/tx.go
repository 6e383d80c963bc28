package broker

import (
	"context"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
)

// txFunc does a transaction's work: it queues bus messages in o and returns the audit entries
// to append.
type txFunc func(q *db.Queries, o *pgbus.Outbox) ([]audit.Entry, error)

// inTx runs f in one transaction, then sends the bus messages f queued, then appends f's audit
// entries, and commits. Notifications go out exactly when the rows they point at commit. The
// audit append comes last because it locks the mesh's chain head until commit: every replica
// writing to the mesh queues on that lock, so it is held for two statements and the commit.
func (s *Server) inTx(ctx context.Context, f txFunc) error {
	return s.inTxOutbox(ctx, &pgbus.Outbox{}, f)
}

// inTxOutbox is inTx with an outbox the caller already started filling.
func (s *Server) inTxOutbox(ctx context.Context, o *pgbus.Outbox, f txFunc) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := s.q.WithTx(tx)
		entries, err := f(q, o)
		if err != nil {
			return err
		}
		n, err := pgbus.Send(ctx, q, o)
		if err != nil {
			return err
		}
		s.metrics.BusSent.Add(float64(n))
		return audit.Append(ctx, tx, entries)
	})
}
