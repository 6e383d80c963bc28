-- name: ExpireWorking :many
-- The working-TTL sweep for this node's sessions: stuck in working too long flips to idle.
UPDATE claudemesh.presence p
SET status = 'idle', status_source = 'inferred', status_at = now()
WHERE p.node_id = @node_id AND p.ended_at IS NULL AND p.status = 'working'
  AND p.status_at < now() - make_interval(secs => @ttl_seconds::float8)
RETURNING p.id, p.mesh_id, p.member_id, p.member_pubkey, p.session_pubkey, p.display_name, p.node_id,
    p.status, p.session_id;

-- name: DeleteExpiredPendingStatus :exec
DELETE FROM claudemesh.pending_status WHERE expires_at <= now();
