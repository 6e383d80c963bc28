-- name: MeshInsert :one
INSERT INTO claudemesh.mesh (slug, name, owner_pubkey, max_peers)
VALUES (@slug, @name, @owner_pubkey, @max_peers)
RETURNING *;

-- name: MeshBySlug :one
SELECT * FROM claudemesh.mesh WHERE slug = @slug;

-- name: MeshByID :one
SELECT * FROM claudemesh.mesh WHERE id = @id;

-- name: MeshList :many
-- Live member counts ride along so `mesh list` is one query.
SELECT m.*,
       (SELECT count(*) FROM claudemesh.member mb
        WHERE mb.mesh_id = m.id AND mb.revoked_at IS NULL)::bigint AS live_members
FROM claudemesh.mesh m
ORDER BY m.created_at, m.slug;
