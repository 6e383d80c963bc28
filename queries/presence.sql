-- name: ListLivePresence :many
SELECT * FROM claudemesh.presence WHERE mesh_id = @mesh_id AND ended_at IS NULL ORDER BY connected_at, id;

-- name: NodePresenceStatus :many
-- This node's live presences, the epoch of the socket each belongs to, and whether its member
-- was revoked since (the resync closes local sockets that are no longer theirs).
SELECT x.id, x.status, x.epoch, EXISTS (
        SELECT 1 FROM claudemesh.member m WHERE m.id = x.member_id AND m.revoked_at IS NOT NULL) AS revoked
FROM claudemesh.presence x
WHERE x.node_id = @node_id AND x.ended_at IS NULL;

-- name: PresenceByID :one
SELECT * FROM claudemesh.presence WHERE id = @id;

-- name: SetPresenceSummary :exec
UPDATE claudemesh.presence SET summary = @summary WHERE id = @id AND ended_at IS NULL;

-- name: SetPresenceGroups :exec
UPDATE claudemesh.presence SET groups = @groups WHERE id = @id AND ended_at IS NULL;

-- name: OrphanPresences :many
-- Presences this node owns with no grace, last seen a while ago: the reconcile compares them
-- with the node's live sessions (a just-registered one is younger than the margin).
SELECT id, epoch FROM claudemesh.presence
WHERE node_id = @node_id AND ended_at IS NULL AND grace_until IS NULL
  AND last_seen_at < now() - interval '30 seconds';

-- name: EndExpiredGrace :many
-- Presences whose grace ran out, on this node or on a node that is gone.
UPDATE claudemesh.presence p SET ended_at = now(), grace_until = NULL
WHERE p.ended_at IS NULL AND p.grace_until IS NOT NULL AND p.grace_until <= now()
RETURNING p.id, p.mesh_id, p.member_id, p.member_pubkey, p.session_pubkey, p.display_name, p.session_id, p.node_id;

-- name: ReleaseHeld :exec
-- What is assigned or pushed to these presences goes back to pending, every replica woken for
-- the members (release_held). For presences whose grace ran out: a send that read one while
-- its node was being taken over assigned a row to it after the take-over released the node's
-- pushes, and nothing else would release that row (the node is gone).
SELECT claudemesh.release_held(@ns::text, @ids::text[]);

-- name: DeleteExpiredSignatures :execrows
DELETE FROM claudemesh.seen_signature WHERE expires_at < now();

-- name: DeleteEndedPresences :execrows
-- A page of presences ended before @ended_before_seconds ago (found by the index of migration
-- 00023, deleted by row address: no scan of the live ones). Rows another replica is deleting
-- are skipped, so replicas prune side by side.
DELETE FROM claudemesh.presence
WHERE ctid = ANY (ARRAY(
    SELECT p.ctid FROM claudemesh.presence p
    WHERE p.ended_at < now() - make_interval(secs => @ended_before_seconds::float8)
    LIMIT @page_size::int FOR UPDATE SKIP LOCKED))
  AND ended_at < now() - make_interval(secs => @ended_before_seconds::float8);

-- name: PresenceChangesSince :many
-- What a replica catching up on lost system events tells its sessions (migration 00065).
SELECT c.mesh_id::text AS mesh_id, c.presence_id::text AS presence_id, c.member_id::text AS member_id,
    c.pubkey::text AS pubkey, c.display_name::text AS display_name, c.status::text AS status,
    c.connected_at::timestamptz AS connected_at, c.ended::boolean AS ended, c.at::timestamptz AS at
FROM claudemesh.presence_changes_since(@mesh_ids::text[], @since::timestamptz, @per_mesh::int) c;
