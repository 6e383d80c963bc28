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

-- name: InsertBatch :many
-- A whole send batch in one statement and one round trip: the envelopes (ciphertext stored
-- once) and one delivery per recipient. Rows this node pushes at once are inserted "pushed"
-- and come back with their ids, keyed by (envelope, presence), to be marked delivered once
-- written.
WITH env AS (
    INSERT INTO claudemesh.envelope (id, mesh_id, sender_member_id, sender_pubkey, sender_member_pubkey,
        target_spec, priority, nonce, ciphertext, client_id, created_at, expires_at)
    SELECT unnest(@e_ids::text[]), unnest(@e_mesh_ids::text[]), unnest(@e_sender_member_ids::text[]),
        unnest(@e_sender_pubkeys::text[]), unnest(@e_sender_member_pubkeys::text[]),
        unnest(@e_target_specs::text[]), unnest(@e_priorities::text[]), unnest(@e_nonces::text[]),
        unnest(@e_ciphertexts::text[]), unnest(@e_client_ids::text[]), unnest(@e_created::timestamptz[]),
        unnest(@e_expires::timestamptz[])
)
INSERT INTO claudemesh.delivery (envelope_id, mesh_id, recipient_member_id, recipient_session_pubkey,
    recipient_session_id, priority, state, pushed_node, pushed_presence, pushed_at, expires_at)
SELECT t.envelope_id, t.mesh_id, t.member_id, NULLIF(t.session_pubkey, ''), NULLIF(t.session_id, ''),
    t.priority, t.state,
    CASE WHEN t.state <> 'pending' THEN @node_id::text END,
    NULLIF(t.pushed_presence, ''),
    CASE WHEN t.state <> 'pending' THEN now() END,
    t.expires_at
FROM (
    -- Select-list unnests zip the arrays row by row, in order.
    SELECT unnest(@d_envelope_ids::text[]) AS envelope_id, unnest(@d_mesh_ids::text[]) AS mesh_id,
        unnest(@d_member_ids::text[]) AS member_id, unnest(@d_session_pubkeys::text[]) AS session_pubkey,
        unnest(@d_session_ids::text[]) AS session_id, unnest(@d_priorities::text[]) AS priority,
        unnest(@d_states::text[]) AS state, unnest(@d_pushed_presences::text[]) AS pushed_presence,
        unnest(@d_expires::timestamptz[]) AS expires_at
) t
RETURNING id, envelope_id, pushed_presence;

-- name: ClaimDeliveries :many
-- Claims the next pending deliveries of many sessions at once, in id order per session, and
-- returns what to push. One statement for every session a wake-up touched, instead of one
-- per session. Each session takes at most its own limit (the room left in its push window),
-- so a claim never outruns the socket. Held priorities are included only for sessions that
-- may be interrupted. Claimed rows are "pushed": they count as delivered only once written
-- (MarkDelivered) or acked, and go back to pending if the session ends first.
WITH s AS (
    SELECT unnest(@presence_ids::text[]) AS presence_id, unnest(@member_ids::text[]) AS member_id,
        unnest(@session_pubkeys::text[]) AS session_pubkey, unnest(@session_ids::text[]) AS session_id,
        unnest(@include_held::bool[]) AS include_held, unnest(@limits::int[]) AS lim
), c AS (
    SELECT s.presence_id, x.id FROM s CROSS JOIN LATERAL (
        SELECT d.id FROM claudemesh.delivery d
        WHERE d.recipient_member_id = s.member_id AND d.state = 'pending'
          AND claudemesh.claimable(d, s.member_id, s.session_pubkey, s.session_id, s.include_held)
        ORDER BY d.id
        LIMIT s.lim
        FOR UPDATE SKIP LOCKED
    ) x
)
UPDATE claudemesh.delivery d
SET state = 'pushed', acked_at = NULL,
    pushed_node = @node_id::text, pushed_presence = c.presence_id, pushed_at = now()
FROM c, claudemesh.envelope e
WHERE d.id = c.id AND e.id = d.envelope_id
RETURNING d.id, d.pushed_presence, e.id AS envelope_id, e.mesh_id, e.sender_pubkey, e.sender_member_pubkey,
    e.priority, e.nonce, e.ciphertext, e.created_at;

-- name: ReleaseDeliveries :many
-- Pushes that could not be written (the socket closed) go back to pending.
UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL,
    pushed_at = NULL, acked_at = NULL
WHERE id = ANY(@ids::bigint[]) AND state IN ('pushed', 'acked')
RETURNING mesh_id, recipient_member_id;

-- name: MarkDelivered :exec
-- Deliveries that are done, in one statement for many sessions: client_acks, each a (message
-- id, recipient session) pair, and the ids of pushes written to the socket of a session that
-- does not ack. A row released to pending meanwhile (its session closed after the write)
-- is still done: it was written.
WITH acked AS (
    UPDATE claudemesh.delivery d SET state = 'acked', acked_at = now()
    FROM (SELECT unnest(@envelope_ids::text[]) AS envelope_id, unnest(@member_ids::text[]) AS member_id,
                 unnest(@session_pubkeys::text[]) AS session_pubkey, unnest(@session_ids::text[]) AS session_id) a
    WHERE d.envelope_id = a.envelope_id AND d.recipient_member_id = a.member_id
      AND d.state IN ('pending', 'pushed')
      AND (d.recipient_session_pubkey IS NULL OR d.recipient_session_pubkey = a.session_pubkey)
      AND (d.recipient_session_id IS NULL OR d.recipient_session_id = a.session_id)
    RETURNING d.id
)
UPDATE claudemesh.delivery d SET state = 'acked', acked_at = now()
WHERE d.id = ANY(@written_ids::bigint[]) AND d.state IN ('pending', 'pushed')
  AND d.id NOT IN (SELECT id FROM acked);

-- name: ExpireDeliveries :execrows
-- Found through their envelopes' expiry index, so deliveries need no index of their own for it.
UPDATE claudemesh.delivery SET state = 'expired'
WHERE envelope_id IN (
        SELECT e.id FROM claudemesh.envelope e
        WHERE e.expires_at <= now()
          AND EXISTS (SELECT 1 FROM claudemesh.delivery o
                      WHERE o.envelope_id = e.id AND o.state IN ('pending', 'pushed'))
        LIMIT 5000)
  AND state IN ('pending', 'pushed');

-- name: DeleteOldEnvelopes :execrows
-- Envelopes are kept a day past expiry so message_status can still answer, then removed with
-- their deliveries (no foreign key cascades on these tables: see the schema).
WITH old AS (
    DELETE FROM claudemesh.envelope
    WHERE id IN (SELECT id FROM claudemesh.envelope WHERE expires_at < now() - interval '1 day' LIMIT 5000)
    RETURNING id
)
DELETE FROM claudemesh.delivery WHERE envelope_id IN (SELECT id FROM old);

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

-- name: NodeSessionsWithClaimable :many
-- The catch-up poll: which of this node's connected sessions have a delivery the claim would
-- take now, with the status the claim goes by. One indexed query per replica, whatever its
-- number of sessions; no locks.
SELECT p.id, p.status FROM claudemesh.presence p
WHERE p.node_id = @node_id AND p.ended_at IS NULL AND p.grace_until IS NULL
  AND EXISTS (SELECT 1 FROM claudemesh.delivery d
              WHERE d.recipient_member_id = p.member_id AND d.state = 'pending'
                AND claudemesh.claimable(d, p.member_id, coalesce(p.session_pubkey, ''), p.session_id, p.status = 'idle'));

-- name: PendingDeliveryCount :one
SELECT count(*) FROM claudemesh.delivery WHERE state IN ('pending', 'pushed');
