-- name: GetState :one
SELECT mesh_id, key, value, updated_by, updated_at FROM claudemesh.state WHERE mesh_id = @mesh_id AND key = @key;

-- name: ListState :many
-- Bounded by the quotas; the limit guards against entries stored before them.
SELECT mesh_id, key, value, updated_by, updated_at, size FROM claudemesh.state WHERE mesh_id = @mesh_id
ORDER BY key LIMIT @max_keys;
