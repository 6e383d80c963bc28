-- name: ClaimDeliveries :many
-- Claims the next pending deliveries of many sessions at once, in id order per session, and
-- returns what to push. One statement for every session a wake-up touched, instead of one
-- per session. Each session takes at most its own limit (the room left in its push window),
-- so a claim never outruns the socket. Held priorities are included only for sessions that
-- may be interrupted. Claimed rows are "pushed": they count as delivered only once written
-- (MarkDelivered) or acked, and go back to pending if the session ends first. The statement
-- is a function (claudemesh.claim_deliveries, 00015; claim_deliveries_skipping since 00045), so
-- its plan is made once per connection; each session is claimed for at the epoch its socket
-- owns (00041). A session whose row another transaction holds is skipped, as a row with id 0
-- (00045).
SELECT c.id::bigint AS id, coalesce(c.pushed_presence, '')::text AS pushed_presence, c.assigned::boolean AS assigned,
    c.envelope_id::text AS envelope_id, c.mesh_id::text AS mesh_id, c.sender_pubkey::text AS sender_pubkey,
    c.sender_member_pubkey::text AS sender_member_pubkey, c.priority::text AS priority, c.nonce::text AS nonce,
    c.ciphertext::text AS ciphertext, c.created_at::timestamptz AS created_at, c.sender_member_id::text AS sender_member_id,
    c.sender_name::text AS sender_name, c.client_message_id::text AS client_message_id,
    c.request_fingerprint::text AS request_fingerprint
FROM claudemesh.claim_deliveries_skipping(@node_id::text, @presence_ids::text[], @epochs::bigint[], @member_ids::text[], @session_pubkeys::text[],
    @session_ids::text[], @include_held::bool[], @limits::int[], @take_assigned::bool[], @retake_presence_ids::text[],
    @retake_ids::bigint[], @assigned_stale_seconds::float8) c;

-- name: ReleaseDeliveries :one
-- Pushes that could not be written go back to pending: claimed ones whose socket closed
-- (pushed), or assigned ones whose session is gone (assigned). With only_assigned,
-- a row a claim took meanwhile (pushed: on its way) is left alone, not delivered twice, and
-- so is one whose presence is connected on this node: its session is not gone but joining the
-- hub (its hello registered it), and the hello's claim takes it in order. Given back, a claim
-- running meanwhile skipped it (locked) and pushed the later ones first; a session that closed
-- here releases it with its end.
-- Every replica is woken for their recipients on the cluster channel, as release_held wakes
-- them (migration 00040): a session of theirs registering on any replica meanwhile takes them.
WITH rel AS (
    UPDATE claudemesh.delivery d SET state = 'pending', pushed_node = NULL, pushed_presence = NULL,
        pushed_at = NULL, acked_at = NULL
    WHERE d.id = ANY(@ids::bigint[]) AND (d.state = 'assigned' OR (d.state = 'pushed' AND NOT @only_assigned::boolean))
      AND NOT (@only_assigned::boolean AND EXISTS (
          SELECT 1 FROM claudemesh.presence x
          WHERE x.id = d.pushed_presence AND x.node_id = @node_id::text AND x.ended_at IS NULL AND x.grace_until IS NULL))
    RETURNING d.recipient_member_id
), woken AS (
    SELECT claudemesh.notify_lines(@channel::text, array_agg(json_build_object('k', 'd', 'm', m.id)::text ORDER BY m.id)) AS n
    FROM (SELECT DISTINCT recipient_member_id AS id FROM rel) m
    HAVING count(*) > 0
)
SELECT (SELECT count(*) FROM rel)::int AS released, (SELECT count(*) FROM woken)::int AS notified;

-- name: MarkDelivered :exec
-- Deliveries that are done, in one statement for many sessions: client_acks, each a (message
-- id, recipient session) pair, the ids of pushes written to the socket of a session that does
-- not ack (done: a row released to pending meanwhile, its session closed after the write, was
-- still written), and the ids of assigned pushes written to sessions that ack (taken), each
-- with the epoch of the socket it was written to (migration 00049: one written to a socket
-- since taken over goes back to pending).
-- One function call (migration 00012): its plan is the generic one, never re-planned per call.
SELECT claudemesh.mark_delivered_fenced(@ns::text, @envelope_ids::text[], @member_ids::text[], @session_pubkeys::text[],
    @session_ids::text[], @written_ids::bigint[], @taken_ids::bigint[], @taken_epochs::bigint[]);

-- name: ExpireDeliveries :execrows
-- A page of open deliveries past their expiry, by the index of open deliveries by expiry
-- (00055), each then by its key (an array, not IN: as a join the planner hashed every open
-- delivery for each page). Rows another replica's sweep holds are left to it.
UPDATE claudemesh.delivery SET state = 'expired'
WHERE id = ANY (ARRAY(
        SELECT o.id FROM claudemesh.delivery o
        WHERE o.expires_at <= now() AND o.state IN ('pending', 'assigned', 'pushed')
        ORDER BY o.expires_at
        LIMIT @page_size::int
        FOR UPDATE SKIP LOCKED))
  AND state IN ('pending', 'assigned', 'pushed');

-- name: DeleteOldEnvelopes :one
-- A page of envelopes kept a day past expiry so message_status can still answer, removed with
-- their deliveries (no foreign key cascades on these tables: see the schema). Rows another
-- replica's sweep holds are left to it. Counts the envelopes.
WITH old AS (
    DELETE FROM claudemesh.envelope
    WHERE id IN (SELECT id FROM claudemesh.envelope WHERE expires_at < now() - interval '1 day'
                 ORDER BY expires_at LIMIT @page_size::int FOR UPDATE SKIP LOCKED)
    RETURNING id
), dels AS (
    DELETE FROM claudemesh.delivery WHERE envelope_id IN (SELECT id FROM old)
    RETURNING 1
)
SELECT (SELECT count(*) FROM old)::bigint AS envelopes, (SELECT count(*) FROM dels)::bigint AS deliveries;

-- name: EnvelopeForStatus :one
SELECT id, mesh_id, target_spec FROM claudemesh.envelope WHERE id = @id AND mesh_id = @mesh_id;

-- name: DeliveryStatus :many
SELECT d.state, d.acked_at, d.pushed_at, m.display_name, m.pubkey AS member_pubkey,
    d.recipient_session_pubkey,
    EXISTS (SELECT 1 FROM claudemesh.presence p
            WHERE p.mesh_id = d.mesh_id AND p.member_id = d.recipient_member_id
              AND p.ended_at IS NULL AND p.grace_until IS NULL
              AND (d.recipient_session_id IS NULL OR p.session_id = d.recipient_session_id)
              AND (d.recipient_session_pubkey IS NULL OR p.session_pubkey = d.recipient_session_pubkey)) AS online
FROM claudemesh.delivery d JOIN claudemesh.member m ON m.id = d.recipient_member_id
WHERE d.envelope_id = @envelope_id
ORDER BY d.id;

-- name: NodeSessionsWithClaimable :many
-- The catch-up poll: which of this node's connected sessions have a delivery the claim would
-- take now, with the status the claim goes by (kind 's'), and this node's old assigned pushes
-- whose session is no longer live here (kind 'o', the delivery id in id): a send that raced a
-- reattach elsewhere or an end assigned them to a session that has moved or gone, and their
-- give-back was lost. One indexed query per replica, whatever its number of sessions; no locks.
SELECT 's'::text AS kind, p.id, p.status FROM claudemesh.presence p
WHERE p.node_id = @node_id AND p.ended_at IS NULL AND p.grace_until IS NULL
  AND ((p.status = 'idle' AND EXISTS (SELECT 1 FROM claudemesh.delivery d
               WHERE d.recipient_member_id = p.member_id AND d.state = 'pending'
                 AND claudemesh.claimable(d, p.member_id, coalesce(p.session_pubkey, ''), p.session_id, true)))
       -- A session at work takes only "now": by their own index (00056), not through its
       -- member's held backlog on every poll.
       OR (p.status <> 'idle' AND EXISTS (SELECT 1 FROM claudemesh.delivery d
               WHERE d.recipient_member_id = p.member_id AND d.state = 'pending' AND d.priority = 'now'
                 AND claudemesh.claimable(d, p.member_id, coalesce(p.session_pubkey, ''), p.session_id, false)))
       -- Old assigned pushes of this node, by node and age (00037), not by session: a probe
       -- per session would read each one's every held delivery, dead versions included.
       OR p.id IN (SELECT d.pushed_presence FROM claudemesh.delivery d
                   WHERE d.pushed_node = @node_id AND d.state = 'assigned'
                     AND d.pushed_at < now() - make_interval(secs => @assigned_stale_seconds::float8)))
UNION ALL
SELECT 'o', d.id::text, '' FROM claudemesh.delivery d
WHERE d.pushed_node = @node_id AND d.state = 'assigned'
  AND d.pushed_at < now() - make_interval(secs => @assigned_stale_seconds::float8)
  AND NOT EXISTS (SELECT 1 FROM claudemesh.presence x
                  WHERE x.id = d.pushed_presence AND x.node_id = @node_id AND x.ended_at IS NULL);

-- name: PendingDeliveryCount :one
-- Through the open deliveries' partial indexes: acked rows are kept for days, and counting them
-- with a sequential scan every few seconds on every replica would grow with the history.
SELECT ((SELECT count(*) FROM claudemesh.delivery WHERE state = 'pending')
      + (SELECT count(*) FROM claudemesh.delivery WHERE state IN ('assigned', 'pushed')))::bigint AS n;

-- name: GiveBackAssigned :one
-- The poll's kind 'o' rows, back to pending if still as the poll saw them, their members'
-- replicas woken (migration 00038).
SELECT claudemesh.give_back_assigned(@ns::text, @node_id::text, @ids::bigint[], @stale_seconds::float8)::int AS released;
