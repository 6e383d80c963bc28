-- +goose NO TRANSACTION
-- +goose Up
-- A signed hook is answered only for the key of a live member (of any mesh). Before, any fresh
-- ed25519 key signed a valid hook: each one recorded its signature and, matching no session, a
-- pending signal, a write per request that anyone could send (and a fresh rate allowance per
-- key). hook_status now looks the key up first and writes nothing for a key no live member
-- holds. Same arguments and result columns: a replica of the previous release keeps working.
--
-- The lookup is by key alone (a hook names no mesh); member's indexes lead with mesh_id, so it
-- gets its own, over live members only. Built concurrently: a plain CREATE INDEX would block
-- joins for as long as the build of a large member table takes. A build that stopped part way
-- leaves an invalid index under the name: dropped first.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.member_live_by_key;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY member_live_by_key ON claudemesh.member (pubkey) WHERE revoked_at IS NULL;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.hook_status(p_member_pubkey text, p_session_id text, p_pid int, p_cwd text,
                                       p_status text, p_fresh_seconds float8, p_ns text, p_release int,
                                       p_signature text, p_sig_expires timestamptz)
RETURNS TABLE (presence_id text, pending boolean, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    ids text[];
    t text;
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
    WITH mine AS NOT MATERIALIZED (
        SELECT x.id, x.session_id, x.pid, x.cwd, x.connected_at FROM claudemesh.presence x
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
        ORDER BY connected_at DESC LIMIT 1
    )
    SELECT array_agg(id) INTO ids FROM (
        SELECT id FROM by_session UNION ALL SELECT id FROM by_pid UNION ALL SELECT id FROM by_cwd) u;
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
-- hook_status as 00026 left it.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.hook_status(p_member_pubkey text, p_session_id text, p_pid int, p_cwd text,
                                       p_status text, p_fresh_seconds float8, p_ns text, p_release int,
                                       p_signature text, p_sig_expires timestamptz)
RETURNS TABLE (presence_id text, pending boolean, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    ids text[];
    t text;
BEGIN
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
    WITH mine AS NOT MATERIALIZED (
        SELECT x.id, x.session_id, x.pid, x.cwd, x.connected_at FROM claudemesh.presence x
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
        ORDER BY connected_at DESC LIMIT 1
    )
    SELECT array_agg(id) INTO ids FROM (
        SELECT id FROM by_session UNION ALL SELECT id FROM by_pid UNION ALL SELECT id FROM by_cwd) u;
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
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.member_live_by_key;
-- +goose StatementEnd
