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

-- name: SealAudit :one
-- Moves committed pending entries onto their chains (migration 00014); wait says whether to
-- wait for another sealer rather than return 0.
SELECT claudemesh.audit_seal(@max_entries::int, @wait::boolean)::int AS sealed;

-- name: AuditPendingStats :one
-- Entries recorded and not yet chained, cluster-wide, and how long the oldest has waited (0
-- when none): sealing keeps both near zero.
SELECT count(*)::bigint AS entries,
       coalesce(extract(epoch FROM now()) - min(ts_micros) / 1e6, 0)::float8 AS oldest_seconds
FROM claudemesh.audit_pending;

-- name: AuditHeads :many
-- Every mesh's chain head, for the anchors the replicas log (audit.Anchors).
SELECT mesh_id, seq, hash FROM claudemesh.audit_head WHERE seq > 0;

-- name: AuditEntryHash :one
SELECT hash FROM claudemesh.audit WHERE mesh_id = @mesh_id AND seq = @seq;
