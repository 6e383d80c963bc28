-- name: SetState :one
INSERT INTO claudemesh.state (mesh_id, key, value, updated_by, updated_at)
VALUES (@mesh_id, @key, @value, @updated_by, now())
ON CONFLICT (mesh_id, key) DO UPDATE SET value = EXCLUDED.value, updated_by = EXCLUDED.updated_by, updated_at = now()
RETURNING *;

-- name: GetState :one
SELECT * FROM claudemesh.state WHERE mesh_id = @mesh_id AND key = @key;

-- name: ListState :many
SELECT * FROM claudemesh.state WHERE mesh_id = @mesh_id ORDER BY key;
