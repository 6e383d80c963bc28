-- +goose Up
-- A hook that found no session took its cwd's lock, then waited for its sessionId's (00067).
-- One hello statement registers many sessions in one transaction (claudemesh.hello_batch), and
-- each hello holds its cwd's and sessionId's locks shared until the batch commits: a hook
-- naming the sessionId of one hello of a batch and the cwd of a later one held that cwd while
-- waiting for the batch, which waited for the cwd. Postgres ended one of them as a deadlock
-- after a second: the hook answered 503 and its signal was lost, or the batch's hello failed.
-- The hook now never waits for a lock while holding the other. Same arguments and result
-- columns: the replicas call it unchanged.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.hook_status(p_member_pubkey text, p_session_id text, p_pid int, p_cwd text,
                                       p_status text, p_fresh_seconds float8, p_ns text, p_release int,
                                       p_signature text, p_sig_expires timestamptz)
RETURNS TABLE (presence_id text, pending boolean, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    ids text[];
    t text;
    attempt int;
BEGIN
    -- A signed hook proves its key, not that the key is anyone's: a key of no live member
    -- matches no session, so nothing is written for it (no seen signature, no pending signal)
    -- and no row comes back, which the broker answers 403. Replicas of the previous release
    -- read no row as "pending".
    IF p_member_pubkey <> '' AND NOT EXISTS (
        SELECT 1 FROM claudemesh.member m WHERE m.pubkey = p_member_pubkey AND m.revoked_at IS NULL) THEN
        RETURN;
    END IF;
    replayed := false;
    IF p_signature <> '' THEN
        INSERT INTO claudemesh.seen_signature (signature, expires_at) VALUES (p_signature, p_sig_expires)
        ON CONFLICT (signature) DO NOTHING;
        IF NOT FOUND THEN
            replayed := true;
            pending := false;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    -- By sessionId, else pid and cwd, else the cwd's newest session, a connected one before one
    -- in its reconnect grace (00053). Finding none, the hook waits for the hellos in its cwd and
    -- of its sessionId still running (each holds their locks shared until it commits, see
    -- hello) and looks again: a signal stored while a hello that had already looked for it was running would be
    -- lost, and the session would start idle under a hook that said working.
    FOR attempt IN 1 .. 2 LOOP
        WITH mine AS NOT MATERIALIZED (
            SELECT x.id, x.session_id, x.pid, x.cwd, x.connected_at, x.grace_until FROM claudemesh.presence x
            -- member_pubkey is never NULL; saying so lets the lookup by sessionId use
            -- presence_live_session_id, signed or not, in a generic plan too.
            WHERE x.ended_at IS NULL AND x.member_pubkey IS NOT NULL
              AND (p_member_pubkey = '' OR x.member_pubkey = p_member_pubkey)
        ), by_session AS (
            SELECT id FROM mine WHERE p_session_id <> '' AND session_id = p_session_id
        ), by_pid AS (
            SELECT id FROM mine
            WHERE NOT EXISTS (SELECT 1 FROM by_session) AND p_pid <> 0 AND pid = p_pid AND cwd = p_cwd
        ), by_cwd AS (
            SELECT id FROM mine
            WHERE NOT EXISTS (SELECT 1 FROM by_session) AND NOT EXISTS (SELECT 1 FROM by_pid) AND cwd = p_cwd
            ORDER BY grace_until IS NULL DESC, connected_at DESC LIMIT 1
        )
        SELECT array_agg(id) INTO ids FROM (
            SELECT id FROM by_session UNION ALL SELECT id FROM by_pid UNION ALL SELECT id FROM by_cwd) u;
        EXIT WHEN ids IS NOT NULL OR attempt = 2;
        -- The member's key and the cwd, as the hellos hold them: a hook waits only for hellos
        -- that could take its signal, not for every tenant's in a common directory. By sessionId
        -- a hook finds its session whatever cwd either names, so it waits for the hellos of that
        -- sessionId too (00067). Never for one lock while holding the other (00069): a hello
        -- batch holds each of its hellos' locks in turn, one's sessionId before another's cwd,
        -- and would wait for this hook as it waits for the batch (a deadlock, one of them
        -- failed). Holding the cwd's, it only tries the sessionId's; held, it lets the cwd's go
        -- (the subtransaction's end), waits for those hellos holding nothing, and starts over.
        LOOP
            BEGIN
                PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.pending_status:' || p_member_pubkey || ':' || p_cwd, 0));
                EXIT WHEN p_session_id = '' OR pg_try_advisory_xact_lock(
                    hashtextextended('claudemesh.pending_status.session:' || p_member_pubkey || ':' || p_session_id, 0));
                RAISE EXCEPTION USING ERRCODE = 'lock_not_available';
            EXCEPTION WHEN lock_not_available THEN
                BEGIN
                    PERFORM pg_advisory_xact_lock(
                        hashtextextended('claudemesh.pending_status.session:' || p_member_pubkey || ':' || p_session_id, 0));
                    RAISE EXCEPTION USING ERRCODE = 'lock_not_available';
                EXCEPTION WHEN lock_not_available THEN
                    NULL;
                END;
            END;
        END LOOP;
    END LOOP;
    IF ids IS NULL THEN
        INSERT INTO claudemesh.pending_status (cwd, pid, session_id, status, member_pubkey, expires_at)
        VALUES (p_cwd, nullif(p_pid, 0), nullif(p_session_id, ''), p_status, nullif(p_member_pubkey, ''),
                now() + interval '10 seconds');
        presence_id := NULL;
        pending := true;
        RETURN NEXT;
        RETURN;
    END IF;
    pending := false;
    FOREACH t IN ARRAY ids LOOP
        presence_id := t;
        -- dnd (which hooks never change) or a fresher source: no change, still a match.
        PERFORM claudemesh.apply_status(t, p_status, 'hook', p_fresh_seconds, p_ns, p_release);
        RETURN NEXT;
    END LOOP;
END
$$;
-- +goose StatementEnd

-- +goose Down
-- The body of 00067.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.hook_status(p_member_pubkey text, p_session_id text, p_pid int, p_cwd text,
                                       p_status text, p_fresh_seconds float8, p_ns text, p_release int,
                                       p_signature text, p_sig_expires timestamptz)
RETURNS TABLE (presence_id text, pending boolean, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    ids text[];
    t text;
    attempt int;
BEGIN
    -- A signed hook proves its key, not that the key is anyone's: a key of no live member
    -- matches no session, so nothing is written for it (no seen signature, no pending signal)
    -- and no row comes back, which the broker answers 403. Replicas of the previous release
    -- read no row as "pending".
    IF p_member_pubkey <> '' AND NOT EXISTS (
        SELECT 1 FROM claudemesh.member m WHERE m.pubkey = p_member_pubkey AND m.revoked_at IS NULL) THEN
        RETURN;
    END IF;
    replayed := false;
    IF p_signature <> '' THEN
        INSERT INTO claudemesh.seen_signature (signature, expires_at) VALUES (p_signature, p_sig_expires)
        ON CONFLICT (signature) DO NOTHING;
        IF NOT FOUND THEN
            replayed := true;
            pending := false;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    -- By sessionId, else pid and cwd, else the cwd's newest session, a connected one before one
    -- in its reconnect grace (00053). Finding none, the hook waits for the hellos in its cwd
    -- still running (each holds the cwd's lock shared until it commits, see hello) and looks
    -- again: a signal stored while a hello that had already looked for it was running would be
    -- lost, and the session would start idle under a hook that said working.
    FOR attempt IN 1 .. 2 LOOP
        WITH mine AS NOT MATERIALIZED (
            SELECT x.id, x.session_id, x.pid, x.cwd, x.connected_at, x.grace_until FROM claudemesh.presence x
            -- member_pubkey is never NULL; saying so lets the lookup by sessionId use
            -- presence_live_session_id, signed or not, in a generic plan too.
            WHERE x.ended_at IS NULL AND x.member_pubkey IS NOT NULL
              AND (p_member_pubkey = '' OR x.member_pubkey = p_member_pubkey)
        ), by_session AS (
            SELECT id FROM mine WHERE p_session_id <> '' AND session_id = p_session_id
        ), by_pid AS (
            SELECT id FROM mine
            WHERE NOT EXISTS (SELECT 1 FROM by_session) AND p_pid <> 0 AND pid = p_pid AND cwd = p_cwd
        ), by_cwd AS (
            SELECT id FROM mine
            WHERE NOT EXISTS (SELECT 1 FROM by_session) AND NOT EXISTS (SELECT 1 FROM by_pid) AND cwd = p_cwd
            ORDER BY grace_until IS NULL DESC, connected_at DESC LIMIT 1
        )
        SELECT array_agg(id) INTO ids FROM (
            SELECT id FROM by_session UNION ALL SELECT id FROM by_pid UNION ALL SELECT id FROM by_cwd) u;
        EXIT WHEN ids IS NOT NULL OR attempt = 2;
        -- The member's key and the cwd, as the hellos hold them: a hook waits only for hellos
        -- that could take its signal, not for every tenant's in a common directory.
        PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.pending_status:' || p_member_pubkey || ':' || p_cwd, 0));
        -- By sessionId a hook finds its session whatever cwd either names, so it waits for the
        -- hellos of that sessionId too (always after the cwd's: no two hooks wait in a cycle).
        IF p_session_id <> '' THEN
            PERFORM pg_advisory_xact_lock(
                hashtextextended('claudemesh.pending_status.session:' || p_member_pubkey || ':' || p_session_id, 0));
        END IF;
    END LOOP;
    IF ids IS NULL THEN
        INSERT INTO claudemesh.pending_status (cwd, pid, session_id, status, member_pubkey, expires_at)
        VALUES (p_cwd, nullif(p_pid, 0), nullif(p_session_id, ''), p_status, nullif(p_member_pubkey, ''),
                now() + interval '10 seconds');
        presence_id := NULL;
        pending := true;
        RETURN NEXT;
        RETURN;
    END IF;
    pending := false;
    FOREACH t IN ARRAY ids LOOP
        presence_id := t;
        -- dnd (which hooks never change) or a fresher source: no change, still a match.
        PERFORM claudemesh.apply_status(t, p_status, 'hook', p_fresh_seconds, p_ns, p_release);
        RETURN NEXT;
    END LOOP;
END
$$;
-- +goose StatementEnd
