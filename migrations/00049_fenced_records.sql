-- +goose Up
-- Records and ends that belong to one socket of a presence touch nothing of a newer socket of
-- the same presence (a reconnect that took it over, on this replica or another).
--
-- mark_delivered_fenced: an assigned push written to a session that acks is "taken" (pushed,
-- waiting for its client_ack) only while its presence is still on the node the push was
-- assigned to, at the epoch of the socket it was written to. A send that read the presence
-- before a takeover committed can assign a row to the old socket after the takeover's hello
-- released what that socket held; the replica writes it to the old socket (in the kernel's
-- buffer, or an old session object not yet replaced in the hub) before it closes it. Marked
-- pushed, the row waited for the new socket to end, which claims (pending and assigned rows
-- only) never took: a message acked to its sender and not delivered while the recipient stayed
-- connected, and lost at its expiry. Now it goes back to pending and every replica is woken
-- for the member, so the new socket's replica claims it. The previous release's replicas keep
-- calling mark_delivered (unchanged): the new function has a new name.
--
-- end_sessions: a socket's end (grace or end now) leaves alone what a newer socket of its
-- presence holds. It released the presence's assigned and pushed rows even when a newer socket
-- had taken the presence over (the end of the old one recorded after the new one's hello), so
-- the newer socket's in-flight rows went back to pending and were pushed to it again:
-- duplicates, with the same messageId.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.mark_delivered_fenced(p_ns text, p_envelope_ids text[], p_member_ids text[],
    p_session_pubkeys text[], p_session_ids text[], p_written_ids bigint[], p_taken_ids bigint[], p_taken_epochs bigint[])
RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS $fn$
DECLARE
    -- Parameters, not literals: see 00013.
    st_open text[] := ARRAY['pending', 'assigned', 'pushed'];
    st_assigned text := 'assigned';
    n bigint;
BEGIN
    -- Not waiting for the WAL flush: see 00034.
    PERFORM set_config('synchronous_commit', 'off', true);
    IF cardinality(p_envelope_ids) > 0 THEN
        -- Each ack is an index probe by envelope (see 00012 and 00013).
        UPDATE claudemesh.delivery d SET state = 'acked', acked_at = now()
        WHERE d.id = ANY (ARRAY(
            SELECT o.id
            FROM (SELECT unnest(p_envelope_ids) AS envelope_id, unnest(p_member_ids) AS member_id,
                         unnest(p_session_pubkeys) AS session_pubkey, unnest(p_session_ids) AS session_id) a
            CROSS JOIN LATERAL (
                SELECT o.id FROM claudemesh.delivery o
                WHERE o.envelope_id = a.envelope_id AND o.recipient_member_id = a.member_id
                  AND o.state = ANY (st_open)
                  AND (o.recipient_session_pubkey IS NULL OR o.recipient_session_pubkey = a.session_pubkey)
                  AND (o.recipient_session_id IS NULL OR o.recipient_session_id = a.session_id)
                OFFSET 0) o))
          AND d.state = ANY (st_open);
    END IF;
    IF cardinality(p_written_ids) > 0 THEN
        UPDATE claudemesh.delivery d SET state = 'acked', acked_at = now()
        WHERE d.id = ANY (p_written_ids) AND d.state = ANY (st_open);
    END IF;
    IF cardinality(p_taken_ids) > 0 THEN
        -- Pushed now, so the catch-up leaves them alone, when written to the presence's current
        -- socket; else pending again (above). One acked above is no longer assigned.
        WITH t AS (
            SELECT d.id, coalesce(x.node_id = d.pushed_node AND x.epoch = u.epoch AND x.ended_at IS NULL, false) AS same
            FROM unnest(p_taken_ids, p_taken_epochs) AS u(id, epoch)
            JOIN claudemesh.delivery d ON d.id = u.id AND d.state = st_assigned
            LEFT JOIN claudemesh.presence x ON x.id = d.pushed_presence
        ), taken AS (
            UPDATE claudemesh.delivery d SET state = 'pushed'
            FROM t WHERE d.id = t.id AND t.same AND d.state = st_assigned
            RETURNING d.id
        ), rel AS (
            UPDATE claudemesh.delivery d SET state = 'pending', pushed_node = NULL, pushed_presence = NULL, pushed_at = NULL
            FROM t WHERE d.id = t.id AND NOT t.same AND d.state = st_assigned
            RETURNING d.recipient_member_id
        )
        -- taken runs though unread: Postgres runs every data-modifying WITH to completion.
        -- Pending again: every replica looks for the members' sessions (see 00040).
        SELECT count(*) INTO n FROM (
            SELECT claudemesh.notify_lines(p_ns || '_all', array_agg(json_build_object('k', 'd', 'm', m.id)::text ORDER BY m.id))
            FROM (SELECT DISTINCT recipient_member_id AS id FROM rel) m
            HAVING count(*) > 0) z;
    END IF;
END
$fn$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.end_sessions(p_node text, p_ns text, g_ids text[], g_epochs bigint[],
    p_grace_until timestamptz, x_ids text[], x_epochs bigint[])
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    ended int;
    mine text[];
BEGIN
    UPDATE claudemesh.presence p SET grace_until = p_grace_until, last_seen_at = now()
    FROM unnest(g_ids, g_epochs) AS c(id, epoch)
    WHERE p.id = c.id AND p.epoch = c.epoch AND p.node_id = p_node AND p.ended_at IS NULL;

    WITH x AS (
        UPDATE claudemesh.presence p SET ended_at = now(), grace_until = NULL
        FROM unnest(x_ids, x_epochs) AS c(id, epoch)
        WHERE p.id = c.id AND p.epoch = c.epoch AND p.node_id = p_node AND p.ended_at IS NULL
        RETURNING p.*
    ), ev AS (
        SELECT claudemesh.notify_lines(p_ns || '_all', array_agg(json_build_object('k', 'e', 'h', x.mesh_id, 'm', x.member_id,
            'y', 'peer_left', 'x', json_build_object('presenceId', x.id, 'pubkey', coalesce(x.session_pubkey, x.member_pubkey),
                'displayName', x.display_name, 'status', ''))::text)) AS n,
            claudemesh.audit_append(array_agg(x.mesh_id), array_agg('peer_disconnected'::text),
                array_agg(coalesce(x.session_pubkey, x.member_pubkey)),
                array_agg('{"node":' || to_json(p_node)::text || ',"presence_id":' || to_json(x.id)::text || '}'),
                array_agg((extract(epoch FROM clock_timestamp()) * 1000000)::bigint)) AS a,
            count(*) AS c
        FROM x
    )
    SELECT c INTO ended FROM ev;

    -- What these sockets held, unless their presence lives on under a newer socket (a takeover
    -- here or on another node): those rows are the newer socket's. An ended presence is never
    -- taken over (a resume makes a new one), so what is left on it is released.
    SELECT coalesce(array_agg(c.id), '{}') INTO mine
    FROM unnest(g_ids || x_ids, g_epochs || x_epochs) AS c(id, epoch)
    WHERE NOT EXISTS (SELECT 1 FROM claudemesh.presence p
                      WHERE p.id = c.id AND p.ended_at IS NULL AND (p.epoch <> c.epoch OR p.node_id <> p_node));
    PERFORM claudemesh.release_held(p_ns, mine);
    RETURN ended;
END
$$;
-- +goose StatementEnd

-- +goose Down
-- 00031's end_sessions.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.end_sessions(p_node text, p_ns text, g_ids text[], g_epochs bigint[],
    p_grace_until timestamptz, x_ids text[], x_epochs bigint[])
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    ended int;
BEGIN
    UPDATE claudemesh.presence p SET grace_until = p_grace_until, last_seen_at = now()
    FROM unnest(g_ids, g_epochs) AS c(id, epoch)
    WHERE p.id = c.id AND p.epoch = c.epoch AND p.node_id = p_node AND p.ended_at IS NULL;

    WITH x AS (
        UPDATE claudemesh.presence p SET ended_at = now(), grace_until = NULL
        FROM unnest(x_ids, x_epochs) AS c(id, epoch)
        WHERE p.id = c.id AND p.epoch = c.epoch AND p.node_id = p_node AND p.ended_at IS NULL
        RETURNING p.*
    ), ev AS (
        SELECT claudemesh.notify_lines(p_ns || '_all', array_agg(json_build_object('k', 'e', 'h', x.mesh_id, 'm', x.member_id,
            'y', 'peer_left', 'x', json_build_object('presenceId', x.id, 'pubkey', coalesce(x.session_pubkey, x.member_pubkey),
                'displayName', x.display_name, 'status', ''))::text)) AS n,
            claudemesh.audit_append(array_agg(x.mesh_id), array_agg('peer_disconnected'::text),
                array_agg(coalesce(x.session_pubkey, x.member_pubkey)),
                array_agg('{"node":' || to_json(p_node)::text || ',"presence_id":' || to_json(x.id)::text || '}'),
                array_agg((extract(epoch FROM clock_timestamp()) * 1000000)::bigint)) AS a,
            count(*) AS c
        FROM x
    )
    SELECT c INTO ended FROM ev;

    PERFORM claudemesh.release_held(p_ns, g_ids || x_ids);
    RETURN ended;
END
$$;
-- +goose StatementEnd
DROP FUNCTION claudemesh.mark_delivered_fenced(text, text[], text[], text[], text[], bigint[], bigint[], bigint[]);
