-- +goose Up
-- A claim skips a session whose row another transaction holds, and says so, instead of waiting
-- for it. The claim locks its sessions' rows in share mode, one by one, so that a takeover in
-- flight is seen (00041); a hello batch taking over two of them in the other order deadlocked
-- with it until Postgres's deadlock check a second later, the takeover's hellos waiting all that
-- time. Now a locked row is skipped (FOR SHARE SKIP LOCKED) and reported as a row with delivery
-- id 0; the replica claims for that session again shortly (broker/pusher.go), and finds it taken
-- over (nothing to take) or free. A claim now waits for no session's row. A new function (the
-- result has the new rows): replicas of the previous release keep calling 00044's, unchanged.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.claim_deliveries_skipping(p_node text, p_presence_ids text[], p_epochs bigint[], p_member_ids text[], p_session_pubkeys text[], p_session_ids text[], p_include_held boolean[], p_limits integer[], p_take_assigned boolean[], p_retake_presence_ids text[], p_retake_ids bigint[], p_assigned_stale_seconds double precision)
 RETURNS TABLE(id bigint, pushed_presence text, assigned boolean, envelope_id text, mesh_id text, sender_pubkey text, sender_member_pubkey text, priority text, nonce text, ciphertext text, created_at timestamp with time zone, sender_member_id text, sender_name text, client_message_id text, request_fingerprint text)
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
 SET enable_seqscan TO 'off'
 SET enable_hashjoin TO 'off'
 SET enable_mergejoin TO 'off'
 SET enable_bitmapscan TO 'off'
 SET jit TO 'off'
AS $function$
#variable_conflict use_column
BEGIN
    -- Not waiting for the WAL flush (the store runs a claim as a transaction of its own): the
    -- share locks below make every claim write, and a claim only moves deliveries forward to
    -- a socket; lost in a crash, they are pending again and pushed again with the same
    -- messageId at the next connection (at-least-once), as 00034 has it for their records.
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    WITH s AS (
        SELECT unnest(p_presence_ids) AS presence_id, unnest(p_epochs) AS epoch, unnest(p_member_ids) AS member_id,
            unnest(p_session_pubkeys) AS session_pubkey, unnest(p_session_ids) AS session_id,
            unnest(p_include_held) AS include_held, unnest(p_limits) AS lim,
            unnest(p_take_assigned) AS take_assigned
    ), probe AS MATERIALIZED (
        -- The sessions whose registration is still the one the replica holds: live, on this
        -- node, at the epoch its socket owns. Locked (shared): a hello taking one over, which
        -- updates the row, waits for this claim, whose rows it then releases to the new
        -- socket. A row another transaction holds (a takeover, a change of status, an end) is
        -- skipped, not waited for: the claim never waits for a session's row, so it cannot
        -- deadlock with a hello batch taking over two of its sessions in the other order.
        -- A skipped one that this statement's snapshot still shows live here at its epoch is
        -- reported (the replica claims for it again shortly; taken over or ended meanwhile, it
        -- then takes nothing); one not shown live has nothing to take.
        -- Each probed by its key: a join let the planner read every live session of the node
        -- (and unnest the arguments again for each), whatever the batch's size. The node is
        -- compared in a form no index takes (node_id is never null here), so the key is the
        -- only way in. The second probe runs only for a row the first skipped or did not find.
        SELECT s.*, l.status, l.status IS NULL AND v.live IS NOT NULL AS skipped
        FROM s
        LEFT JOIN LATERAL (
            SELECT p.status FROM claudemesh.presence p
            WHERE p.id = s.presence_id AND p.node_id IS NOT DISTINCT FROM p_node AND p.epoch = s.epoch
              AND p.ended_at IS NULL
            FOR SHARE SKIP LOCKED) l ON true
        LEFT JOIN LATERAL (
            SELECT true AS live FROM claudemesh.presence p
            WHERE l.status IS NULL AND p.id = s.presence_id AND p.node_id IS NOT DISTINCT FROM p_node
              AND p.epoch = s.epoch AND p.ended_at IS NULL
            OFFSET 0) v ON true -- a subquery, not a join: a join was planned as a read of every live session
    ), mine AS (
        SELECT * FROM probe WHERE status IS NOT NULL
    ), skipped AS (
        SELECT presence_id FROM probe WHERE skipped
    ), retake AS (
        SELECT unnest(p_retake_presence_ids) AS presence_id, unnest(p_retake_ids) AS id
    ), c AS (
        SELECT s.presence_id, x.id, x.assigned FROM mine s CROSS JOIN LATERAL (
            SELECT u.id, u.assigned FROM (
                -- Each branch in id order and only as far as the window: an index walk that stops,
                -- where it read every open delivery of the member and every held one of the
                -- session to sort them.
                (SELECT d.id, false AS assigned FROM claudemesh.delivery d
                 WHERE d.recipient_member_id = s.member_id AND d.state = 'pending'
                   AND claudemesh.claimable(d, s.member_id, s.session_pubkey, s.session_id,
                           s.include_held AND s.status = 'idle')
                 ORDER BY d.id LIMIT s.lim)
                UNION ALL
                -- Assigned to this session and not pushed: ones the replica could not push in order
                -- (retake), all of them when the replica asks (take_assigned: its notifications were
                -- lost, its status for the session was late, its retake list grew too long), and any
                -- assigned a while ago (the notification that carried it was lost). Not a recent one
                -- otherwise: it may have been pushed from its notification, its push not recorded yet.
                -- The retake pairs are matched whole, so their hash is built once, not per session.
                (SELECT d.id, true FROM claudemesh.delivery d
                 WHERE d.pushed_presence = s.presence_id AND d.state = 'assigned'
                   AND (s.take_assigned OR d.pushed_at < now() - make_interval(secs => p_assigned_stale_seconds)
                        OR (s.presence_id, d.id) IN (SELECT r.presence_id, r.id FROM retake r))
                 ORDER BY d.id LIMIT s.lim)
            ) u
            ORDER BY u.id
            LIMIT s.lim
        ) x
    ), locked AS (
        SELECT c.presence_id, c.assigned, d.id FROM c JOIN claudemesh.delivery d ON d.id = c.id
        WHERE d.state IN ('pending', 'assigned')
        FOR UPDATE OF d SKIP LOCKED
    ), claimed AS (
        UPDATE claudemesh.delivery d
        SET state = 'pushed', acked_at = NULL,
            pushed_node = p_node, pushed_presence = c.presence_id, pushed_at = now()
        FROM locked c, claudemesh.envelope e
        WHERE d.id = c.id AND e.id = d.envelope_id
        RETURNING d.id, d.pushed_presence, c.assigned, e.id AS envelope_id, e.mesh_id, e.sender_pubkey, e.sender_member_pubkey,
            e.priority, e.nonce, e.ciphertext, e.created_at, e.sender_member_id, e.sender_name, e.client_message_id,
            e.request_fingerprint
    )
    SELECT * FROM claimed
    UNION ALL
    -- One row per skipped session, delivery id 0.
    SELECT 0::bigint, k.presence_id, false, '', '', '', '', '', '', '', 'epoch'::timestamptz, '', '', '', ''
    FROM skipped k;
END
$function$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION claudemesh.claim_deliveries_skipping(text, text[], bigint[], text[], text[], text[], boolean[], integer[], boolean[], text[], bigint[], double precision);
