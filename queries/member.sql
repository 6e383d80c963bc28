-- name: MemberInsert :one
INSERT INTO claudemesh.member (mesh_id, pubkey, display_name, role, invite_id)
VALUES (@mesh_id, @pubkey, @display_name, @role, sqlc.narg(invite_id))
RETURNING *;

-- name: MemberLiveByPubkey :one
SELECT * FROM claudemesh.member
WHERE mesh_id = @mesh_id AND pubkey = @pubkey AND revoked_at IS NULL;

-- name: MemberList :many
-- Revoked members stay listed (with revoked_at) so an operator sees the record.
SELECT * FROM claudemesh.member
WHERE mesh_id = @mesh_id
ORDER BY created_at, id;

-- name: MemberRevoke :one
-- The operator's revocation: no admin's unban undoes it (migration 00052).
UPDATE claudemesh.member SET revoked_at = now(), revoked_by = 'operator'
WHERE mesh_id = @mesh_id AND pubkey = @pubkey AND revoked_at IS NULL
RETURNING *;

-- name: LockMeshHellos :exec
-- The lock a hello takes around its capacity and membership checks (claudemesh.hello): a
-- revocation holding it until it commits can't be raced by a hello already past its checks.
SELECT pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || @mesh_id::text, 0));

-- name: SessionKeyBound :one
-- Whether pubkey is the session key of another member's session in the mesh: such a key never
-- becomes a member's (sends to it would reach the new member, not the session). A member that
-- used its own key as its session key may still be added again after a revocation.
SELECT EXISTS (SELECT 1 FROM claudemesh.session_key k JOIN claudemesh.member m ON m.id = k.member_id
               WHERE k.mesh_id = @mesh_id AND k.session_pubkey = @pubkey AND m.pubkey <> @pubkey) AS bound;

-- name: MemberRevokedByPubkey :one
-- Who revoked the key's latest member row in the mesh ('operator', 'owner', 'admin'; NULL for
-- revocations older than 00052); no row when the key was never revoked there.
SELECT revoked_by FROM claudemesh.member
WHERE mesh_id = @mesh_id AND pubkey = @pubkey AND revoked_at IS NOT NULL
ORDER BY revoked_at DESC, created_at DESC LIMIT 1;

-- name: SessionKeysReadmit :exec
-- A key readmitted as a new member row takes over the session keys bound to its earlier
-- (revoked) rows: the same member key proved them. Left on a revoked row, they made the
-- readmitted member's hellos presenting them session_key_taken and sends to them no_recipient.
UPDATE claudemesh.session_key k SET member_id = @member_id
FROM claudemesh.member r
WHERE k.mesh_id = @mesh_id AND k.member_id = r.id
  AND r.mesh_id = @mesh_id AND r.pubkey = @pubkey AND r.id <> @member_id;

-- name: RevokeMemberInOneStatement :one
-- The operator's revocation, its sessions' end and its audit entry in one statement, holding
-- the mesh's hello lock for its server time only (migration 00061). No row: no live member.
SELECT * FROM claudemesh.revoke_member(@ns::text, @mesh_id::text, @pubkey::text);
