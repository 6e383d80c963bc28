-- +goose Up
-- The catch-up poll's give-back (00037's second arm): pushes assigned on this node to a session
-- that is no longer live here go back to pending, and the nodes holding their members' live
-- sessions are woken as release_held wakes them, so the session's own replica takes them at
-- once instead of at its next poll. Every condition the poll read is checked again under the
-- row lock: a row that went back to pending and was assigned anew since (to a live session)
-- is left alone.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.give_back_assigned(p_ns text, p_node text, p_ids bigint[], p_stale_seconds float8)
RETURNS int LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
    n int;
    woken_nodes int;
BEGIN
    WITH rel AS (
        UPDATE claudemesh.delivery d SET state = 'pending', pushed_node = NULL, pushed_presence = NULL, pushed_at = NULL
        WHERE d.id = ANY (p_ids) AND d.state = 'assigned' AND d.pushed_node = p_node
          AND d.pushed_at < now() - make_interval(secs => p_stale_seconds)
          AND NOT EXISTS (SELECT 1 FROM claudemesh.presence x
                          WHERE x.id = d.pushed_presence AND x.node_id = p_node AND x.ended_at IS NULL)
        RETURNING d.mesh_id, d.recipient_member_id
    ), holders AS (
        SELECT DISTINCT p.node_id, p.member_id
        FROM (SELECT DISTINCT mesh_id, recipient_member_id FROM rel) r
        CROSS JOIN LATERAL (
            SELECT x.node_id, x.member_id FROM claudemesh.presence x
            WHERE x.mesh_id = r.mesh_id AND x.member_id = r.recipient_member_id
              AND x.ended_at IS NULL AND x.grace_until IS NULL
            OFFSET 0) p
    ), woken AS (
        SELECT claudemesh.notify_lines(p_ns || '_n_' || h.node_id, array_agg(json_build_object('k', 'd', 'm', h.member_id)::text))
        FROM holders h GROUP BY h.node_id
    )
    SELECT (SELECT count(*) FROM rel), (SELECT count(*) FROM woken) INTO n, woken_nodes;
    RETURN n;
END
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION IF EXISTS claudemesh.give_back_assigned(text, text, bigint[], float8);
