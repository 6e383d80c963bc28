-- +goose Up
-- A hello waits at most a second for a lock; past it, that hello alone fails (lock_not_available,
-- caught by its own subtransaction in hello_batch) and the replica refuses it as overloaded,
-- which the client retries. The locks a hello takes (its mesh's advisory lock, its presence
-- row) are normally held for a statement's server time by another replica's hello batch, a
-- ban, or a session's end: milliseconds. A replica runs one hello statement at a time
-- (HELLO_CONCURRENCY 1 since 2026-12-01), so without a bound one hello stuck behind a lock
-- held longer would hold up every hello of its replica until the statement's 5 s timeout, and
-- then fail its whole batch. The setting applies inside the function only: the commit's wait
-- for the notification queue, after it returns, is not bounded by it.
ALTER FUNCTION claudemesh.hello_batch SET lock_timeout = '1s';

-- +goose Down
ALTER FUNCTION claudemesh.hello_batch RESET lock_timeout;
