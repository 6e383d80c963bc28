// Package store is the broker's only door to Postgres. It owns the transactions (with the
// bus notifications and audit entries that commit with them), runs the sqlc queries of package
// db, and maps their rows to the domain types below, so the rest of the broker never sees a
// generated type. Not-found is ErrNotFound; refusals decided by the database (capacity, a
// taken session key, a full quota) are typed errors of this package.
package store

import (
	"context"
	"errors"
	"log/slog"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
)

// Errors the broker acts on.
var (
	// ErrNotFound: the row asked for does not exist (or is not visible to the caller).
	ErrNotFound = errors.New("not found")
	// ErrCapacity: the mesh's live sessions reached its limit.
	ErrCapacity = errors.New("mesh at capacity")
	// ErrSessionKeyTaken: the session key is bound to another member, or is another member's key.
	ErrSessionKeyTaken = errors.New("session key taken")
	// ErrQuotaExceeded: a write would pass a mesh quota.
	ErrQuotaExceeded = errors.New("quota exceeded")
	// ErrReplayed: a signature was already used within its window.
	ErrReplayed = errors.New("signature already used")
)

// notFound maps pgx.ErrNoRows to ErrNotFound at this boundary.
func notFound(err error) error {
	if errors.Is(err, pgx.ErrNoRows) {
		return ErrNotFound
	}
	return err
}

// RejectedInput reports whether Postgres refused a statement for the data in it (SQLSTATE
// class 22, data exception, or 23, integrity constraint) rather than for being unavailable.
func RejectedInput(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (strings.HasPrefix(pgErr.Code, "22") || strings.HasPrefix(pgErr.Code, "23"))
}

// OutcomeUnknown reports whether err leaves open whether the statement committed: it may have
// reached Postgres and its answer was lost (the connection broke, or the deadline passed while it
// ran and Postgres did not answer the cancel request in time: db.CancelWait). Only Postgres's own errors (the statement rolled back), a connection that could not be
// made or taken from the pool (nothing was sent) are known failures. pgx's SafeToRetry is not
// enough: a connection that broke mid-statement can surface as "conn closed", which it deems
// safe.
func OutcomeUnknown(err error) bool {
	if err == nil {
		return false
	}
	var pgErr *pgconn.PgError
	var connErr *pgconn.ConnectError
	var ns notSent
	var nf notFlushed
	if errors.As(err, &nf) {
		return true
	}
	return !errors.As(err, &pgErr) && !errors.As(err, &connErr) && !errors.As(err, &ns)
}

// notFlushed marks a statement that committed without waiting for its flush (flushBehind)
// and whose flush could not be confirmed: stored or not is open, whatever the error says (a
// Postgres shutting down answers with an error of its own).
type notFlushed struct{ err error }

func (e notFlushed) Error() string { return "committed, flush not confirmed: " + e.err.Error() }
func (e notFlushed) Unwrap() error { return e.err }

// notSent marks an error raised before a statement was sent (no connection from the pool).
type notSent struct{ err error }

func (e notSent) Error() string { return "not sent: " + e.err.Error() }
func (e notSent) Unwrap() error { return e.err }

// Store runs the broker's queries on a pool.
type Store struct {
	pool *pgxpool.Pool
	q    *db.Queries
	ns   string // the bus namespace: the single-statement operations notify from inside
	log  *slog.Logger
	// afterCommit: send batches notify after their commit (committed, deferNotify).
	afterCommit bool
	// flushBehind: send batches commit without waiting for their flush, and are acknowledged
	// once a second transaction in the same flight has confirmed it (committed, flushBehind).
	flushBehind bool
}

// New returns a store on pool; namespace is the bus's ("" for pgbus.DefaultNamespace).
func New(pool *pgxpool.Pool, namespace string) *Store {
	if namespace == "" {
		namespace = pgbus.DefaultNamespace
	}
	return &Store{pool: pool, q: db.New(pool), ns: namespace, log: slog.Default()}
}

// SetLogger sets where the store reports what it cannot return (notifications that failed
// after their commit).
func (s *Store) SetLogger(l *slog.Logger) { s.log = l }

// SetNotifyAfterCommit makes send batches notify from a transaction of their own right after
// their commit (committed, deferNotify) instead of from inside it. Call it before any send.
func (s *Store) SetNotifyAfterCommit(on bool) { s.afterCommit = on }

// SetPushBeforeFlush makes a send batch commit without waiting for its WAL flush, so the other
// replicas push it at once, and be acknowledged only once a second transaction in the same
// flight has had its own commit flushed, which flushes the batch's too (committed,
// flushBehind): a slow flush (a network volume) then delays acks, not pushes, and the sends
// behind the batch may commit meanwhile (SendBatchCommitted). A peer may be pushed a message
// that a crash of Postgres within its flush time then loses; its sender was never
// acknowledged. Off, a batch notifies from inside a commit that waits for its flush. Not with
// SetNotifyAfterCommit. The pool should prepare NamedSQL (db.PoolConfig.Named). Call it before
// any send.
func (s *Store) SetPushBeforeFlush(on bool) { s.flushBehind = on }

// NamedSQL is what a pool prepares by name (db.PoolConfig.Named) for SetPushBeforeFlush: the
// statements of its pipeline, which runs below pgx.
func NamedSQL() []string {
	return []string{db.SendBatchSQL, "BEGIN", "COMMIT", sqlAsyncCommit, sqlFlushedDefault}
}

// Ping checks that Postgres answers.
func (s *Store) Ping(ctx context.Context) error { return s.pool.Ping(ctx) }

// PoolBusy says every connection of the pool is in use: a ping that timed out waiting for one
// says the replica is busy, not that Postgres is away.
func (s *Store) PoolBusy() bool {
	st := s.pool.Stat()
	return st.AcquiredConns() >= st.MaxConns()
}

// Tx is one transaction's work: its queries, the bus messages it sends and the audit entries
// it appends, all committed together.
type Tx struct {
	q      *db.Queries
	ns     string
	tx     pgx.Tx
	Outbox *pgbus.Outbox
	audit  []audit.Entry
}

// Audit queues entries to append when the transaction commits.
func (t *Tx) Audit(entries ...audit.Entry) { t.audit = append(t.audit, entries...) }

// InTx runs f in one transaction, then sends the bus messages f queued in o (o may be nil),
// then appends f's audit entries, and commits. Notifications go out exactly when the rows they
// point at commit. The append takes no lock (it only records the entries; the sealer chains
// them, migration 00014). It returns how many notifications were sent.
func (s *Store) InTx(ctx context.Context, o *pgbus.Outbox, f func(*Tx) error) (int, error) {
	if o == nil {
		o = &pgbus.Outbox{}
	}
	sent := 0
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		t := &Tx{q: s.q.WithTx(tx), ns: s.ns, tx: tx, Outbox: o}
		if err := f(t); err != nil {
			return err
		}
		n, err := pgbus.Send(ctx, t.q, o)
		if err != nil {
			return err
		}
		sent = n
		return audit.Append(ctx, tx, t.audit)
	})
	return sent, err
}

// DBTX is what runs a statement: a pool, a connection or a transaction.
type DBTX = db.DBTX
