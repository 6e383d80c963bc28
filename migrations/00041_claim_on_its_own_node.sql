-- +goose Up
-- A claim takes nothing for a session whose presence is no longer live on the claiming node.
-- A hello that takes a session over from another replica while that replica still holds the
-- old socket (a half-open connection) releases the old connection's pushes to pending before
-- its commit, and since 00040 that release wakes every replica for the member, the old one
-- included, before the old one hears that its socket was replaced. The old replica claimed
-- for the old socket and took the released rows: written to a socket about to close, they
-- waited for the catch-up poll, or, if the write was dropped behind the close, for the
-- session's end. The claim already read the session's presence row by primary key (for its
-- status, 00036); it now joins it, on this node, which costs nothing more.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.claim_deliveries(p_node text, p_presence_ids text[], p_member_ids text[], p_session_pubkeys text[], p_session_ids text[], p_include_held boolean[], p_limits integer[], p_take_assigned boolean[], p_retake_presence_ids text[], p_retake_ids bigint[], p_assigned_stale_seconds double precision)
 RETURNS TABLE(id bigint, pushed_presence text, assigned boolean, envelope_id text, mesh_id text, sender_pubkey text, sender_member_pubkey text, priority text, nonce text, ciphertext text, created_at timestamp with time zone, sender_member_id text, sender_name text, client_message_id text, request_fingerprint text)
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
 SET enable_seqscan TO 'off'
 SET enable_hashjoin TO 'off'
 SET enable_mergejoin TO 'off'
 SET jit TO 'off'
AS $function$
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
        -- Only for sessions whose presence is still live on this node: one taken over by another
        -- replica is claimed for there (its rows were released to it), even while this
        -- replica's old socket waits to be closed.
        SELECT s.presence_id, x.id, x.assigned FROM s
        JOIN claudemesh.presence p ON p.id = s.presence_id AND p.node_id = p_node AND p.ended_at IS NULL
        CROSS JOIN LATERAL (
            SELECT u.id, u.assigned FROM (
                SELECT d.id, false AS assigned FROM claudemesh.delivery d
                WHERE d.recipient_member_id = s.member_id AND d.state = 'pending'
                  AND claudemesh.claimable(d, s.member_id, s.session_pubkey, s.session_id,
                          s.include_held AND p.status = 'idle')
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
$function$;
-- +goose StatementEnd

-- +goose Down
-- 00036's body.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.claim_deliveries(p_node text, p_presence_ids text[], p_member_ids text[], p_session_pubkeys text[], p_session_ids text[], p_include_held boolean[], p_limits integer[], p_take_assigned boolean[], p_retake_presence_ids text[], p_retake_ids bigint[], p_assigned_stale_seconds double precision)
 RETURNS TABLE(id bigint, pushed_presence text, assigned boolean, envelope_id text, mesh_id text, sender_pubkey text, sender_member_pubkey text, priority text, nonce text, ciphertext text, created_at timestamp with time zone, sender_member_id text, sender_name text, client_message_id text, request_fingerprint text)
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
 SET enable_seqscan TO 'off'
 SET enable_hashjoin TO 'off'
 SET enable_mergejoin TO 'off'
 SET jit TO 'off'
AS $function$
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
$function$;
-- +goose StatementEnd
