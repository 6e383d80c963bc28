package store

import "github.com/claudemesh/broker/db"

// SendBatchParams is the statement a store sends for a batch, for tests that run it on a
// connection of their own (in a transaction, with their own planner settings).
func SendBatchParams(s *Store, nodeID string, envs []OutgoingEnvelope) db.SendBatchParams {
	return sendBatchParams(nodeID, s.ns, envs)
}

// SetFlushStatement replaces the statement that confirms a send's flush (flushBehind); ""
// restores it. The returned func restores it too.
func SetFlushStatement(sql string) func() {
	if sql == "" {
		sql = sqlFlushedDefault
	}
	sqlFlushed = sql
	return func() { sqlFlushed = sqlFlushedDefault }
}
