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

-- name: MarkDeadNodes :many
-- Nodes silent past the deadline. Only one replica's UPDATE wins per node: idempotent.
UPDATE claudemesh.node SET dead_at = now()
WHERE stopped_at IS NULL AND dead_at IS NULL
  AND heartbeat_at < now() - make_interval(secs => @dead_after_seconds::float8)
RETURNING id, heartbeat_at;

-- name: GraceDeadNodePresence :exec
-- A dead node's sockets are gone: its presences enter their reconnect grace, counted from
-- its last heartbeat (when its sockets were last known to be alive).
UPDATE claudemesh.presence SET grace_until = @grace_until
WHERE node_id = @node_id AND ended_at IS NULL AND grace_until IS NULL;

-- name: ReleaseNodePushes :many
-- Unacked pushes of a dead node go back to pending for the recipients' next connection.
UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL, pushed_at = NULL
WHERE state IN ('assigned', 'pushed') AND pushed_node = @node_id
RETURNING mesh_id, recipient_member_id;
