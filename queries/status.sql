-- name: ApplyStatus :one
-- The status model in one statement: dnd is changed only by the peer itself (manual); a hook
-- never touches dnd; a lower-rank source does not override a fresh higher-rank one.
UPDATE claudemesh.presence p
SET status = @status, status_source = @source, status_at = now()
WHERE p.id = @id AND p.ended_at IS NULL
  AND (@source::text = 'manual' OR p.status <> 'dnd')
  AND NOT (@source::text <> 'hook' AND @status::text <> 'dnd' AND p.status <> 'dnd' AND p.status_source = 'hook'
           AND p.status_at > now() - make_interval(secs => @fresh_seconds::float8))
  AND NOT (@source::text = 'inferred' AND p.status_source = 'manual'
           AND p.status_at > now() - make_interval(secs => @fresh_seconds::float8))
RETURNING p.id, p.mesh_id, p.member_id, p.member_pubkey, p.session_pubkey, p.display_name, p.node_id,
    p.status, p.session_id;

-- name: ExpireWorking :many
-- The working-TTL sweep for this node's sessions: stuck in working too long flips to idle.
UPDATE claudemesh.presence p
SET status = 'idle', status_source = 'inferred', status_at = now()
WHERE p.node_id = @node_id AND p.ended_at IS NULL AND p.status = 'working'
  AND p.status_at < now() - make_interval(secs => @ttl_seconds::float8)
RETURNING p.id, p.mesh_id, p.member_id, p.member_pubkey, p.session_pubkey, p.display_name, p.node_id,
    p.status, p.session_id;

-- name: HookTargets :many
-- Resolution order for a hook: the live session with that session id, else the one with that
-- pid + cwd, else the newest with that cwd. All meshes the session is in are affected. A
-- signed hook (member_pubkey set) reaches only that member's sessions.
WITH mine AS NOT MATERIALIZED (
    SELECT id, session_id, pid, cwd, connected_at FROM claudemesh.presence
    WHERE ended_at IS NULL AND (@member_pubkey::text = '' OR member_pubkey = @member_pubkey::text)
), by_session AS (
    SELECT id FROM mine
    WHERE @session_id::text <> '' AND session_id = @session_id::text
), by_pid AS (
    SELECT id FROM mine
    WHERE NOT EXISTS (SELECT 1 FROM by_session) AND @pid::int <> 0 AND pid = @pid::int AND cwd = @cwd::text
), by_cwd AS (
    SELECT id FROM mine
    WHERE NOT EXISTS (SELECT 1 FROM by_session) AND NOT EXISTS (SELECT 1 FROM by_pid)
      AND cwd = @cwd::text
    ORDER BY connected_at DESC LIMIT 1
)
SELECT id FROM by_session UNION ALL SELECT id FROM by_pid UNION ALL SELECT id FROM by_cwd;

-- name: InsertPendingStatus :exec
INSERT INTO claudemesh.pending_status (cwd, pid, session_id, status, member_pubkey, expires_at)
VALUES (@cwd, @pid, @session_id, @status, @member_pubkey, now() + interval '10 seconds');

-- name: TakePendingStatus :one
-- A hook signal that arrived before this session's hello, matched like a hook would be.
DELETE FROM claudemesh.pending_status
WHERE id = (
    SELECT id FROM claudemesh.pending_status
    WHERE expires_at > now() AND (member_pubkey IS NULL OR member_pubkey = @member_pubkey::text)
      AND ((session_id IS NOT NULL AND session_id = @session_id::text)
           OR (session_id IS NULL AND pid IS NOT NULL AND pid = @pid::int AND cwd = @cwd::text)
           OR (session_id IS NULL AND pid IS NULL AND cwd = @cwd::text))
    ORDER BY created_at DESC LIMIT 1)
RETURNING status;

-- name: DeleteExpiredPendingStatus :exec
DELETE FROM claudemesh.pending_status WHERE expires_at <= now();
