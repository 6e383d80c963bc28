-- name: AuditHeadsEnsure :exec
-- Creates missing heads at the genesis value. Rows are inserted in array order, which the
-- caller sorts, so replicas creating the same heads wait on each other in one order.
INSERT INTO claudemesh.audit_head (mesh_id, seq, hash)
SELECT u.mesh_id, 0, @genesis::text
FROM unnest(@mesh_ids::text[]) WITH ORDINALITY AS u(mesh_id, ord)
ORDER BY u.ord
ON CONFLICT (mesh_id) DO NOTHING;

-- name: AuditHeadsLock :many
-- Locks heads in a collation-independent order (the caller sorts bytewise too), so two
-- transactions appending to overlapping meshes can never deadlock.
SELECT mesh_id, seq, hash FROM claudemesh.audit_head
WHERE mesh_id = ANY(@mesh_ids::text[])
ORDER BY mesh_id COLLATE "C"
FOR UPDATE;

-- name: AuditHeadsUpdate :exec
UPDATE claudemesh.audit_head h
SET seq = u.seq, hash = u.hash
FROM (SELECT unnest(@mesh_ids::text[]) AS mesh_id,
             unnest(@seqs::bigint[]) AS seq,
             unnest(@hashes::text[]) AS hash) u
WHERE h.mesh_id = u.mesh_id;

-- name: AuditInsertBatch :exec
-- One statement for the whole batch: the send path appends one entry per envelope. The
-- parallel unnests zip the arrays (all of one length) into rows.
INSERT INTO claudemesh.audit (mesh_id, seq, event_type, actor, data, ts_micros, prev_hash, hash)
SELECT unnest(@mesh_ids::text[]),
       unnest(@seqs::bigint[]),
       unnest(@event_types::text[]),
       unnest(@actors::text[]),
       unnest(@datas::text[])::jsonb,
       unnest(@ts_micros::bigint[]),
       unnest(@prev_hashes::text[]),
       unnest(@hashes::text[]);

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
