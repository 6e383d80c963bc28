-- +goose Up
-- A claim for one session never takes a delivery that another session of the member was given
-- while the claim ran. The claim lists its candidates from its snapshot, then locks them; under
-- READ COMMITTED a row changed and committed in between is locked in its new version, with the
-- lock's conditions checked again, and those said only "still open" (pending or assigned).
-- Interleaving: bob has sessions B (idle) and A (working); a "next" message X waits for him.
-- B's claim reads X as pending; A turns idle and its release (release_to) assigns X to A and
-- notifies A's replica, which pushes it; B's claim then locks X, finds it assigned, takes it
-- and pushes it to B: one messageId to two sessions (a duplicate, never a loss). The same
-- held for the assigned ones a claim gives back to pending for a session at work: one given
-- back and assigned to another session meanwhile was pulled from under that session's push.
-- The locks now require the row to be pending, or assigned to the session the claim is for.
-- No new statement or round trip: the check is on the rows the claim locks anyway.
-- Same signature and result: the replicas call it unchanged.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.claim_deliveries_skipping(p_node text, p_presence_ids text[], p_epochs bigint[], p_member_ids text[], p_session_pubkeys text[], p_session_ids text[], p_include_held boolean[], p_limits integer[], p_take_assigned boolean[], p_retake_presence_ids text[], p_retake_ids bigint[], p_assigned_stale_seconds double precision)
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
                -- A session that takes only "now" walks only those (00056): past its member's
                -- held backlog, it read every held message of a session at work on each claim.
                (SELECT d.id, false AS assigned FROM claudemesh.delivery d
                 WHERE (s.include_held AND s.status = 'idle') IS TRUE
                   AND d.recipient_member_id = s.member_id AND d.state = 'pending'
                   AND claudemesh.claimable(d, s.member_id, s.session_pubkey, s.session_id, true)
                 ORDER BY d.id LIMIT s.lim)
                UNION ALL
                (SELECT d.id, false AS assigned FROM claudemesh.delivery d
                 WHERE (s.include_held AND s.status = 'idle') IS NOT TRUE
                   AND d.recipient_member_id = s.member_id AND d.state = 'pending' AND d.priority = 'now'
                   AND claudemesh.claimable(d, s.member_id, s.session_pubkey, s.session_id, false)
                 ORDER BY d.id LIMIT s.lim)
                UNION ALL
                -- Assigned to this session and not pushed: ones the replica could not push in order
                -- (retake), all of them when the replica asks (take_assigned: its notifications were
                -- lost, its status for the session was late, its retake list grew too long), and any
                -- assigned a while ago (the notification that carried it was lost). Not a recent one
                -- otherwise: it may have been pushed from its notification, its push not recorded yet.
                -- The retake pairs are matched whole, so their hash is built once, not per session.
                -- Only what the session may take now, as for pending ones: unexpired, and a held
                -- priority only while it is idle in the database (00056). Also a recent one older
                -- than a pending one this claim could take (looked for above it only: from the top,
                -- a session at work would walk its member's whole held backlog for each assigned
                -- row): its notification has not been applied
                -- yet (or it would have been pushed, or listed to retake), and the pending one must
                -- not overtake it; the replica's memo of what claims took keeps that notification
                -- from pushing it again, and its memo of what notifications pushed keeps this claim
                -- from pushing it twice.
                (SELECT d.id, true FROM claudemesh.delivery d
                 WHERE d.pushed_presence = s.presence_id AND d.state = 'assigned'
                   AND d.expires_at > now() AND (d.priority = 'now' OR s.status = 'idle')
                   AND (s.take_assigned OR d.pushed_at < now() - make_interval(secs => p_assigned_stale_seconds)
                        OR (s.presence_id, d.id) IN (SELECT r.presence_id, r.id FROM retake r)
                        -- Split as the pending branch is (00057): a session that takes only "now"
                        -- looks at its member's pending "now" ones by their index, not through
                        -- its held backlog.
                        OR ((s.include_held AND s.status = 'idle') IS TRUE
                            AND EXISTS (SELECT 1 FROM claudemesh.delivery p
                                        WHERE p.recipient_member_id = s.member_id AND p.id > d.id AND p.state = 'pending'
                                          AND claudemesh.claimable(p, s.member_id, s.session_pubkey, s.session_id, true)))
                        OR ((s.include_held AND s.status = 'idle') IS NOT TRUE
                            AND EXISTS (SELECT 1 FROM claudemesh.delivery p
                                        WHERE p.recipient_member_id = s.member_id AND p.id > d.id AND p.state = 'pending'
                                          AND p.priority = 'now'
                                          AND claudemesh.claimable(p, s.member_id, s.session_pubkey, s.session_id, false))))
                 ORDER BY d.id LIMIT s.lim)
            ) u
            ORDER BY u.id
            LIMIT s.lim
        ) x
    ), held AS (
        -- Assigned ones the replica asked for (listed, all, or old) that the session may not
        -- take now: a held priority assigned while it was idle, behind a full window or racing a
        -- change of status, and the session is at work or dnd now; or expired. Pending again
        -- (held, released by the session's next change to idle like any held message), or
        -- expired: never pushed, and no longer counted as waiting behind the window. The first
        -- window's worth of what was asked for, in id order, as the branch above reads it: a
        -- claim reads about as many rows as it takes (00043); the rest is found by later claims.
        SELECT s.presence_id, h.id FROM mine s CROSS JOIN LATERAL (
            SELECT d.id, d.expires_at > now() AND (d.priority = 'now' OR s.status = 'idle') AS takes
            FROM claudemesh.delivery d
            WHERE d.pushed_presence = s.presence_id AND d.state = 'assigned'
              AND (s.take_assigned OR d.pushed_at < now() - make_interval(secs => p_assigned_stale_seconds)
                   OR (s.presence_id, d.id) IN (SELECT r.presence_id, r.id FROM retake r))
            ORDER BY d.id LIMIT s.lim) h
        WHERE NOT h.takes
    ), held_locked AS (
        -- Still assigned to this session once locked (00066): one given back and assigned to
        -- another session meanwhile is that session's.
        -- Each row probed by its key, as locked below.
        SELECT l.id FROM held h CROSS JOIN LATERAL (
            SELECT d.id FROM claudemesh.delivery d
            WHERE d.id = h.id AND CASE WHEN d.state = 'assigned' THEN d.pushed_presence = h.presence_id ELSE false END
            FOR UPDATE SKIP LOCKED) l
    ), back AS (
        -- Runs though unread: Postgres runs every data-modifying WITH to completion.
        UPDATE claudemesh.delivery d
        SET state = CASE WHEN d.expires_at > now() THEN 'pending' ELSE 'expired' END,
            pushed_node = NULL, pushed_presence = NULL, pushed_at = NULL
        FROM held_locked h WHERE d.id = h.id
        RETURNING d.id
    ), locked AS (
        -- Locking a row another transaction changed after this statement's snapshot rechecks
        -- these conditions on its new version (READ COMMITTED), so they say whose it must
        -- still be (00066): pending, or assigned to this very session. A pending row that a
        -- change of status assigned to another session of the member meanwhile is pushed to
        -- that one from its notification; taken here too, one messageId went to both.
        -- Each row probed by its key: as a join, comparing a row with its session let the planner
        -- join the sessions to every open delivery first; and in a CASE, which matches no
        -- partial index, so the planner cannot walk one by its second column instead.
        SELECT c.presence_id, c.assigned, l.id FROM c CROSS JOIN LATERAL (
            SELECT d.id FROM claudemesh.delivery d
            WHERE d.id = c.id AND CASE d.state WHEN 'pending' THEN true
                                               WHEN 'assigned' THEN d.pushed_presence = c.presence_id
                                               ELSE false END
            FOR UPDATE SKIP LOCKED) l
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
-- 00057's body.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.claim_deliveries_skipping(p_node text, p_presence_ids text[], p_epochs bigint[], p_member_ids text[], p_session_pubkeys text[], p_session_ids text[], p_include_held boolean[], p_limits integer[], p_take_assigned boolean[], p_retake_presence_ids text[], p_retake_ids bigint[], p_assigned_stale_seconds double precision)
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
                -- A session that takes only "now" walks only those (00056): past its member's
                -- held backlog, it read every held message of a session at work on each claim.
                (SELECT d.id, false AS assigned FROM claudemesh.delivery d
                 WHERE (s.include_held AND s.status = 'idle') IS TRUE
                   AND d.recipient_member_id = s.member_id AND d.state = 'pending'
                   AND claudemesh.claimable(d, s.member_id, s.session_pubkey, s.session_id, true)
                 ORDER BY d.id LIMIT s.lim)
                UNION ALL
                (SELECT d.id, false AS assigned FROM claudemesh.delivery d
                 WHERE (s.include_held AND s.status = 'idle') IS NOT TRUE
                   AND d.recipient_member_id = s.member_id AND d.state = 'pending' AND d.priority = 'now'
                   AND claudemesh.claimable(d, s.member_id, s.session_pubkey, s.session_id, false)
                 ORDER BY d.id LIMIT s.lim)
                UNION ALL
                -- Assigned to this session and not pushed: ones the replica could not push in order
                -- (retake), all of them when the replica asks (take_assigned: its notifications were
                -- lost, its status for the session was late, its retake list grew too long), and any
                -- assigned a while ago (the notification that carried it was lost). Not a recent one
                -- otherwise: it may have been pushed from its notification, its push not recorded yet.
                -- The retake pairs are matched whole, so their hash is built once, not per session.
                -- Only what the session may take now, as for pending ones: unexpired, and a held
                -- priority only while it is idle in the database (00056). Also a recent one older
                -- than a pending one this claim could take (looked for above it only: from the top,
                -- a session at work would walk its member's whole held backlog for each assigned
                -- row): its notification has not been applied
                -- yet (or it would have been pushed, or listed to retake), and the pending one must
                -- not overtake it; the replica's memo of what claims took keeps that notification
                -- from pushing it again, and its memo of what notifications pushed keeps this claim
                -- from pushing it twice.
                (SELECT d.id, true FROM claudemesh.delivery d
                 WHERE d.pushed_presence = s.presence_id AND d.state = 'assigned'
                   AND d.expires_at > now() AND (d.priority = 'now' OR s.status = 'idle')
                   AND (s.take_assigned OR d.pushed_at < now() - make_interval(secs => p_assigned_stale_seconds)
                        OR (s.presence_id, d.id) IN (SELECT r.presence_id, r.id FROM retake r)
                        -- Split as the pending branch is (00057): a session that takes only "now"
                        -- looks at its member's pending "now" ones by their index, not through
                        -- its held backlog.
                        OR ((s.include_held AND s.status = 'idle') IS TRUE
                            AND EXISTS (SELECT 1 FROM claudemesh.delivery p
                                        WHERE p.recipient_member_id = s.member_id AND p.id > d.id AND p.state = 'pending'
                                          AND claudemesh.claimable(p, s.member_id, s.session_pubkey, s.session_id, true)))
                        OR ((s.include_held AND s.status = 'idle') IS NOT TRUE
                            AND EXISTS (SELECT 1 FROM claudemesh.delivery p
                                        WHERE p.recipient_member_id = s.member_id AND p.id > d.id AND p.state = 'pending'
                                          AND p.priority = 'now'
                                          AND claudemesh.claimable(p, s.member_id, s.session_pubkey, s.session_id, false))))
                 ORDER BY d.id LIMIT s.lim)
            ) u
            ORDER BY u.id
            LIMIT s.lim
        ) x
    ), held AS (
        -- Assigned ones the replica asked for (listed, all, or old) that the session may not
        -- take now: a held priority assigned while it was idle, behind a full window or racing a
        -- change of status, and the session is at work or dnd now; or expired. Pending again
        -- (held, released by the session's next change to idle like any held message), or
        -- expired: never pushed, and no longer counted as waiting behind the window. The first
        -- window's worth of what was asked for, in id order, as the branch above reads it: a
        -- claim reads about as many rows as it takes (00043); the rest is found by later claims.
        SELECT h.id FROM mine s CROSS JOIN LATERAL (
            SELECT d.id, d.expires_at > now() AND (d.priority = 'now' OR s.status = 'idle') AS takes
            FROM claudemesh.delivery d
            WHERE d.pushed_presence = s.presence_id AND d.state = 'assigned'
              AND (s.take_assigned OR d.pushed_at < now() - make_interval(secs => p_assigned_stale_seconds)
                   OR (s.presence_id, d.id) IN (SELECT r.presence_id, r.id FROM retake r))
            ORDER BY d.id LIMIT s.lim) h
        WHERE NOT h.takes
    ), held_locked AS (
        SELECT d.id FROM held h JOIN claudemesh.delivery d ON d.id = h.id
        WHERE d.state = 'assigned'
        FOR UPDATE OF d SKIP LOCKED
    ), back AS (
        -- Runs though unread: Postgres runs every data-modifying WITH to completion.
        UPDATE claudemesh.delivery d
        SET state = CASE WHEN d.expires_at > now() THEN 'pending' ELSE 'expired' END,
            pushed_node = NULL, pushed_presence = NULL, pushed_at = NULL
        FROM held_locked h WHERE d.id = h.id
        RETURNING d.id
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
