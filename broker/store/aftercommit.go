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
	then        *thenStatement
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
)

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
	br, err := a.start(ctx, sql, args)
	if err != nil {
		return nil, err
	}
	rows, err := br.Query()
	if err != nil {
		a.abort(br)
		return nil, err
	}
	return &committingRows{Rows: rows, a: a, br: br}, nil
}

func (a committed) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	rows, err := a.Query(ctx, sql, args...)
	return committingRow{rows: rows, err: err}
}

// committingRows are the statement's rows; once read (or closed), the transaction's COMMIT
// is read too, and its failure is the rows' Err.
type committingRows struct {
	pgx.Rows
	a    committed
	br   pgx.BatchResults
	done bool
	err  error
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
		r.a.abort(r.br)
		return
	}
	r.err = r.a.finish(r.br)
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
func (s *Store) notifying(ctx context.Context, f func(q *db.Queries) error) error {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return notSent{err}
	}
	defer conn.Release()
	if !s.afterCommit {
		return f(db.New(conn))
	}
	return f(db.New(committed{conn: conn, log: s.log, deferNotify: true}))
}
