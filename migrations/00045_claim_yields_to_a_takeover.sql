-- +goose Up
-- A claim waits at most 100 ms for a session's row. The claim locks its sessions' rows in share
-- mode, one by one, so that a takeover in flight is seen (00041); a hello batch taking over two
-- of them in the other order deadlocked with it, and Postgres broke the deadlock only after
-- deadlock_timeout (1 s), with the takeover's hellos waiting all that time. Now the claim gives
-- up first (lock_not_available), its locks go, and the hellos go on; the replica claims again
-- for those sessions at once (broker/pusher.go), and finds the ones taken over gone. A hello
-- holds a session's row for its statement's server time, milliseconds, so a claim that is not
-- in a deadlock rarely waits that long. The function's body and result are unchanged.
ALTER FUNCTION claudemesh.claim_deliveries(text, text[], bigint[], text[], text[], text[], boolean[], integer[], boolean[], text[], bigint[], double precision)
    SET lock_timeout = '100ms';

-- +goose Down
ALTER FUNCTION claudemesh.claim_deliveries(text, text[], bigint[], text[], text[], text[], boolean[], integer[], boolean[], text[], bigint[], double precision)
    RESET lock_timeout;
