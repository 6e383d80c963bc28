package store_test

import (
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
)

// expiryFixture is a mesh with one member and n envelopes of it expired at expired (an SQL
// interval before now), each with one delivery in state.
func expiryFixture(t *testing.T, pool *pgxpool.Pool, prefix string, n int, expired, state string) {
	t.Helper()
	ctx := dbtest.Context(t)
	_, err := pool.Exec(ctx, `
		WITH m AS (INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ($1, 'm', repeat('a', 64)) RETURNING id),
		mb AS (INSERT INTO claudemesh.member (mesh_id, pubkey) SELECT id, repeat('a', 64) FROM m RETURNING id, mesh_id),
		e AS (
			INSERT INTO claudemesh.envelope (id, mesh_id, sender_member_id, sender_pubkey, sender_member_pubkey, target_spec,
				priority, nonce, ciphertext, created_at, expires_at)
			SELECT $1 || g, mb.mesh_id, mb.id, 'k', 'k', 'k', 'now', 'n', 'c', now() - interval '9 days', now() - $3::interval
			FROM mb, generate_series(1, $2) g
			RETURNING id, mesh_id, sender_member_id, expires_at)
		INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, priority, state, expires_at)
		SELECT id, mesh_id, sender_member_id, 'now', $4, expires_at FROM e`, prefix, n, expired, state)
	require.NoError(t, err)
}

func count(t *testing.T, pool *pgxpool.Pool, sql string) (n int) {
	t.Helper()
	require.NoError(t, pool.QueryRow(dbtest.Context(t), sql).Scan(&n))
	return n
}

// deliveryRowsScanned is how many rows of claudemesh.delivery sequential scans have read so far.
func deliveryRowsScanned(t *testing.T, pool *pgxpool.Pool) (n int64) {
	t.Helper()
	ctx := dbtest.Context(t)
	_, err := pool.Exec(ctx, `SELECT pg_stat_force_next_flush()`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `SELECT pg_stat_clear_snapshot()`)
	require.NoError(t, err)
	require.NoError(t, pool.QueryRow(ctx, `SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables
		WHERE schemaname = 'claudemesh' AND relname = 'delivery'`).Scan(&n))
	return n
}

// One expiry sweep marks every open delivery past its expiry, more than a page of them, and
// finds them by an index of open deliveries (00055): the days of delivered history kept for
// message_status are not read. It went through the expired envelopes and read the whole
// delivery table every sweep, on every replica (1.3 s at 5 M deliveries), one page a sweep.
func TestExpiryTakesEveryOpenDeliveryAndReadsNoHistory(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := oneConnection(t)
	st := store.New(pool, "t")
	expiryFixture(t, pool, "acked", 100000, "1 hour", "acked")
	expiryFixture(t, pool, "open", 12000, "1 minute", "pending")
	expiryFixture(t, pool, "fresh", 100, "-1 day", "pending") // not expired yet
	_, err := pool.Exec(ctx, `ANALYZE claudemesh.delivery`)
	require.NoError(t, err)

	seq, idx := deliveryRowsScanned(t, pool), tuplesRead(t, pool, "delivery")
	n, err := st.ExpireDeliveries(ctx)
	require.NoError(t, err)
	require.Equal(t, int64(12000), n)
	require.Zero(t, deliveryRowsScanned(t, pool)-seq, "no sequential scan of the delivery table")
	// Each expired row: its entry in the open index, its key; and the pages after the first
	// walk past the rows the earlier ones expired (34,056 here). Not the 100,000 delivered.
	reads := tuplesRead(t, pool, "delivery") - idx
	t.Logf("index entries read: %d", reads)
	require.Less(t, reads, int64(45000), "the delivered history is not walked")
	require.Equal(t, 12000, count(t, pool, `SELECT count(*) FROM claudemesh.delivery WHERE state = 'expired'`))
	require.Equal(t, 100, count(t, pool, `SELECT count(*) FROM claudemesh.delivery WHERE state = 'pending'`))
}

// One deletion sweep removes every envelope kept past its day, with its deliveries: one page
// a sweep (5,000 every 30 s a replica) fell behind any cluster sending more than 167 messages
// a second, and what it left grew without end.
func TestOldEnvelopesAreDeletedWhateverTheBacklog(t *testing.T) {
	ctx := dbtest.Context(t)
	pool := dbtest.PoolFor(t, dbtest.URL(t))
	st := store.New(pool, "t")
	expiryFixture(t, pool, "old", 12000, "2 days", "acked")
	expiryFixture(t, pool, "kept", 100, "1 hour", "acked") // message_status answers for a day
	n, err := st.DeleteOldEnvelopes(ctx)
	require.NoError(t, err)
	require.Equal(t, int64(12000), n)
	require.Equal(t, 100, count(t, pool, `SELECT count(*) FROM claudemesh.envelope`))
	require.Equal(t, 100, count(t, pool, `SELECT count(*) FROM claudemesh.delivery`))
}
