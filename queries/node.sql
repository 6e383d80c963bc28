-- name: NodeRegister :one
-- The row as it was: held by another live process (another instance, neither stopped nor
-- dead) is worth a warning, as its id is shared or it has just crashed.
WITH prev AS (
    SELECT n.instance, n.heartbeat_at FROM claudemesh.node n
    WHERE n.id = @id AND n.stopped_at IS NULL AND n.dead_at IS NULL
      AND n.instance IS DISTINCT FROM sqlc.arg(instance)::text
), reg AS (
    INSERT INTO claudemesh.node (id, region, address, version, instance)
    VALUES (@id, @region, @address, @version, sqlc.arg(instance)::text)
    ON CONFLICT (id) DO UPDATE
    SET region = EXCLUDED.region, address = EXCLUDED.address, version = EXCLUDED.version,
        instance = EXCLUDED.instance, started_at = now(), heartbeat_at = now(), stopped_at = NULL, dead_at = NULL
    RETURNING id
)
SELECT coalesce((SELECT prev.instance FROM prev), '')::text AS prev_instance,
       coalesce((SELECT extract(epoch FROM now() - prev.heartbeat_at) FROM prev), -1)::float8 AS prev_heartbeat_age_seconds
FROM reg;

-- name: NodeHeartbeat :one
-- No row when another replica declared this node dead, so it re-registers; or when another
-- process registered under this node's id since (NodeHolder tells which).
UPDATE claudemesh.node n SET heartbeat_at = now()
WHERE n.id = @id AND n.stopped_at IS NULL AND n.dead_at IS NULL
  AND n.instance IS NOT DISTINCT FROM sqlc.arg(instance)::text
RETURNING true AS alive;

-- name: NodeHolder :one
-- Its own statement, after a heartbeat that matched nothing: one that waited for another
-- process's registration reads the row as it was before it (its snapshot), not as it is.
SELECT coalesce(n.instance, '')::text AS holder FROM claudemesh.node n WHERE n.id = @id;

-- name: NodeStop :exec
-- Only this process's registration: one that another process has since taken is not stopped.
UPDATE claudemesh.node n SET stopped_at = now()
WHERE n.id = @id AND n.stopped_at IS NULL AND n.instance IS NOT DISTINCT FROM sqlc.arg(instance)::text;

-- name: MarkDeadNodes :many
-- Nodes silent past the deadline. Only one replica's UPDATE wins per node: idempotent.
-- A stopped node only when something is left on it: a stop whose last writes failed (its
-- sessions' ends, a hello that committed as it stopped) leaves presences live on it, or pushes
-- held for them, that only this reclaims. A clean stop leaves nothing, and is not a death.
UPDATE claudemesh.node n SET dead_at = now()
WHERE n.dead_at IS NULL
  AND (n.stopped_at IS NULL
       OR EXISTS (SELECT 1 FROM claudemesh.presence x WHERE x.node_id = n.id AND x.ended_at IS NULL)
       OR EXISTS (SELECT 1 FROM claudemesh.delivery d WHERE d.pushed_node = n.id AND d.state IN ('assigned', 'pushed')))
  AND n.heartbeat_at < now() - make_interval(secs => @dead_after_seconds::float8)
RETURNING n.id, n.heartbeat_at;

-- name: GraceDeadNodesPresences :exec
-- Dead nodes' sockets are gone: their live presences enter their reconnect grace, counted from
-- the node's last heartbeat (when its sockets were last known to be alive). Every dead node at
-- every check, so this converges: a presence a concurrent hello holds (moving it to another
-- node) is skipped, not waited for (a hello batch locks its presences in its own order, and
-- waiting here deadlocked with it in reconnect storms), and is graced at the next check if it
-- is still on the dead node. Only what the node held when it was declared dead: a node declared
-- dead while it still runs (a late heartbeat under load) keeps serving until it re-registers,
-- and what it takes on meanwhile is not taken from it. Rows are probed per dead node (LATERAL, by the index on their node: nothing
-- to read when no node is dead) and taken by ctid: plans that cannot turn into a scan of the
-- table, whatever the statistics.
UPDATE claudemesh.presence p SET grace_until = n.heartbeat_at + make_interval(secs => @grace_seconds::float8)
FROM claudemesh.node n
WHERE p.ctid = ANY (ARRAY(
        SELECT x.ctid FROM claudemesh.node d CROSS JOIN LATERAL (
            SELECT x.ctid FROM claudemesh.presence x
            WHERE x.node_id = d.id AND x.ended_at IS NULL AND x.grace_until IS NULL
              AND x.last_seen_at <= d.dead_at
            FOR UPDATE OF x SKIP LOCKED) x
        WHERE d.dead_at IS NOT NULL))
  AND n.id = p.node_id AND p.ended_at IS NULL AND p.grace_until IS NULL;

-- name: ReleaseDeadNodesPushes :many
-- Unacked pushes of dead nodes go back to pending for the recipients' next connection; as
-- above, every dead node at every check, skipping rows a concurrent statement holds, and only
-- pushes made before the node was declared dead.
UPDATE claudemesh.delivery d SET state = 'pending', pushed_node = NULL, pushed_presence = NULL, pushed_at = NULL
WHERE d.ctid = ANY (ARRAY(
        SELECT x.ctid FROM claudemesh.node n CROSS JOIN LATERAL (
            SELECT x.ctid FROM claudemesh.delivery x
            WHERE x.pushed_node = n.id AND x.state IN ('assigned', 'pushed') AND x.pushed_at <= n.dead_at
            FOR UPDATE OF x SKIP LOCKED) x
        WHERE n.dead_at IS NOT NULL))
  AND d.state IN ('assigned', 'pushed')
RETURNING d.recipient_member_id;

-- name: RefreshStatistics :one
-- Analyzes the tables that outgrew their statistics (migration 00021) and names them; one
-- replica at a time, the others get an empty list.
SELECT claudemesh.refresh_statistics(@tables::text[], @min_rows::bigint, @growth::float8)::text[] AS analyzed;

-- name: DeleteGoneNodes :execrows
-- Every start of a replica with a generated id adds a node row, and every check above probes
-- each dead one: rows of nodes stopped or declared dead long ago go, once nothing live names
-- them (no live presence, no push held). A node that still runs after all re-registers at
-- its next heartbeat (NodeHeartbeat finds no row).
DELETE FROM claudemesh.node n
WHERE coalesce(n.stopped_at, n.dead_at) < now() - make_interval(secs => @gone_seconds::float8)
  AND n.heartbeat_at < now() - make_interval(secs => @gone_seconds::float8)
  AND NOT EXISTS (SELECT 1 FROM claudemesh.presence p WHERE p.node_id = n.id AND p.ended_at IS NULL)
  AND NOT EXISTS (SELECT 1 FROM claudemesh.delivery d
                  WHERE d.pushed_node = n.id AND d.state IN ('assigned', 'pushed'));
