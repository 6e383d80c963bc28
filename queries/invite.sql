-- name: InviteInsert :one
-- No row when the token exists: the caller re-signs with another expiry (see CreateInvite).
INSERT INTO claudemesh.invite (mesh_id, token, payload, role, max_uses, expires_at)
VALUES (@mesh_id, @token, @payload, @role, @max_uses, @expires_at)
ON CONFLICT (token) DO NOTHING
RETURNING *;

-- name: InviteByToken :one
-- expired is computed by Postgres so every replica judges expiry by one clock.
SELECT sqlc.embed(invite), (invite.expires_at <= now())::boolean AS expired
FROM claudemesh.invite invite
WHERE invite.token = @token;

-- name: InviteForUpdate :one
SELECT * FROM claudemesh.invite
WHERE (token = sqlc.narg(token) OR id = sqlc.narg(id))
FOR UPDATE;

-- name: InviteClaim :one
-- Takes one use atomically: concurrent joins on the last use race on this row lock and
-- exactly one of them sees used_count < max_uses.
UPDATE claudemesh.invite
SET used_count = used_count + 1
WHERE id = @id AND used_count < max_uses AND revoked_at IS NULL AND expires_at > now()
RETURNING *;

-- name: InviteRevoke :one
UPDATE claudemesh.invite SET revoked_at = now()
WHERE id = @id AND revoked_at IS NULL
RETURNING *;
