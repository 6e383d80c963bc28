-- name: SetState :one
-- Stores a key's value if the mesh stays within its quotas (keys, and bytes of keys plus
-- values as stored); no row means a quota would be exceeded. The check reads the statement's
-- snapshot, so concurrent writers on several replicas can overshoot by one value each.
WITH cur AS (
    SELECT count(*) AS keys, COALESCE(sum(size), 0)::bigint AS bytes,
        COALESCE(sum(size) FILTER (WHERE key = @key), 0)::bigint AS old_size,
        COALESCE(bool_or(key = @key), false) AS present
    FROM claudemesh.state WHERE mesh_id = @mesh_id
)
INSERT INTO claudemesh.state (mesh_id, key, value, updated_by, updated_at)
SELECT @mesh_id, @key, @value, @updated_by, now() FROM cur
WHERE (cur.present OR cur.keys < @max_keys::bigint)
  AND cur.bytes - cur.old_size + octet_length(@key) + octet_length((@value::jsonb)::text) <= @max_bytes::bigint
ON CONFLICT (mesh_id, key) DO UPDATE SET value = EXCLUDED.value, updated_by = EXCLUDED.updated_by, updated_at = now()
RETURNING mesh_id, key, value, updated_by, updated_at;

-- name: GetState :one
SELECT mesh_id, key, value, updated_by, updated_at FROM claudemesh.state WHERE mesh_id = @mesh_id AND key = @key;

-- name: ListState :many
-- Bounded by the quotas; the limit guards against entries stored before them.
SELECT mesh_id, key, value, updated_by, updated_at, size FROM claudemesh.state WHERE mesh_id = @mesh_id
ORDER BY key LIMIT @max_keys;
