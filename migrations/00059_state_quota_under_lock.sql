-- +goose Up
-- set_state holds the mesh's shared-state quota against concurrent writers. Its check counted
-- the mesh's keys and bytes in the statement's snapshot, so writers of new keys on several
-- replicas (or sessions of one) at once each saw room for one more and all were stored: a
-- mesh at MAX_STATE_KEYS_PER_MESH - 1 took as many keys as writers raced, and its bytes went
-- past MAX_STATE_BYTES_PER_MESH the same way. A write (not a delete) now takes a per-mesh
-- transaction lock before the check, held for the statement's server time until its commit,
-- never across a round trip.
--
-- Its notice names the write (updated_at, now the write's own clock time under that lock, in
-- microseconds: 'i'), so a replica reading a large value back sends it only if it is still
-- that write's: before, a replica behind a burst (large, small, large) read the last value
-- back for the first notice and told its sessions the newer value, then the older, then the
-- newer again. Replicas of the previous release ignore 'i'. Same signature, replaced:
-- replicas of the previous release call it unchanged.
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

-- +goose Down
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
        WITH cur AS (
            SELECT count(*) AS keys, COALESCE(sum(size), 0)::bigint AS bytes,
                COALESCE(sum(size) FILTER (WHERE key = p_key), 0)::bigint AS old_size,
                COALESCE(bool_or(key = p_key), false) AS present
            FROM claudemesh.state WHERE mesh_id = p_mesh
        )
        INSERT INTO claudemesh.state AS s (mesh_id, key, value, updated_by, updated_at)
        SELECT p_mesh, p_key, p_value, p_updated_by, now() FROM cur
        WHERE (cur.present OR cur.keys < p_max_keys)
          AND cur.bytes - cur.old_size + octet_length(p_key) + octet_length(p_value::text) <= p_max_bytes
        ON CONFLICT (mesh_id, key) DO UPDATE SET value = EXCLUDED.value, updated_by = EXCLUDED.updated_by, updated_at = now()
        RETURNING s.* INTO st;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    change := json_build_object('type', 'state_change', 'key', st.key, 'value', st.value, 'updatedBy', st.updated_by)::text;
    PERFORM claudemesh.notify_lines(p_ns || '_all', ARRAY[json_build_object('k', 't', 'h', p_mesh, 'y', p_key, 'p', p_presence,
        -- Small values ride along (a delete always does); receivers read large ones back.
        'x', CASE WHEN octet_length(change) < 7000 THEN change::json END)::text]);
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['state_set'], ARRAY[p_actor], ARRAY[p_audit_data],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    RETURN NEXT st;
END
$$;
-- +goose StatementEnd
