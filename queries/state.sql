-- name: GetState :one
SELECT mesh_id, key, value, updated_by, updated_at FROM claudemesh.state WHERE mesh_id = @mesh_id AND key = @key;

-- name: ListState :many
-- Bounded by the quotas; the limit guards against entries stored before them.
SELECT mesh_id, key, value, updated_by, updated_at, size FROM claudemesh.state WHERE mesh_id = @mesh_id
ORDER BY key LIMIT @max_keys;

-- name: StateChangesSince :many
-- What a replica catching up on lost notices tells its sessions (migration 00063).
SELECT c.mesh_id::text AS mesh_id, c.key::text AS key, c.value::jsonb AS value, c.updated_by::text AS updated_by,
    c.presence_id::text AS presence_id, c.at::timestamptz AS at
FROM claudemesh.state_changes_since(@mesh_ids::text[], @since::timestamptz, @per_mesh::int) c;

-- name: DeleteOldStateDeletions :execrows
-- Deletions are kept for the replicas catching up; an hour covers any gap they close.
DELETE FROM claudemesh.state_deleted WHERE deleted_at < now() - make_interval(secs => @kept_seconds::float8);
