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
        unnest(@include_held::bool[]) AS include_held, unnest(@limits::int[]) AS lim,
        unnest(@take_assigned::bool[]) AS take_assigned
), retake AS (
    SELECT unnest(@retake_presence_ids::text[]) AS presence_id, unnest(@retake_ids::bigint[]) AS id
), c AS (
    SELECT s.presence_id, x.id, x.assigned FROM s CROSS JOIN LATERAL (
        SELECT u.id, u.assigned FROM (
            SELECT d.id, false AS assigned FROM claudemesh.delivery d
            WHERE d.recipient_member_id = s.member_id AND d.state = 'pending'
              AND claudemesh.claimable(d, s.member_id, s.session_pubkey, s.session_id, s.include_held)
            UNION ALL
            -- Assigned to this session and not pushed: ones the replica could not push in order
            -- (retake), all of them after its notifications were lost (take_assigned), and any
            -- assigned a while ago (the notification that carried it was lost). Not a recent one
            -- otherwise: it may have been pushed from its notification, its push not recorded yet.
            SELECT d.id, true FROM claudemesh.delivery d
            WHERE d.pushed_presence = s.presence_id AND d.state = 'assigned'
              AND (s.take_assigned OR d.pushed_at < now() - make_interval(secs => @assigned_stale_seconds::float8)
                   OR d.id IN (SELECT r.id FROM retake r WHERE r.presence_id = s.presence_id))
        ) u
        ORDER BY u.id
        LIMIT s.lim
    ) x
), locked AS (
    SELECT c.presence_id, c.assigned, d.id FROM c JOIN claudemesh.delivery d ON d.id = c.id
    WHERE d.state IN ('pending', 'assigned')
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE claudemesh.delivery d
SET state = 'pushed', acked_at = NULL,
    pushed_node = @node_id::text, pushed_presence = c.presence_id, pushed_at = now()
FROM locked c, claudemesh.envelope e
WHERE d.id = c.id AND e.id = d.envelope_id
RETURNING d.id, d.pushed_presence, c.assigned, e.id AS envelope_id, e.mesh_id, e.sender_pubkey, e.sender_member_pubkey,
    e.priority, e.nonce, e.ciphertext, e.created_at, e.sender_member_id, e.sender_name, e.client_message_id,
    e.request_fingerprint;

-- name: ReleaseDeliveries :many
-- Pushes that could not be written go back to pending: claimed ones whose socket closed
-- (pushed), or assigned ones that could not be pushed in order (assigned). With only_assigned,
-- a row a claim took meanwhile (pushed: on its way) is left alone, not delivered twice.
UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL,
    pushed_at = NULL, acked_at = NULL
WHERE id = ANY(@ids::bigint[]) AND (state = 'assigned' OR (state = 'pushed' AND NOT @only_assigned::boolean))
RETURNING mesh_id, recipient_member_id;

-- name: MarkDelivered :exec
-- Deliveries that are done, in one statement for many sessions: client_acks, each a (message
-- id, recipient session) pair, the ids of pushes written to the socket of a session that does
-- not ack (done: a row released to pending meanwhile, its session closed after the write, was
-- still written), and the ids of assigned pushes written to sessions that ack (taken).
-- One function call (migration 00012): its plan is the generic one, never re-planned per call.
SELECT claudemesh.mark_delivered(@envelope_ids::text[], @member_ids::text[], @session_pubkeys::text[],
    @session_ids::text[], @written_ids::bigint[], @taken_ids::bigint[]);

-- name: ExpireDeliveries :execrows
-- Found through their envelopes' expiry index, so deliveries need no index of their own for it.
UPDATE claudemesh.delivery SET state = 'expired'
WHERE envelope_id IN (
        SELECT e.id FROM claudemesh.envelope e
        WHERE e.expires_at <= now()
          AND EXISTS (SELECT 1 FROM claudemesh.delivery o
                      WHERE o.envelope_id = e.id AND o.state IN ('pending', 'assigned', 'pushed'))
        LIMIT 5000)
  AND state IN ('pending', 'assigned', 'pushed');

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
  AND (EXISTS (SELECT 1 FROM claudemesh.delivery d
               WHERE d.recipient_member_id = p.member_id AND d.state = 'pending'
                 AND claudemesh.claimable(d, p.member_id, coalesce(p.session_pubkey, ''), p.session_id, p.status = 'idle'))
       OR EXISTS (SELECT 1 FROM claudemesh.delivery d
                  WHERE d.pushed_presence = p.id AND d.state = 'assigned'
                    AND d.pushed_at < now() - make_interval(secs => @assigned_stale_seconds::float8)));

-- name: PendingDeliveryCount :one
-- Through the open deliveries' partial indexes: acked rows are kept for days, and counting them
-- with a sequential scan every few seconds on every replica would grow with the history.
SELECT ((SELECT count(*) FROM claudemesh.delivery WHERE state = 'pending')
      + (SELECT count(*) FROM claudemesh.delivery WHERE state IN ('assigned', 'pushed')))::bigint AS n;
