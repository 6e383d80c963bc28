-- name: MeshForHello :one
SELECT id, max_peers, archived_at FROM claudemesh.mesh WHERE id = @id;

-- name: CountLivePresence :one
-- Sessions in the mesh across the cluster; a reconnect of the same session does not count
-- against the limit it already holds.
SELECT count(*) FROM claudemesh.presence
WHERE mesh_id = @mesh_id AND ended_at IS NULL
  AND NOT (session_id = @session_id AND member_pubkey = @member_pubkey);

-- name: LockMeshHello :exec
-- Serializes hellos of one mesh (not of the cluster) so the capacity check can't be raced.
SELECT pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || @mesh_id::text, 0));

-- name: MemberByPubkey :many
-- Live member first, then revoked ones (hello answers "revoked" only when no live one exists).
SELECT id, display_name, role, revoked_at FROM claudemesh.member
WHERE mesh_id = @mesh_id AND pubkey = @pubkey
ORDER BY revoked_at IS NULL DESC, created_at DESC;

-- name: BindSessionKey :one
-- Binds the session key to the member on first use and returns the member it is bound to. A
-- key that is another member's own key is never bound (it would let a session speak as that
-- member): the owner of that key is returned instead, and the hello refused.
WITH taken AS (
    SELECT m.id AS member_id FROM claudemesh.member m
    WHERE m.mesh_id = @mesh_id AND m.pubkey = @session_pubkey AND m.pubkey <> @member_pubkey
    LIMIT 1
), ins AS (
    INSERT INTO claudemesh.session_key (mesh_id, session_pubkey, member_id)
    SELECT @mesh_id, @session_pubkey, @member_id WHERE NOT EXISTS (SELECT 1 FROM taken)
    ON CONFLICT (mesh_id, session_pubkey) DO NOTHING
    RETURNING member_id
)
SELECT member_id FROM taken
UNION ALL
SELECT member_id FROM ins
UNION ALL
SELECT member_id FROM claudemesh.session_key WHERE mesh_id = @mesh_id AND session_pubkey = @session_pubkey
LIMIT 1;

-- name: UpsertPresence :one
-- Registers a session in one statement: a new presence, or the take-over of the member's live
-- presence with the same session id (a reconnect or a replacement), returning the node and
-- grace it had. A hook status that arrived before the hello applies, except over dnd.
WITH old AS (
    SELECT p.id, p.node_id, p.grace_until FROM claudemesh.presence p
    WHERE p.mesh_id = @mesh_id AND p.member_id = @member_id AND p.session_id = @session_id AND p.ended_at IS NULL
    -- No FOR UPDATE: it would run after the upsert below and see nothing. The statement's
    -- snapshot is current: hellos of a mesh are serialized by LockMeshHello.
), up AS (
    INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, session_pubkey,
        display_name, pid, cwd, groups, capabilities, status, status_source)
    VALUES (@mesh_id, @member_id, @member_pubkey, @node_id, @session_id, @session_pubkey, @display_name,
        @pid, @cwd, @groups, @capabilities, COALESCE(sqlc.narg('hook_status')::text, 'idle'),
        CASE WHEN sqlc.narg('hook_status')::text IS NULL THEN 'manual' ELSE 'hook' END)
    ON CONFLICT (mesh_id, member_id, session_id) WHERE ended_at IS NULL DO UPDATE
    SET node_id = EXCLUDED.node_id, session_pubkey = EXCLUDED.session_pubkey, display_name = EXCLUDED.display_name,
        pid = EXCLUDED.pid, cwd = EXCLUDED.cwd, groups = EXCLUDED.groups, capabilities = EXCLUDED.capabilities,
        last_seen_at = now(), grace_until = NULL, epoch = claudemesh.presence.epoch + 1,
        status = CASE WHEN sqlc.narg('hook_status')::text IS NOT NULL AND claudemesh.presence.status <> 'dnd'
                      THEN sqlc.narg('hook_status')::text ELSE claudemesh.presence.status END,
        status_source = CASE WHEN sqlc.narg('hook_status')::text IS NOT NULL AND claudemesh.presence.status <> 'dnd'
                             THEN 'hook' ELSE claudemesh.presence.status_source END,
        status_at = CASE WHEN sqlc.narg('hook_status')::text IS NOT NULL AND claudemesh.presence.status <> 'dnd'
                         THEN now() ELSE claudemesh.presence.status_at END
    RETURNING id, status, epoch
)
SELECT up.id, up.status, up.epoch, old.node_id AS old_node_id, old.grace_until AS old_grace_until
FROM up LEFT JOIN old ON true;

-- name: ListLivePresence :many
SELECT * FROM claudemesh.presence WHERE mesh_id = @mesh_id AND ended_at IS NULL ORDER BY connected_at, id;

-- name: LivePresenceByMeshes :many
-- Group names come out as an array, so planning a group send parses no JSON.
SELECT id, mesh_id, member_id, node_id, session_id, session_pubkey, status,
    ARRAY(SELECT g->>'name' FROM jsonb_array_elements(groups) g)::text[] AS group_names
FROM claudemesh.presence WHERE mesh_id = ANY(@mesh_ids::text[]) AND ended_at IS NULL;

-- name: LivePresenceByTargets :many
-- The live sessions a batch of direct sends can reach: by member pubkey or by session key,
-- each (mesh, pubkey) pair through an index, never a scan of the mesh's sessions.
SELECT p.id, p.mesh_id, p.member_id, p.node_id, p.session_id, p.session_pubkey, p.status
FROM claudemesh.presence p
JOIN (SELECT DISTINCT unnest(@mesh_ids::text[]) AS mesh_id, unnest(@pubkeys::text[]) AS pubkey) t
  ON p.mesh_id = t.mesh_id AND p.member_pubkey = t.pubkey
WHERE p.ended_at IS NULL
UNION
SELECT p.id, p.mesh_id, p.member_id, p.node_id, p.session_id, p.session_pubkey, p.status
FROM claudemesh.presence p
JOIN (SELECT DISTINCT unnest(@mesh_ids::text[]) AS mesh_id, unnest(@pubkeys::text[]) AS pubkey) t
  ON p.mesh_id = t.mesh_id AND p.session_pubkey = t.pubkey
WHERE p.ended_at IS NULL AND p.session_pubkey IS NOT NULL;

-- name: NodePresenceStatus :many
SELECT id, status, status_source, status_at FROM claudemesh.presence
WHERE node_id = @node_id AND ended_at IS NULL;

-- name: PresenceByID :one
SELECT * FROM claudemesh.presence WHERE id = @id;

-- name: SetPresenceSummary :exec
UPDATE claudemesh.presence SET summary = @summary WHERE id = @id AND ended_at IS NULL;

-- name: SetPresenceGroups :exec
UPDATE claudemesh.presence SET groups = @groups WHERE id = @id AND ended_at IS NULL;

-- name: GracePresences :exec
-- The sockets are gone; the presences stay listed until grace_until and messages queue.
-- Only at the epoch the closed socket registered: a newer socket's presence is left alone.
UPDATE claudemesh.presence p SET grace_until = @grace_until, last_seen_at = now()
FROM (SELECT unnest(@ids::text[]) AS id, unnest(@epochs::bigint[]) AS epoch) c
WHERE p.id = c.id AND p.epoch = c.epoch AND p.node_id = @node_id AND p.ended_at IS NULL;

-- name: EndPresences :many
UPDATE claudemesh.presence p SET ended_at = now(), grace_until = NULL
FROM (SELECT unnest(@ids::text[]) AS id, unnest(@epochs::bigint[]) AS epoch) c
WHERE p.id = c.id AND p.epoch = c.epoch AND p.node_id = @node_id AND p.ended_at IS NULL
RETURNING p.id, p.mesh_id, p.member_id, p.member_pubkey, p.session_pubkey, p.display_name, p.session_id;

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

-- name: ReleasePresencePushes :many
-- Unacked pushes of sessions that went away go back to pending, for their next connection.
UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL, pushed_at = NULL
WHERE state = 'pushed' AND pushed_presence = ANY(@presence_ids::text[])
RETURNING mesh_id, recipient_member_id;

-- name: NodesOfMembers :many
-- Nodes holding live sessions of these members, to direct a wake-up at them.
SELECT DISTINCT node_id, member_id FROM claudemesh.presence
WHERE mesh_id = @mesh_id AND member_id = ANY(@member_ids::text[]) AND ended_at IS NULL;

-- name: ClaimSignature :one
-- Records a signed request's signature; no row means it was seen before (a replay).
INSERT INTO claudemesh.seen_signature (signature, expires_at) VALUES (@signature, @expires_at)
ON CONFLICT (signature) DO NOTHING
RETURNING true AS fresh;

-- name: DeleteExpiredSignatures :execrows
DELETE FROM claudemesh.seen_signature WHERE expires_at < now();
