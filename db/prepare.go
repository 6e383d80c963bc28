package db

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// RequestPath is the generated statements on a replica's busiest paths: a send, a hello and
// the probe after it, a record, a hook, a session's end, a claim, a release. PoolConfig.Prepare
// takes them (store.RequestPathSQL adds the transaction control around them).
//
// Each calls a function that names no table in its result: preparing one takes no lock on a
// table, so a table held exclusively (an ALTER TABLE, a VACUUM FULL) never holds up a new
// connection (TestPreparingTheRequestPathWaitsOnNoTable). A statement that names a table, or a
// function returning a table's rows (a status or state set: its row type is read under the
// table's lock), and the reads (list_peers, get_state, list_state, message_status) are
// prepared on their first use, as before.
var RequestPath = []string{
	sendBatch, helloBatch, helloWaiting, markDelivered, hookStatus, endSessions,
	claimDeliveries, releaseHeld,
}

// NamedStatement is the name a statement of PoolConfig.Named is prepared under.
func NamedStatement(sql string) string {
	h := sha256.Sum256([]byte(sql))
	return "claudemesh_" + hex.EncodeToString(h[:8])
}

// namedKey is where a connection keeps its named statements (pgconn's CustomData): pgx's own
// caches do not say what they prepared.
const namedKey = "claudemesh.named"

// Prepared returns the descriptions of sqls prepared on conn under their NamedStatement names,
// in order, preparing those not yet prepared there in one round trip first. It is for the
// statements run below pgx (the store's pipelines with a flush request), which pgx cannot
// prepare for them.
func Prepared(ctx context.Context, conn *pgconn.PgConn, sqls []string) ([]*pgconn.StatementDescription, error) {
	if err := prepareNamed(ctx, conn, sqls); err != nil {
		return nil, err
	}
	named, _ := conn.CustomData()[namedKey].(map[string]*pgconn.StatementDescription)
	out := make([]*pgconn.StatementDescription, len(sqls))
	for i, sql := range sqls {
		out[i] = named[sql]
	}
	return out, nil
}

// prepareNamed prepares sqls (those not yet prepared) under their names in one pipeline.
func prepareNamed(ctx context.Context, conn *pgconn.PgConn, sqls []string) error {
	named, _ := conn.CustomData()[namedKey].(map[string]*pgconn.StatementDescription)
	if named == nil {
		named = map[string]*pgconn.StatementDescription{}
		conn.CustomData()[namedKey] = named
	}
	var todo []string
	for _, sql := range sqls {
		if _, ok := named[sql]; !ok && !slices.Contains(todo, sql) {
			todo = append(todo, sql)
		}
	}
	if len(todo) == 0 {
		return nil
	}
	p := conn.StartPipeline(ctx)
	for _, sql := range todo {
		p.SendPrepare(NamedStatement(sql), sql, nil)
	}
	p.SendPipelineSync()
	if err := p.Flush(); err != nil {
		_ = p.Close()
		return err
	}
	var first error
	for _, sql := range todo {
		res, err := p.GetResults()
		if sd, ok := res.(*pgconn.StatementDescription); err == nil && ok {
			sd.Name, sd.SQL = NamedStatement(sql), sql // a pipeline's descriptions leave them empty
			named[sql] = sd
		} else if first == nil {
			first = errors.Join(err, fmt.Errorf("prepare: answered %T", res))
		}
	}
	return errors.Join(first, p.Close())
}

// prepareSentinel is queued first in prepareAll's batch with an argument it has no parameter
// for: pgx prepares every statement of a batch it has not cached in one flight, then binds
// each statement's arguments before sending any; the sentinel's bind fails, so nothing runs.
const prepareSentinel = "SELECT 1 AS claudemesh_prepare_only"

// errNotIdle: a connection left inside a transaction by prepareAll is not handed out.
var errNotIdle = errors.New("prepare on connect left the connection inside a transaction")

// prepareAll prepares stmts on conn and leaves them in its statement cache, in one round trip
// and without running any.
//
// pgx prepares a statement on its first use on a connection, in a flight of its own before
// the one that runs it. A replica far from the primary pays that round trip once per statement
// and connection: on every new connection of a growing pool, and again when one is replaced
// at its lifetime (measured: a hook landing on a connection that had not yet run the hook's
// statement took two round trips instead of one, 5 hooks in 66). pgx has no call that only
// prepares many statements at once; a batch whose first statement cannot be bound does it.
// A failure (a schema not migrated yet) leaves the statements to be prepared on first use, as
// without this; only a connection not back at rest is refused.
func prepareAll(ctx context.Context, conn *pgx.Conn, stmts []string) error {
	// Only where pgx keeps prepared statements: with a DATABASE_URL that asks for another mode
	// (default_query_exec_mode, e.g. behind a transaction pooler) nothing is prepared.
	if len(stmts) == 0 || conn.Config().DefaultQueryExecMode != pgx.QueryExecModeCacheStatement {
		return nil
	}
	b := &pgx.Batch{}
	b.Queue(prepareSentinel, 0)
	for _, sql := range stmts {
		b.Queue(sql)
	}
	// pgxpool gives AfterConnect a context that ends only with the pool: a primary that stops
	// answering mid-flight must not hold a pool slot for as long as TCP takes to notice.
	ctx, cancel := context.WithTimeout(ctx, prepareTimeout)
	defer cancel()
	_ = conn.SendBatch(ctx, b).Close() // the sentinel's bind error, expected
	if conn.IsClosed() {
		return errPrepareClosed
	}
	if conn.PgConn().TxStatus() != 'I' {
		return errNotIdle
	}
	return nil
}

// prepareNamedOnConnect prepares named (PoolConfig.Named) by name. A failure is left to the
// first use (Prepared), as prepareAll leaves its own; only a connection that broke is refused.
func prepareNamedOnConnect(ctx context.Context, conn *pgx.Conn, named []string) error {
	if len(named) == 0 || conn.Config().DefaultQueryExecMode != pgx.QueryExecModeCacheStatement {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, prepareTimeout)
	defer cancel()
	_ = prepareNamed(ctx, conn.PgConn(), named)
	if conn.IsClosed() {
		return errPrepareClosed
	}
	return nil
}

// SendBatchSQL is the send statement's text, for PoolConfig.Named.
const SendBatchSQL = sendBatch

// prepareTimeout bounds prepareAll's flight: a round trip and the parsing of a few statements.
const prepareTimeout = 5 * time.Second

// errPrepareClosed: a connection that broke during the flight is not handed out.
var errPrepareClosed = errors.New("connection closed while preparing on connect")
