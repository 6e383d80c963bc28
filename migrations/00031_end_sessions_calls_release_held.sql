-- +goose Up
-- end_sessions releases what the ended or graced presences held by calling release_held, in
-- place of its own copy of that statement (00005). The copy joined the live sessions to the
-- released rows; release_held starts from the released rows (00027), so a plan this connection
-- kept from a moment the live sessions looked few cannot walk them all at every batch of
-- closed sockets. The same deliveries go back to pending and the same replicas are woken, with
-- the same lines; the rest of the body is 00005's.
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

-- +goose Down
-- 00005's body, which needs nothing newer: release_held comes with 00007, whose Down drops it.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.end_sessions(p_node text, p_ns text, g_ids text[], g_epochs bigint[],
    p_grace_until timestamptz, x_ids text[], x_epochs bigint[])
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    ended int;
    woken int;
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

    WITH rel AS (
        UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL, pushed_at = NULL
        WHERE state IN ('assigned', 'pushed') AND pushed_presence = ANY(g_ids || x_ids)
        RETURNING mesh_id, recipient_member_id
    ), holders AS (
        SELECT DISTINCT p.node_id, p.member_id FROM claudemesh.presence p
        JOIN (SELECT DISTINCT mesh_id, recipient_member_id FROM rel) r
          ON p.mesh_id = r.mesh_id AND p.member_id = r.recipient_member_id
        WHERE p.ended_at IS NULL AND p.grace_until IS NULL
    )
    SELECT count(*) INTO woken FROM (
        SELECT claudemesh.notify_lines(p_ns || '_n_' || h.node_id, array_agg(json_build_object('k', 'd', 'm', h.member_id)::text))
        FROM holders h GROUP BY h.node_id) z;
    RETURN ended;
END
$$;
-- +goose StatementEnd
