package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/claudemesh/broker/db"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// committed runs one generated statement as a transaction of its own (BEGIN, the statement,
// COMMIT: one pipeline, one Sync) with what must follow its commit in the same flight, each in
// a transaction of its own after it:
//   - the statement's notifications, when they are deferred (deferNotify);
//   - a statement that must see the commit (then): a hello's probe for what waits for the
//     sessions it registered.
//
// deferNotify: BEGIN, the deferral set, the statement, COMMIT, flush_notes() (migration
// 00033). Postgres holds the lock that orders notifying transactions from before a
// commit record is written until it is flushed; here the statement's commit does not notify,
// and the one that does is not flushed first, so neither waits for another's fsync under it.
//
// Only the send batch defers its notifications, and only when the replica is configured to
// (NOTIFY_AFTER_COMMIT): the second transaction costs more than it saves where the flush is
// fast. Its notifications may now queue after those of a transaction that committed after it.
// The same sender's next send cannot (its lane waits for this call to return); another
// transaction that acts on the send's rows in between (a session ending, releasing what the
// send assigned) only adds a hint of its own, and a notification is only ever a hint over
// committed rows, which the receiving replica's claims read. Status changes, hellos and the
// end of sessions keep notifying inside their commit: a status change's release must reach
// the holder before any send that saw the new status.
//
// It is a db.DBTX for one call on a connection taken from the pool: the generated code reads
// the statement's rows, and the COMMIT's outcome is their Err. A statement Postgres refuses
// is rolled back, and the notifications it kept (a session setting) with it. An error on this
// side after the pipeline was sent (a row that does not scan) leaves the outcome to the
// COMMIT already on its way: OutcomeUnknown. What follows a commit cannot undo it: a failure
// there is logged (notifications not sent are left to the catch-up, as after a listener's
// reconnect) or left to then's reader.
type committed struct {
	conn        *pgxpool.Conn
	log         *slog.Logger
	deferNotify bool
	// flushBehind: the statement commits without waiting for its WAL flush, so its
	// notifications leave (and the other replicas push) at once, and a second transaction right
	// after it in the flight waits for the flush in its place (sqlFlushed): BEGIN, the async
	// commit set, the statement, COMMIT, a flush request (Postgres sends what it has: the
	// COMMIT's answer comes as soon as it is done), the flush's transaction, Sync. Only a
	// confirmed flush is success: what the caller acknowledges is on disk. The statement must
	// be one of db.Named. Not with deferNotify, whose notifying transaction is the one after
	// the commit, nor with then.
	flushBehind bool
	// flushed, with flushBehind: where the statement's rows, once read, leave the wait for
	// the flush's confirmation instead of waiting for it themselves (nil: they wait). Set only
	// once the COMMIT succeeded; the caller must call it, and keep the connection until then.
	flushed *func() error
	then    *thenStatement
}

// thenStatement is a statement sent after a commit in its flight, and the reader of its rows.
// The reader is called once, with the rows or with the error that kept them from coming.
type thenStatement struct {
	sql  string
	args []any
	read func(pgx.Rows, error)
}

const (
	// rollbackTimeout bounds the ROLLBACK after a failed statement; the pool closes a
	// connection left in a transaction.
	rollbackTimeout = 5 * time.Second
	// The deferral is the transaction's; the kept notifications are the session's, emptied
	// here first: a flush that failed after its commit leaves them behind, and they must not
	// ride along with the next statement's (the catch-up covers them).
	sqlDeferNotify = "SELECT set_config('claudemesh.defer_notify', 'on', true), set_config('claudemesh.deferred', '', false)"
	sqlFlushNotes  = "SELECT claudemesh.flush_notes()"
	// flushBehind: the statement's transaction commits asynchronously, and the next one writes
	// a record of its own to the WAL under a transaction id, so its commit must be flushed,
	// and with it everything before it in the WAL (the first transaction's commit included),
	// before Postgres answers. A transaction id alone is not enough: Postgres commits
	// asynchronously a transaction that wrote nothing but its commit record. The message is
	// empty, and read by no one (logical decoding passes it on only to a consumer that asks
	// for messages with this prefix); any role may write one.
	sqlAsyncCommit    = "SELECT set_config('synchronous_commit', 'off', true)"
	sqlFlushedDefault = "SELECT pg_logical_emit_message(true, 'claudemesh.flush', '')"
)

// sqlFlushed is sqlFlushedDefault; a variable only so that a test can make it fail.
var sqlFlushed = sqlFlushedDefault

// RequestPathSQL is what a replica's pool prepares on every new connection (db.PoolConfig
// Prepare): the generated statements of the request path and the statements a committed call
// wraps them in.
func RequestPathSQL() []string {
	return append([]string{"BEGIN", "COMMIT", sqlDeferNotify, sqlFlushNotes}, db.RequestPath...)
}

func (a committed) start(ctx context.Context, sql string, args []any) (pgx.BatchResults, error) {
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	if a.deferNotify {
		b.Queue(sqlDeferNotify)
	}
	before := b.Len() // read here; the statement's rows are the caller's
	b.Queue(sql, args...)
	b.Queue("COMMIT")
	if a.deferNotify {
		b.Queue(sqlFlushNotes)
	}
	if a.then != nil {
		b.Queue(a.then.sql, a.then.args...)
	}
	br := a.conn.SendBatch(ctx, b)
	for range before {
		if _, err := br.Exec(); err != nil {
			a.abort(br)
			return nil, err
		}
	}
	return br, nil
}

// finish reads the COMMIT and what follows it. Only the COMMIT decides the outcome.
func (a committed) finish(br pgx.BatchResults) error {
	if _, err := br.Exec(); err != nil {
		a.abort(br)
		return fmt.Errorf("commit: %w", err)
	}
	reported := false // a failure after the commit is logged once (Close repeats the first)
	if a.deferNotify {
		if _, err := br.Exec(); err != nil {
			a.log.Warn("committed, but its notifications were not sent; their replicas catch up", "err", err)
			reported = true
		}
	}
	if a.then != nil {
		rows, err := br.Query()
		a.then.read(rows, err) // the reader reports its own failure
		if rows != nil {
			rows.Close()
			err = errors.Join(err, rows.Err())
		}
		reported = reported || err != nil
	}
	if err := br.Close(); err != nil && !reported {
		a.log.Warn("committed, but what followed the commit failed", "err", err)
	}
	return nil
}

// abort ends a pipeline whose statement failed: Postgres skipped the rest up to the Sync and
// left the explicit transaction open and failed, so it is rolled back here, or the connection
// would go back to the pool inside it (the pool then closes it).
func (a committed) abort(br pgx.BatchResults) {
	_ = br.Close()
	a.rollbackIfOpen()
}

func (a committed) rollbackIfOpen() {
	c := a.conn.Conn()
	if c.IsClosed() || c.PgConn().TxStatus() == 'I' {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), rollbackTimeout)
	defer cancel()
	_, _ = c.Exec(ctx, "ROLLBACK")
}

// Exec runs the statement through Query: one path for every kind of generated method.
func (a committed) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	rows, err := a.Query(ctx, sql, args...)
	if err != nil {
		return pgconn.CommandTag{}, err
	}
	for rows.Next() { // drain: the COMMIT is read after the rows
	}
	return rows.CommandTag(), rows.Err()
}

func (a committed) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	if a.flushBehind && !a.deferNotify && a.then == nil {
		return a.queryFlushBehind(ctx, sql, args)
	}
	br, err := a.start(ctx, sql, args)
	if err != nil {
		return nil, err
	}
	rows, err := br.Query()
	if err != nil {
		a.abort(br)
		return nil, err
	}
	return &committingRows{Rows: rows, finish: func() error { return a.finish(br) }, abort: func() { a.abort(br) }}, nil
}

func (a committed) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	rows, err := a.Query(ctx, sql, args...)
	return committingRow{rows: rows, err: err}
}

// committingRows are the statement's rows; once read (or closed), the transaction's COMMIT
// is read too (finish), and its failure is the rows' Err. Rows that fail end the flight
// instead (abort).
type committingRows struct {
	pgx.Rows
	finish func() error
	abort  func()
	done   bool
	err    error
}

func (r *committingRows) Next() bool {
	if r.done {
		return false
	}
	if r.Rows.Next() {
		return true
	}
	r.Close()
	return false
}

func (r *committingRows) Close() {
	if r.done {
		return
	}
	r.done = true
	r.Rows.Close()
	if err := r.Rows.Err(); err != nil {
		r.err = err
		r.abort()
		return
	}
	r.err = r.finish()
}

func (r *committingRows) Err() error {
	if r.err != nil {
		return r.err
	}
	return r.Rows.Err()
}

type committingRow struct {
	rows pgx.Rows
	err  error
}

func (r committingRow) Scan(dest ...any) error {
	if r.err != nil {
		return r.err
	}
	defer r.rows.Close()
	if !r.rows.Next() {
		if err := r.rows.Err(); err != nil {
			return err
		}
		return pgx.ErrNoRows
	}
	if err := r.rows.Scan(dest...); err != nil {
		return err
	}
	r.rows.Close()
	return r.rows.Err()
}

// notifying runs f with queries on a connection of its own, whose statement notifies after its
// commit when the store is set to (NOTIFY_AFTER_COMMIT), else from inside it. The connection is
// taken first: failing to get one is known to have sent nothing.
//
// By default (flushBehind) the statement commits without waiting for its flush, and flushed
// waits for Postgres to confirm it: the statement has succeeded only once flushed returns nil,
// and the connection is held until it is called (exactly once, when err is nil). In the other
// modes the statement waits for its flush itself and flushed returns nil at once.
func (s *Store) notifying(ctx context.Context, f func(q *db.Queries) error) (flushed func() error, err error) {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return nil, notSent{err}
	}
	// Named statements need a connection that keeps them (not one behind a transaction pooler).
	if s.afterCommit || !s.flushBehind || conn.Conn().Config().DefaultQueryExecMode != pgx.QueryExecModeCacheStatement {
		defer conn.Release()
		if s.afterCommit {
			return flushedAlready, f(db.New(committed{conn: conn, log: s.log, deferNotify: true}))
		}
		return flushedAlready, f(db.New(conn))
	}
	var confirm func() error
	if err := f(db.New(committed{conn: conn, log: s.log, flushBehind: true, flushed: &confirm})); err != nil || confirm == nil {
		if confirm != nil {
			err = errors.Join(err, confirm()) // read to the end: the connection goes back clean
		}
		conn.Release()
		if err == nil {
			err = errors.New("send batch: statement returned without its commit") // cannot happen: rows read to the end
		}
		return nil, err
	}
	return func() error {
		defer conn.Release()
		return confirm()
	}, nil
}

func flushedAlready() error { return nil }

// queryFlushBehind runs the statement as flushBehind describes, below pgx (which has no flush
// request in its batches): its rows are pgx's, decoded as pgx would, and once they are read
// the COMMIT's answer is their Err (committingRows); the flush's confirmation is left in a.flushed, or waited
// for there.
func (a committed) queryFlushBehind(ctx context.Context, sql string, args []any) (pgx.Rows, error) {
	c := a.conn.Conn()
	// Prepared when the connection was made (NamedSQL); else now, once for the connection.
	sds, err := db.Prepared(ctx, c.PgConn(), []string{"BEGIN", sqlAsyncCommit, sql, "COMMIT", sqlFlushed})
	if err != nil {
		return nil, notSent{fmt.Errorf("prepare: %w", err)}
	}
	sd := sds[2]
	// Encoded as pgx encodes its own (text for strings, its fallbacks), with its result formats.
	var eqb pgx.ExtendedQueryBuilder
	if err := eqb.Build(c.TypeMap(), sd, args); err != nil {
		return nil, notSent{fmt.Errorf("encode arguments: %w", err)}
	}
	p := c.PgConn().StartPipeline(ctx)
	p.SendQueryPrepared(sds[0].Name, nil, nil, nil) // BEGIN
	p.SendQueryPrepared(sds[1].Name, nil, nil, nil) // the async commit set
	p.SendQueryPrepared(sd.Name, eqb.ParamValues, eqb.ParamFormats, eqb.ResultFormats)
	p.SendQueryPrepared(sds[3].Name, nil, nil, nil) // COMMIT
	p.SendFlushRequest()
	p.SendQueryPrepared(sds[4].Name, nil, nil, nil) // the flush's transaction
	p.SendPipelineSync()
	fail := func(err error) (pgx.Rows, error) {
		a.abortPipeline(p)
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && (pgErr.Code == "26000" || pgErr.Code == "0A000") {
			// A named statement is gone or stale (a DISCARD, a changed result type): the
			// connection's names cannot be trusted, and re-preparing a name that still exists
			// fails. A new connection prepares them afresh.
			closing, cancel := context.WithTimeout(context.Background(), rollbackTimeout)
			_ = c.Close(closing)
			cancel()
		}
		return nil, err
	}
	if err := p.Flush(); err != nil {
		return fail(err)
	}
	for range 2 { // BEGIN, the async commit set
		if err := nextResult(p); err != nil {
			return fail(err)
		}
	}
	res, err := p.GetResults()
	rr, ok := res.(*pgconn.ResultReader)
	if err == nil && !ok {
		err = fmt.Errorf("pipeline: statement answered %T", res)
	}
	if err != nil {
		return fail(err)
	}
	return &committingRows{Rows: pgx.RowsFromResultReader(c.TypeMap(), rr), finish: func() error { return a.commitPipeline(p) },
		abort: func() { a.abortPipeline(p) }}, nil
}

// nextResult reads the next step's answer in full.
func nextResult(p *pgconn.Pipeline) error {
	res, err := p.GetResults()
	if err != nil {
		return err
	}
	rr, ok := res.(*pgconn.ResultReader)
	if !ok {
		return fmt.Errorf("pipeline: answered %T", res)
	}
	_, err = rr.Close()
	return err
}

// abortPipeline ends a pipeline whose statement (or COMMIT) failed, as abort does a batch.
func (a committed) abortPipeline(p *pgconn.Pipeline) {
	_ = p.Close()
	a.rollbackIfOpen()
}

// commitPipeline reads the COMMIT's answer, then the flush's confirmation (or leaves it in
// a.flushed).
func (a committed) commitPipeline(p *pgconn.Pipeline) error {
	if err := nextResult(p); err != nil {
		a.abortPipeline(p)
		return fmt.Errorf("commit: %w", err)
	}
	confirm := func() error {
		err := nextResult(p) // the flush's statement
		if err == nil {
			// Its transaction commits at the Sync: the flush is confirmed by the ReadyForQuery.
			var res any
			res, err = p.GetResults()
			if _, ok := res.(*pgconn.PipelineSync); err == nil && !ok {
				err = fmt.Errorf("pipeline: Sync answered %T", res)
			}
		}
		if err = errors.Join(err, p.Close()); err != nil {
			// Committed, and perhaps not on disk: a crash of Postgres now would lose it.
			a.rollbackIfOpen()
			return notFlushed{err}
		}
		return nil
	}
	if a.flushed != nil {
		*a.flushed = confirm
		return nil
	}
	return confirm()
}
