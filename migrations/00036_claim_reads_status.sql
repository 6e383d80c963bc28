-- +goose Up
-- A claim takes held priorities (next, low) only when the session is idle both in its
-- replica's copy (p_include_held) and in the database, as the claim's own snapshot has it.
-- The replica read its copy when it prepared the claim and the statement ran later: a hook's
-- "working" that committed in between, and a "next" message sent after it (held, since the
-- sender's statement saw "working"), were both visible to the claim, which pushed the held
-- message to a session at work. Seen as rare failures of
-- TestNextHeldWhileWorkingReleasedByHookOnThirdReplica and TestHooksProveWhoseSessionsTheyChange
-- under load, on 2026-12-01. In one snapshot the status and the held message agree: a claim
-- that sees a message held by "working" sees "working" too. The replica's copy still counts
-- the other way: between a change to idle and its replica hearing of it, the change's own
-- release (apply_status) pushes what it assigned first, then wakes the session for the rest,
-- so a claim in between must not overtake it. One more primary-key probe per session claimed
-- for.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.claim_deliveries(p_node text, p_presence_ids text[], p_member_ids text[],
    p_session_pubkeys text[], p_session_ids text[], p_include_held boolean[], p_limits int[], p_take_assigned boolean[],
    p_retake_presence_ids text[], p_retake_ids bigint[], p_assigned_stale_seconds float8)
RETURNS TABLE (id bigint, pushed_presence text, assigned boolean, envelope_id text, mesh_id text, sender_pubkey text,
    sender_member_pubkey text, priority text, nonce text, ciphertext text, created_at timestamptz,
    sender_member_id text, sender_name text, client_message_id text, request_fingerprint text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_hashjoin = off
    SET enable_mergejoin = off SET jit = off AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH s AS (
        SELECT unnest(p_presence_ids) AS presence_id, unnest(p_member_ids) AS member_id,
            unnest(p_session_pubkeys) AS session_pubkey, unnest(p_session_ids) AS session_id,
            unnest(p_include_held) AS include_held, unnest(p_limits) AS lim,
            unnest(p_take_assigned) AS take_assigned
    ), retake AS (
        SELECT unnest(p_retake_presence_ids) AS presence_id, unnest(p_retake_ids) AS id
    ), c AS (
        SELECT s.presence_id, x.id, x.assigned FROM s CROSS JOIN LATERAL (
            SELECT u.id, u.assigned FROM (
                SELECT d.id, false AS assigned FROM claudemesh.delivery d
                WHERE d.recipient_member_id = s.member_id AND d.state = 'pending'
                  AND claudemesh.claimable(d, s.member_id, s.session_pubkey, s.session_id,
                          s.include_held AND coalesce((SELECT p.status = 'idle' FROM claudemesh.presence p
                                                       WHERE p.id = s.presence_id AND p.ended_at IS NULL), false))
                UNION ALL
                -- Assigned to this session and not pushed: ones the replica could not push in order
                -- (retake), all of them after its notifications were lost (take_assigned), and any
                -- assigned a while ago (the notification that carried it was lost). Not a recent one
                -- otherwise: it may have been pushed from its notification, its push not recorded yet.
                SELECT d.id, true FROM claudemesh.delivery d
                WHERE d.pushed_presence = s.presence_id AND d.state = 'assigned'
                  AND (s.take_assigned OR d.pushed_at < now() - make_interval(secs => p_assigned_stale_seconds)
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
        pushed_node = p_node, pushed_presence = c.presence_id, pushed_at = now()
    FROM locked c, claudemesh.envelope e
    WHERE d.id = c.id AND e.id = d.envelope_id
    RETURNING d.id, d.pushed_presence, c.assigned, e.id AS envelope_id, e.mesh_id, e.sender_pubkey, e.sender_member_pubkey,
        e.priority, e.nonce, e.ciphertext, e.created_at, e.sender_member_id, e.sender_name, e.client_message_id,
        e.request_fingerprint;
END
$fn$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin

CREATE OR REPLACE FUNCTION claudemesh.claim_deliveries(p_node text, p_presence_ids text[], p_member_ids text[],
    p_session_pubkeys text[], p_session_ids text[], p_include_held boolean[], p_limits int[], p_take_assigned boolean[],
    p_retake_presence_ids text[], p_retake_ids bigint[], p_assigned_stale_seconds float8)
RETURNS TABLE (id bigint, pushed_presence text, assigned boolean, envelope_id text, mesh_id text, sender_pubkey text,
    sender_member_pubkey text, priority text, nonce text, ciphertext text, created_at timestamptz,
    sender_member_id text, sender_name text, client_message_id text, request_fingerprint text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_hashjoin = off
    SET enable_mergejoin = off SET jit = off AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH s AS (
        SELECT unnest(p_presence_ids) AS presence_id, unnest(p_member_ids) AS member_id,
            unnest(p_session_pubkeys) AS session_pubkey, unnest(p_session_ids) AS session_id,
            unnest(p_include_held) AS include_held, unnest(p_limits) AS lim,
            unnest(p_take_assigned) AS take_assigned
    ), retake AS (
        SELECT unnest(p_retake_presence_ids) AS presence_id, unnest(p_retake_ids) AS id
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
                  AND (s.take_assigned OR d.pushed_at < now() - make_interval(secs => p_assigned_stale_seconds)
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
        pushed_node = p_node, pushed_presence = c.presence_id, pushed_at = now()
    FROM locked c, claudemesh.envelope e
    WHERE d.id = c.id AND e.id = d.envelope_id
    RETURNING d.id, d.pushed_presence, c.assigned, e.id AS envelope_id, e.mesh_id, e.sender_pubkey, e.sender_member_pubkey,
        e.priority, e.nonce, e.ciphertext, e.created_at, e.sender_member_id, e.sender_name, e.client_message_id,
        e.request_fingerprint;
END
$fn$;
-- +goose StatementEnd
