-- name: NodeRegister :one
INSERT INTO claudemesh.node (id, region, address, version)
VALUES (@id, @region, @address, @version)
ON CONFLICT (id) DO UPDATE
SET region = EXCLUDED.region, address = EXCLUDED.address, version = EXCLUDED.version,
    started_at = now(), heartbeat_at = now(), stopped_at = NULL, dead_at = NULL
RETURNING *;

-- name: NodeHeartbeat :one
-- Returns false when another replica already declared this node dead, so it can re-register.
UPDATE claudemesh.node SET heartbeat_at = now()
WHERE id = @id AND stopped_at IS NULL AND dead_at IS NULL
RETURNING true AS alive;

-- name: NodeStop :exec
UPDATE claudemesh.node SET stopped_at = now() WHERE id = @id AND stopped_at IS NULL;

-- name: NodeList :many
SELECT * FROM claudemesh.node ORDER BY started_at;

-- name: NodeListAlive :many
SELECT * FROM claudemesh.node WHERE stopped_at IS NULL AND dead_at IS NULL ORDER BY started_at;
