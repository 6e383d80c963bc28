-- +goose Up
-- Shared-state changes a replica did not hear are caught up. A replica's LISTEN connection that
-- dropped, or its notification queue that overflowed, lost the state_change notices sent
-- meanwhile: the deliveries, statuses and kicks were caught up, the state was not, and its
-- sessions kept a stale view of the keys until they asked (get_state, list_state). Now the
-- replica reads, for the meshes of its sessions, the keys changed since shortly before the gap,
-- and tells its sessions as the notices would have.
--  - state.updated_presence: the writer's session, which (as with the notice) is not told its
--    own change.
--  - state_deleted: a deleted key's deletion (who, which session, when), kept an hour (the
--    sweeper), removed when the key is written again. A deletion is a state_change with value
--    null.
--  - state (mesh_id, updated_at): the keys of a mesh changed since a time, by index.
--  - set_state takes the mesh's lock for deletes too, and gives each of a key's writes and its
--    deletion a later time than the one before (commit order, even if the clock steps back).
--    Same signature: replicas of the previous release call it unchanged and never read the
--    new table.
--  - state_changes_since: what a replica catching up reads.
ALTER TABLE claudemesh.state ADD COLUMN updated_presence text;
CREATE INDEX state_mesh_updated ON claudemesh.state (mesh_id, updated_at);
CREATE TABLE claudemesh.state_deleted (
    mesh_id          text NOT NULL,
    key              text NOT NULL,
    deleted_by       text NOT NULL DEFAULT '',
    deleted_presence text NOT NULL DEFAULT '',
    deleted_at       timestamptz NOT NULL,
    PRIMARY KEY (mesh_id, key)
);
CREATE INDEX state_deleted_mesh_at ON claudemesh.state_deleted (mesh_id, deleted_at); -- the catch-up
CREATE INDEX state_deleted_at ON claudemesh.state_deleted (deleted_at); -- the sweep
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.set_state(p_ns text, p_mesh text, p_key text, p_value jsonb, p_updated_by text,
    p_max_keys bigint, p_max_bytes bigint, p_presence text, p_actor text, p_audit_data text)
RETURNS SETOF claudemesh.state LANGUAGE plpgsql AS $$
DECLARE
    st claudemesh.state;
    change text;
    line text;
    at timestamptz;
    gone timestamptz;
BEGIN
    -- One writer of the mesh at a time, until its commit (00059), deletes included: a key's
    -- writes then get increasing times in commit order, which the catch-up and the replicas'
    -- memo of what they told their sessions compare.
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.state:' || p_mesh, 0));
    at := clock_timestamp();
    IF p_value IS NULL OR jsonb_typeof(p_value) = 'null' THEN
        DELETE FROM claudemesh.state WHERE mesh_id = p_mesh AND key = p_key RETURNING updated_at INTO gone;
        IF NOT FOUND THEN
            st.mesh_id := p_mesh;
            st.key := p_key;
            st.value := 'null'::jsonb;
            st.updated_by := p_updated_by;
            st.updated_at := at;
            st.size := octet_length(p_key) + 4;
            RETURN NEXT st;
            RETURN;
        END IF;
        -- Later than the write it deletes, even if the clock stepped back.
        at := greatest(at, gone + interval '1 microsecond');
        -- The deletion, for replicas catching up on the notices they lost.
        INSERT INTO claudemesh.state_deleted (mesh_id, key, deleted_by, deleted_presence, deleted_at)
        VALUES (p_mesh, p_key, p_updated_by, p_presence, at)
        ON CONFLICT (mesh_id, key) DO UPDATE SET deleted_by = EXCLUDED.deleted_by,
            deleted_presence = EXCLUDED.deleted_presence, deleted_at = EXCLUDED.deleted_at;
        st.mesh_id := p_mesh;
        st.key := p_key;
        st.value := 'null'::jsonb;
        st.updated_by := p_updated_by;
        st.updated_at := at;
        st.size := octet_length(p_key) + 4;
    ELSE
        -- Later than the key's deletion, if it has one (greatest skips a null).
        SELECT d.deleted_at INTO gone FROM claudemesh.state_deleted d WHERE d.mesh_id = p_mesh AND d.key = p_key;
        at := greatest(at, gone + interval '1 microsecond');
        WITH cur AS (
            SELECT count(*) AS keys, COALESCE(sum(size), 0)::bigint AS bytes,
                COALESCE(sum(size) FILTER (WHERE key = p_key), 0)::bigint AS old_size,
                COALESCE(bool_or(key = p_key), false) AS present
            FROM claudemesh.state WHERE mesh_id = p_mesh
        )
        INSERT INTO claudemesh.state AS s (mesh_id, key, value, updated_by, updated_at, updated_presence)
        SELECT p_mesh, p_key, p_value, p_updated_by, at, p_presence FROM cur
        WHERE (cur.present OR cur.keys < p_max_keys)
          AND cur.bytes - cur.old_size + octet_length(p_key) + octet_length(p_value::text) <= p_max_bytes
        ON CONFLICT (mesh_id, key) DO UPDATE SET value = EXCLUDED.value, updated_by = EXCLUDED.updated_by,
            updated_at = greatest(EXCLUDED.updated_at, s.updated_at + interval '1 microsecond'),
            updated_presence = EXCLUDED.updated_presence
        RETURNING s.* INTO st;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        DELETE FROM claudemesh.state_deleted WHERE mesh_id = p_mesh AND key = p_key;
    END IF;
    change := json_build_object('type', 'state_change', 'key', st.key, 'value', st.value, 'updatedBy', st.updated_by)::text;
    -- Small values ride along (a delete always does); receivers read large ones back, and send
    -- them only when the row still has this write's updated_at ('i', microseconds): a later
    -- write's notice follows and is sent in its turn. Measured as sent (00062).
    line := json_build_object('k', 't', 'h', p_mesh, 'y', p_key, 'p', p_presence,
        'i', (extract(epoch FROM st.updated_at) * 1000000)::bigint,
        'x', CASE WHEN octet_length(change) < 7000 THEN change::json END)::text;
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
-- The shared-state changes of these meshes at or after p_since, written or deleted: for each
-- mesh its newest p_per_mesh, oldest first (a replica asks for one more than it sends, to know
-- it left some out). By index: the mesh's keys and its deletions by time.
CREATE FUNCTION claudemesh.state_changes_since(p_meshes text[], p_since timestamptz, p_per_mesh int)
RETURNS TABLE (mesh_id text, key text, value jsonb, updated_by text, presence_id text, at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT m.mesh_id, c.key, c.value, c.updated_by, c.presence_id, c.at
    FROM unnest(p_meshes) AS m(mesh_id)
    CROSS JOIN LATERAL (
        SELECT u.* FROM (
            (SELECT s.key, s.value, s.updated_by, coalesce(s.updated_presence, '') AS presence_id, s.updated_at AS at
             FROM claudemesh.state s WHERE s.mesh_id = m.mesh_id AND s.updated_at >= p_since
             ORDER BY s.updated_at DESC LIMIT p_per_mesh)
            UNION ALL
            (SELECT d.key, 'null'::jsonb, d.deleted_by, d.deleted_presence, d.deleted_at
             FROM claudemesh.state_deleted d WHERE d.mesh_id = m.mesh_id AND d.deleted_at >= p_since
             ORDER BY d.deleted_at DESC LIMIT p_per_mesh)
        ) u ORDER BY u.at DESC LIMIT p_per_mesh
    ) c
    ORDER BY m.mesh_id, c.at
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION claudemesh.state_changes_since;
-- The body of 00062.
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

DROP TABLE claudemesh.state_deleted;
DROP INDEX claudemesh.state_mesh_updated;
ALTER TABLE claudemesh.state DROP COLUMN updated_presence;
