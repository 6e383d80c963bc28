-- Read-only queries behind the admin status page (/status). They run in one read-only
-- snapshot per page view; every list is capped so a large cluster still renders quickly.

-- name: StatusNodes :many
-- Live nodes, plus nodes stopped or declared dead within the last @recent_seconds (so an
-- operator sees what just left). Ages are computed by Postgres, the one shared clock.
SELECT n.id, n.region, n.version, n.started_at, n.stopped_at, n.dead_at,
    extract(epoch FROM now() - n.heartbeat_at)::float8 AS heartbeat_age_seconds,
    (SELECT count(*) FROM claudemesh.presence p
        WHERE p.node_id = n.id AND p.ended_at IS NULL AND p.grace_until IS NULL) AS sessions,
    (SELECT count(*) FROM claudemesh.presence p
        WHERE p.node_id = n.id AND p.ended_at IS NULL AND p.grace_until IS NOT NULL) AS grace_sessions
FROM claudemesh.node n
WHERE (n.stopped_at IS NULL AND n.dead_at IS NULL)
   OR coalesce(n.dead_at, n.stopped_at) > now() - make_interval(secs => @recent_seconds::float8)
ORDER BY (n.stopped_at IS NULL AND n.dead_at IS NULL) DESC, n.started_at, n.id
LIMIT @max_nodes;

-- name: StatusMeshes :many
-- Meshes with at least one live presence (connected or in its reconnect grace), busiest first.
SELECT m.id, m.slug, m.name,
    count(*) FILTER (WHERE p.grace_until IS NULL) AS live_sessions,
    count(*) FILTER (WHERE p.grace_until IS NOT NULL) AS grace_sessions,
    count(DISTINCT p.member_id) AS live_members,
    (SELECT count(*) FROM claudemesh.member mm WHERE mm.mesh_id = m.id AND mm.revoked_at IS NULL) AS members
FROM claudemesh.mesh m
JOIN claudemesh.presence p ON p.mesh_id = m.id AND p.ended_at IS NULL
GROUP BY m.id, m.slug, m.name
ORDER BY live_sessions DESC, m.slug
LIMIT @max_meshes;

-- name: StatusMeshCount :one
-- How many meshes have live presences (the page lists at most max_meshes of them).
SELECT count(DISTINCT mesh_id) FROM claudemesh.presence WHERE ended_at IS NULL;

-- name: StatusPeers :many
-- The first @per_mesh live presences of each listed mesh. Keys leave the database as short
-- prefixes only: the page never needs (or shows) a whole key.
SELECT x.mesh_id, x.display_name, left(x.member_pubkey, 8)::text AS member_key_prefix,
    x.node_id, x.status, x.status_source, x.in_grace::boolean AS in_grace,
    extract(epoch FROM now() - x.connected_at)::float8 AS connected_seconds
FROM (
    SELECT p.mesh_id, p.display_name, p.member_pubkey, p.node_id, p.status, p.status_source,
        p.connected_at, p.grace_until IS NOT NULL AS in_grace,
        row_number() OVER (PARTITION BY p.mesh_id ORDER BY p.connected_at, p.id) AS rn
    FROM claudemesh.presence p
    WHERE p.ended_at IS NULL AND p.mesh_id = ANY(@mesh_ids::text[])
) x
WHERE x.rn <= @per_mesh::bigint
ORDER BY x.mesh_id, x.connected_at;

-- name: StatusDeliveries :one
-- Unacknowledged deliveries cluster-wide, by state, and how long the oldest has waited.
SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
    count(*) FILTER (WHERE state = 'pushed') AS pushed,
    coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_seconds
FROM claudemesh.delivery
WHERE state IN ('pending', 'pushed');
