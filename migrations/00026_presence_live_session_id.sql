-- +goose NO TRANSACTION
-- +goose Up
-- A hook names its session by sessionId (and, signed, its member key), with no mesh:
-- claudemesh.hook_status found it by reading every presence row, live or ended (2.5 ms at 6,400
-- sessions), or every live entry of an index led by mesh. This index finds it directly.
--
-- Its predicate names both columns: a query must compare session_id and say member_pubkey is
-- not NULL to use it. A hello's capacity count says neither: its NOT (session_id = .. AND
-- member_pubkey = ..) becomes an OR, each arm of which proves one column not NULL, and with an
-- index on session_id alone the planner could walk that index whole for one arm (a bitmap OR)
-- while presence has no statistics, the walk 00025 removed. hook_status says it (its body is
-- 00005's otherwise). Built concurrently: presence is written at hello rate.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_session_id;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_session_id ON claudemesh.presence (session_id, member_pubkey)
    WHERE ended_at IS NULL AND session_id IS NOT NULL AND member_pubkey IS NOT NULL;
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
-- hook_status keeps the body above: the same sessions, the same results.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_session_id;
-- +goose StatementEnd
