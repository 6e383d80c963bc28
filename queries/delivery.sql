-- name: ResolveMembers :many
SELECT m.mesh_id, m.pubkey, m.id FROM claudemesh.member m
JOIN (SELECT unnest(@mesh_ids::text[]) AS mesh_id, unnest(@pubkeys::text[]) AS pubkey) t
  ON m.mesh_id = t.mesh_id AND m.pubkey = t.pubkey
WHERE m.revoked_at IS NULL;

-- name: ResolveSessionKeys :many
SELECT s.mesh_id, s.session_pubkey, s.member_id FROM claudemesh.session_key s
JOIN (SELECT unnest(@mesh_ids::text[]) AS mesh_id, unnest(@pubkeys::text[]) AS pubkey) t
  ON s.mesh_id = t.mesh_id AND s.session_pubkey = t.pubkey
JOIN claudemesh.member m ON m.id = s.member_id AND m.revoked_at IS NULL;

-- name: InsertEnvelopes :copyfrom
INSERT INTO claudemesh.envelope (id, mesh_id, sender_member_id, sender_pubkey, sender_member_pubkey,
    target_spec, priority, nonce, ciphertext, client_id, created_at, expires_at)
VALUES (@id, @mesh_id, @sender_member_id, @sender_pubkey, @sender_member_pubkey, @target_spec,
    @priority, @nonce, @ciphertext, @client_id, @created_at, @expires_at);

-- name: InsertDeliveries :many
-- One statement for a whole batch. Rows pushed at once by this node come back with their ids,
-- keyed by (envelope, presence), so they can be marked delivered after the write.
INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, recipient_session_pubkey,
    recipient_session_id, priority, state, pushed_node, pushed_presence, pushed_at, expires_at)
SELECT t.envelope_id, t.mesh_id, t.member_id, NULLIF(t.session_pubkey, ''), NULLIF(t.session_id, ''),
    t.priority, t.state,
    CASE WHEN t.state = 'pushed' THEN @node_id::text END,
    NULLIF(t.pushed_presence, ''),
    CASE WHEN t.state = 'pushed' THEN now() END,
    t.expires_at
FROM (
    -- Select-list unnests zip the arrays row by row, in order.
    SELECT unnest(@envelope_ids::text[]) AS envelope_id, unnest(@mesh_ids::text[]) AS mesh_id,
        unnest(@member_ids::text[]) AS member_id, unnest(@session_pubkeys::text[]) AS session_pubkey,
        unnest(@session_ids::text[]) AS session_id, unnest(@priorities::text[]) AS priority,
        unnest(@states::text[]) AS state, unnest(@pushed_presences::text[]) AS pushed_presence,
        unnest(@expires::timestamptz[]) AS expires_at
) t
RETURNING id, envelope_id, pushed_presence;

-- name: ClaimDeliveries :many
-- Claims a session's next pending deliveries in id order and returns what to push. Held
-- priorities are included only when the session may be interrupted.
WITH c AS (
    SELECT d.id FROM claudemesh.delivery d
    WHERE d.recipient_member_id = @member_id AND d.state = 'pending'
      AND (d.recipient_session_pubkey IS NULL OR d.recipient_session_pubkey = @session_pubkey::text)
      AND (d.recipient_session_id IS NULL OR d.recipient_session_id = @session_id::text)
      AND d.expires_at > now()
      AND (@include_held::bool OR d.priority = 'now')
    ORDER BY d.id
    LIMIT @max_rows
    FOR UPDATE SKIP LOCKED
)
UPDATE claudemesh.delivery d
SET state = 'pushed', pushed_node = @node_id::text, pushed_presence = @presence_id::text, pushed_at = now()
FROM c, claudemesh.envelope e
WHERE d.id = c.id AND e.id = d.envelope_id
RETURNING d.id, e.id AS envelope_id, e.mesh_id, e.sender_pubkey, e.sender_member_pubkey, e.priority,
    e.nonce, e.ciphertext, e.created_at;

-- name: MarkDelivered :exec
-- Without client_ack a push counts as delivered once written to the socket.
UPDATE claudemesh.delivery SET state = 'acked', acked_at = now()
WHERE id = ANY(@ids::bigint[]) AND state = 'pushed';

-- name: AckDeliveries :exec
-- client_ack: the recipient session confirms these message ids.
UPDATE claudemesh.delivery SET state = 'acked', acked_at = now()
WHERE envelope_id = ANY(@envelope_ids::text[]) AND recipient_member_id = @member_id
  AND state IN ('pending', 'pushed')
  AND (recipient_session_pubkey IS NULL OR recipient_session_pubkey = @session_pubkey::text)
  AND (recipient_session_id IS NULL OR recipient_session_id = @session_id::text);

-- name: ExpireDeliveries :execrows
UPDATE claudemesh.delivery SET state = 'expired'
WHERE id IN (SELECT id FROM claudemesh.delivery
             WHERE state IN ('pending', 'pushed') AND expires_at <= now() LIMIT 5000);

-- name: DeleteOldEnvelopes :execrows
-- Envelopes are kept a day past expiry so message_status can still answer, then removed.
DELETE FROM claudemesh.envelope
WHERE id IN (SELECT id FROM claudemesh.envelope WHERE expires_at < now() - interval '1 day' LIMIT 5000);

-- name: EnvelopeForStatus :one
SELECT id, mesh_id, target_spec FROM claudemesh.envelope WHERE id = @id AND mesh_id = @mesh_id;

-- name: DeliveryStatus :many
SELECT d.state, d.acked_at, d.pushed_at, m.display_name, m.pubkey AS member_pubkey,
    d.recipient_session_pubkey,
    EXISTS (SELECT 1 FROM claudemesh.presence p
            WHERE p.member_id = d.recipient_member_id AND p.ended_at IS NULL AND p.grace_until IS NULL
              AND (d.recipient_session_id IS NULL OR p.session_id = d.recipient_session_id)
              AND (d.recipient_session_pubkey IS NULL OR p.session_pubkey = d.recipient_session_pubkey)) AS online
FROM claudemesh.delivery d JOIN claudemesh.member m ON m.id = d.recipient_member_id
WHERE d.envelope_id = @envelope_id
ORDER BY d.id;

-- name: PendingDeliveryCount :one
SELECT count(*) FROM claudemesh.delivery WHERE state IN ('pending', 'pushed');
