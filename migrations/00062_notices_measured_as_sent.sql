-- +goose Up
-- Notices are measured as they are sent. Postgres refuses a notification of 8,000 bytes or more
-- and fails the statement that sends it; two notices were sized before JSON escaping:
--  - release_to let a held message ride along inline when its nonce and ciphertext came to
--    6,000 bytes stored, but they are opaque strings, and quotes or control characters grow
--    when escaped (up to six times). Such a message, held for a recipient at work, failed its
--    change to idle: set_status and its hooks answered an internal error until the message
--    expired, and it stayed working for the whole mesh. It now rides along only if its line
--    fits; otherwise the claim the wake-up starts takes it, in order, like a large one.
--  - set_state sent the change inline when it was under 7,000 bytes, but the line also holds
--    the key again, and a key of control characters escapes to 1,536 bytes: such a write
--    failed, every time. A line over 7,600 bytes now goes without the change, which the
--    replicas read back as for a large value.
-- Same signatures, replaced in place: replicas of the previous release call them unchanged.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.set_state(p_ns text, p_mesh text, p_key text, p_value jsonb, p_updated_by text,
    p_max_keys bigint, p_max_bytes bigint, p_presence text, p_actor text, p_audit_data text)
RETURNS SETOF claudemesh.state LANGUAGE plpgsql AS $$
DECLARE
    st claudemesh.state;
    change text;
    line text;
    deleted boolean;
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) = 'null' THEN
        DELETE FROM claudemesh.state WHERE mesh_id = p_mesh AND key = p_key;
        deleted := FOUND;
        st.mesh_id := p_mesh;
        st.key := p_key;
        st.value := 'null'::jsonb;
        st.updated_by := p_updated_by;
        st.updated_at := now();
        st.size := octet_length(p_key) + 4;
        IF NOT deleted THEN
            RETURN NEXT st;
            RETURN;
        END IF;
    ELSE
        -- One writer of the mesh at a time, until its commit (00059).
        PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.state:' || p_mesh, 0));
        WITH cur AS (
            SELECT count(*) AS keys, COALESCE(sum(size), 0)::bigint AS bytes,
                COALESCE(sum(size) FILTER (WHERE key = p_key), 0)::bigint AS old_size,
                COALESCE(bool_or(key = p_key), false) AS present
            FROM claudemesh.state WHERE mesh_id = p_mesh
        )
        INSERT INTO claudemesh.state AS s (mesh_id, key, value, updated_by, updated_at)
        SELECT p_mesh, p_key, p_value, p_updated_by, clock_timestamp() FROM cur
        WHERE (cur.present OR cur.keys < p_max_keys)
          AND cur.bytes - cur.old_size + octet_length(p_key) + octet_length(p_value::text) <= p_max_bytes
        ON CONFLICT (mesh_id, key) DO UPDATE SET value = EXCLUDED.value, updated_by = EXCLUDED.updated_by, updated_at = EXCLUDED.updated_at
        RETURNING s.* INTO st;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    change := json_build_object('type', 'state_change', 'key', st.key, 'value', st.value, 'updatedBy', st.updated_by)::text;
    -- Small values ride along (a delete always does); receivers read large ones back, and send
    -- them only when the row still has this write's updated_at ('i', microseconds): a later
    -- write's notice follows and is sent in its turn.
    line := json_build_object('k', 't', 'h', p_mesh, 'y', p_key, 'p', p_presence,
        'i', (extract(epoch FROM st.updated_at) * 1000000)::bigint,
        'x', CASE WHEN octet_length(change) < 7000 THEN change::json END)::text;
    -- Measured as sent: the key is in the line twice, and escaped (a control character takes
    -- six bytes), so a change under 7,000 bytes could still make a notice over Postgres's 8,000.
    IF octet_length(line) > 7600 THEN
        line := json_build_object('k', 't', 'h', p_mesh, 'y', p_key, 'p', p_presence,
            'i', (extract(epoch FROM st.updated_at) * 1000000)::bigint, 'x', NULL::json)::text;
    END IF;
    PERFORM claudemesh.notify_lines(p_ns || '_all', ARRAY[line]);
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['state_set'], ARRAY[p_actor], ARRAY[p_audit_data],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    RETURN NEXT st;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.release_to(p claudemesh.presence, p_ns text, p_limit int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    lines text[];
    wake boolean;
    n int;
BEGIN
    -- In id order, up to the first that cannot ride along (too large for a notification): one
    -- after it pushed inline would reach the session first (00053). The claim the wake-up below
    -- starts takes the rest in order, once the router has written these.
    -- A push rides along only if its line, escaped as sent, fits a notification: nonce and
    -- ciphertext are opaque strings, and quotes or control characters grow when escaped.
    WITH c AS MATERIALIZED (
        SELECT d.id, octet_length(e.nonce) + octet_length(e.ciphertext) <= claudemesh.inline_max()
                AND octet_length(claudemesh.push_line(d.id, p.id, e)) <= 7600 AS fits
        FROM claudemesh.delivery d JOIN claudemesh.envelope e ON e.id = d.envelope_id
        WHERE d.recipient_member_id = p.member_id AND d.state = 'pending'
          AND claudemesh.claimable(d, p.member_id, coalesce(p.session_pubkey, ''), p.session_id, p.status = 'idle')
        ORDER BY d.id LIMIT p_limit
        FOR UPDATE OF d SKIP LOCKED
    ), up AS (
        UPDATE claudemesh.delivery d SET state = 'assigned', pushed_node = p.node_id, pushed_presence = p.id,
            pushed_at = now(), acked_at = NULL
        FROM c WHERE d.id = c.id AND c.id < coalesce((SELECT min(f.id) FROM c f WHERE NOT f.fits), 9223372036854775807)
        RETURNING d.id, d.envelope_id
    )
    SELECT array_agg(claudemesh.push_line(up.id, p.id, e) ORDER BY up.id), count(*)
    INTO lines, n
    FROM up JOIN claudemesh.envelope e ON e.id = up.envelope_id;
    -- What could not ride along (too large, after one too large, or beyond the limit) is claimed
    -- by the node.
    SELECT EXISTS (SELECT 1 FROM claudemesh.delivery d
                   WHERE d.recipient_member_id = p.member_id AND d.state = 'pending'
                     AND claudemesh.claimable(d, p.member_id, coalesce(p.session_pubkey, ''), p.session_id, p.status = 'idle'))
    INTO wake;
    IF wake THEN
        lines := coalesce(lines, '{}') || json_build_object('k', 'd', 'm', p.member_id)::text;
    END IF;
    PERFORM claudemesh.notify_lines(p_ns || '_n_' || p.node_id, lines);
    RETURN coalesce(n, 0);
END
$$;
-- +goose StatementEnd

-- +goose Down
-- The bodies of 00059 (set_state) and 00053 (release_to).
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.set_state(p_ns text, p_mesh text, p_key text, p_value jsonb, p_updated_by text,
    p_max_keys bigint, p_max_bytes bigint, p_presence text, p_actor text, p_audit_data text)
RETURNS SETOF claudemesh.state LANGUAGE plpgsql AS $$
DECLARE
    st claudemesh.state;
    change text;
    deleted boolean;
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) = 'null' THEN
        DELETE FROM claudemesh.state WHERE mesh_id = p_mesh AND key = p_key;
        deleted := FOUND;
        st.mesh_id := p_mesh;
        st.key := p_key;
        st.value := 'null'::jsonb;
        st.updated_by := p_updated_by;
        st.updated_at := now();
        st.size := octet_length(p_key) + 4;
        IF NOT deleted THEN
            RETURN NEXT st;
            RETURN;
        END IF;
    ELSE
        -- One writer of the mesh at a time, until its commit: the check below then counts what
        -- every earlier writer stored. Without it, writers on several replicas each counted the
        -- mesh without the others and all went past the quota.
        PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.state:' || p_mesh, 0));
        WITH cur AS (
            SELECT count(*) AS keys, COALESCE(sum(size), 0)::bigint AS bytes,
                COALESCE(sum(size) FILTER (WHERE key = p_key), 0)::bigint AS old_size,
                COALESCE(bool_or(key = p_key), false) AS present
            FROM claudemesh.state WHERE mesh_id = p_mesh
        )
        INSERT INTO claudemesh.state AS s (mesh_id, key, value, updated_by, updated_at)
        SELECT p_mesh, p_key, p_value, p_updated_by, clock_timestamp() FROM cur
        WHERE (cur.present OR cur.keys < p_max_keys)
          AND cur.bytes - cur.old_size + octet_length(p_key) + octet_length(p_value::text) <= p_max_bytes
        ON CONFLICT (mesh_id, key) DO UPDATE SET value = EXCLUDED.value, updated_by = EXCLUDED.updated_by, updated_at = EXCLUDED.updated_at
        RETURNING s.* INTO st;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    change := json_build_object('type', 'state_change', 'key', st.key, 'value', st.value, 'updatedBy', st.updated_by)::text;
    PERFORM claudemesh.notify_lines(p_ns || '_all', ARRAY[json_build_object('k', 't', 'h', p_mesh, 'y', p_key, 'p', p_presence,
        -- Small values ride along (a delete always does); receivers read large ones back, and
        -- send them only when the row still has this write's updated_at ('i', microseconds):
        -- a later write's notice follows and is sent in its turn.
        'i', (extract(epoch FROM st.updated_at) * 1000000)::bigint,
        'x', CASE WHEN octet_length(change) < 7000 THEN change::json END)::text]);
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['state_set'], ARRAY[p_actor], ARRAY[p_audit_data],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    RETURN NEXT st;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.release_to(p claudemesh.presence, p_ns text, p_limit int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    lines text[];
    wake boolean;
    n int;
BEGIN
    -- In id order, up to the first that cannot ride along (too large for a notification): one
    -- after it pushed inline would reach the session first (00053). The claim the wake-up below
    -- starts takes the rest in order, once the router has written these.
    WITH c AS MATERIALIZED (
        SELECT d.id, octet_length(e.nonce) + octet_length(e.ciphertext) <= claudemesh.inline_max() AS fits
        FROM claudemesh.delivery d JOIN claudemesh.envelope e ON e.id = d.envelope_id
        WHERE d.recipient_member_id = p.member_id AND d.state = 'pending'
          AND claudemesh.claimable(d, p.member_id, coalesce(p.session_pubkey, ''), p.session_id, p.status = 'idle')
        ORDER BY d.id LIMIT p_limit
        FOR UPDATE OF d SKIP LOCKED
    ), up AS (
        UPDATE claudemesh.delivery d SET state = 'assigned', pushed_node = p.node_id, pushed_presence = p.id,
            pushed_at = now(), acked_at = NULL
        FROM c WHERE d.id = c.id AND c.id < coalesce((SELECT min(f.id) FROM c f WHERE NOT f.fits), 9223372036854775807)
        RETURNING d.id, d.envelope_id
    )
    SELECT array_agg(claudemesh.push_line(up.id, p.id, e) ORDER BY up.id), count(*)
    INTO lines, n
    FROM up JOIN claudemesh.envelope e ON e.id = up.envelope_id;
    -- What could not ride along (too large, after one too large, or beyond the limit) is claimed
    -- by the node.
    SELECT EXISTS (SELECT 1 FROM claudemesh.delivery d
                   WHERE d.recipient_member_id = p.member_id AND d.state = 'pending'
                     AND claudemesh.claimable(d, p.member_id, coalesce(p.session_pubkey, ''), p.session_id, p.status = 'idle'))
    INTO wake;
    IF wake THEN
        lines := coalesce(lines, '{}') || json_build_object('k', 'd', 'm', p.member_id)::text;
    END IF;
    PERFORM claudemesh.notify_lines(p_ns || '_n_' || p.node_id, lines);
    RETURN coalesce(n, 0);
END
$$;
-- +goose StatementEnd
