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
