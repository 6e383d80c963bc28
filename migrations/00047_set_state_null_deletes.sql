-- +goose Up
-- set_state with a null value deletes the key. Before, null was stored as a row like any value,
-- so it still counted against MAX_STATE_KEYS_PER_MESH and the mesh's bytes while the quota's
-- refusal told clients to free room by setting keys to null: a full mesh stayed full. Now the
-- row goes, in the same one statement: no quota applies (a delete only frees room), the other
-- sessions get state_change {key, value: null, updatedBy}, and the audit entry is written.
-- Deleting a missing key changes nothing: it succeeds and tells no one. The row returned for a
-- delete is the key as readers now see it (value null), so callers of the previous release,
-- which read "no row" as over the quota, keep working unchanged: same signature, replaced.
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

-- Keys set to null before this release were meant deleted: they go too, freeing their room.
DELETE FROM claudemesh.state WHERE value = 'null'::jsonb;

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.set_state(p_ns text, p_mesh text, p_key text, p_value jsonb, p_updated_by text,
    p_max_keys bigint, p_max_bytes bigint, p_presence text, p_actor text, p_audit_data text)
RETURNS SETOF claudemesh.state LANGUAGE plpgsql AS $$
DECLARE
    st claudemesh.state;
    change text;
BEGIN
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
    change := json_build_object('type', 'state_change', 'key', st.key, 'value', st.value, 'updatedBy', st.updated_by)::text;
    PERFORM claudemesh.notify_lines(p_ns || '_all', ARRAY[json_build_object('k', 't', 'h', p_mesh, 'y', p_key, 'p', p_presence,
        -- Small values ride along; receivers read large ones back.
        'x', CASE WHEN octet_length(change) < 7000 THEN change::json END)::text]);
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['state_set'], ARRAY[p_actor], ARRAY[p_audit_data],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    RETURN NEXT st;
END
$$;
-- +goose StatementEnd
