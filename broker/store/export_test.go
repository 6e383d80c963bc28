package store

import (
	"context"

	"github.com/claudemesh/broker/db"
)

// SendBatchParams is the statement a store sends for a batch, for tests that run it on a
// connection of their own (in a transaction, with their own planner settings).
func SendBatchParams(s *Store, nodeID string, envs []OutgoingEnvelope) db.SendBatchParams {
	return sendBatchParams(nodeID, s.ns, envs)
}

// HelloBatch runs a batch of hellos on a connection of the test's own (in a transaction, with
// its own settings), as Hellos runs it.
func HelloBatch(ctx context.Context, q db.DBTX, s *Store, nodeID string, defaultLimit int, hs []HelloParams) ([]HelloResult, error) {
	rows, err := db.New(q).HelloBatch(ctx, helloBatchParams(nodeID, s.ns, defaultLimit, hs))
	if err != nil {
		return nil, err
	}
	return helloResults(len(hs), rows), nil
}
