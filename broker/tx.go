package broker

import (
	"context"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
)

// inTx runs f in one transaction and sends the bus messages f queued in that same
// transaction, so other replicas are signalled exactly when the rows they will read commit.
// If f calls audit.Append it does so last: the mesh's audit lock is then held the shortest.
func (s *Server) inTx(ctx context.Context, f func(tx pgx.Tx, q *db.Queries, o *pgbus.Outbox) error) error {
	return s.inTxOutbox(ctx, &pgbus.Outbox{}, f)
}

// inTxOutbox is inTx with an outbox the caller already started filling.
func (s *Server) inTxOutbox(ctx context.Context, o *pgbus.Outbox, f func(tx pgx.Tx, q *db.Queries, o *pgbus.Outbox) error) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := s.q.WithTx(tx)
		if err := f(tx, q, o); err != nil {
			return err
		}
		n, err := pgbus.Send(ctx, q, o)
		s.metrics.BusSent.Add(float64(n))
		return err
	})
}
