-- name: AuditHeadsLock :many
-- Creates missing heads at the genesis value and locks every head in one statement: the
-- no-op DO UPDATE takes the row lock and returns the current values. Rows are taken in array
-- order, which the caller sorts bytewise, so two transactions appending to overlapping meshes
-- lock in one order and can never deadlock.
INSERT INTO claudemesh.audit_head (mesh_id, seq, hash)
SELECT u.mesh_id, 0, @genesis::text
FROM unnest(@mesh_ids::text[]) WITH ORDINALITY AS u(mesh_id, ord)
ORDER BY u.ord
ON CONFLICT (mesh_id) DO UPDATE SET seq = claudemesh.audit_head.seq
RETURNING mesh_id, seq, hash;

-- name: AuditAppend :exec
-- The whole batch's entries and the new heads in one statement. The parallel unnests zip the
-- arrays (all of one length) into rows.
WITH ins AS (
    INSERT INTO claudemesh.audit (mesh_id, seq, event_type, actor, data, ts_micros, prev_hash, hash)
    SELECT unnest(@mesh_ids::text[]),
           unnest(@seqs::bigint[]),
           unnest(@event_types::text[]),
           unnest(@actors::text[]),
           unnest(@datas::text[])::jsonb,
           unnest(@ts_micros::bigint[]),
           unnest(@prev_hashes::text[]),
           unnest(@hashes::text[])
)
UPDATE claudemesh.audit_head h
SET seq = u.seq, hash = u.hash
FROM (SELECT unnest(@head_mesh_ids::text[]) AS mesh_id,
             unnest(@head_seqs::bigint[]) AS seq,
             unnest(@head_hashes::text[]) AS hash) u
WHERE h.mesh_id = u.mesh_id;

-- name: AuditHead :one
SELECT mesh_id, seq, hash FROM claudemesh.audit_head WHERE mesh_id = @mesh_id;

-- name: AuditPage :many
SELECT * FROM claudemesh.audit
WHERE mesh_id = @mesh_id AND seq > @after_seq
ORDER BY seq
LIMIT @page_size;

-- name: AuditTail :many
SELECT t.* FROM (
    SELECT * FROM claudemesh.audit
    WHERE mesh_id = @mesh_id
    ORDER BY seq DESC
    LIMIT @n
) t
ORDER BY t.seq;
