-- +goose Up
-- presence and audit_pending take rows at hello and message rate, and like envelope, delivery
-- and audit (00001) they now carry no foreign keys. Each key fired a trigger per row that
-- share-locked the referenced row, so every hello of a replica locked that replica's node row
-- and every hello and message of a mesh its mesh row: a row lock written per insert, and
-- MultiXacts when they overlap. A hello's presence upsert took 0.45 ms of Postgres time with
-- the keys and 0.27 ms without (10,000 hellos over 250 meshes, pg_stat_statements). The ids
-- can't dangle: meshes, members and nodes are never deleted, and the hello statement that
-- writes a presence has just read its mesh and member, on the replica's registered node.
--
-- The key on audit_pending (00014) was there so that an entry naming no mesh failed its
-- writer instead of the sealer, whose chain head for it could never be written, which would
-- stop sealing for every mesh. The append now checks the meshes by reading them (no lock:
-- meshes are never deleted), once per distinct mesh of its batch; the single-row send
-- statements of 00016 write only entries of a mesh whose member they just read. And the
-- sealer leaves an entry naming no mesh pending and seals the others: it stays visible
-- (claudemesh_audit_pending_oldest_seconds grows) without holding up anyone's chain.
ALTER TABLE claudemesh.presence DROP CONSTRAINT presence_mesh_id_fkey,
    DROP CONSTRAINT presence_member_id_fkey, DROP CONSTRAINT presence_node_id_fkey;
ALTER TABLE claudemesh.audit_pending DROP CONSTRAINT audit_pending_mesh_id_fkey;

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.audit_append(p_mesh text[], p_event text[], p_actor text[], p_data text[], p_ts bigint[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM (SELECT DISTINCT u.m FROM unnest(p_mesh) AS u(m)) d
               WHERE NOT EXISTS (SELECT 1 FROM claudemesh.mesh x WHERE x.id = d.m)) THEN
        RAISE EXCEPTION 'audit entry for a mesh that does not exist' USING ERRCODE = 'foreign_key_violation';
    END IF;
    -- plpgsql, not sql: a sql function's statement is planned at every call, this one once per
    -- connection.
    INSERT INTO claudemesh.audit_pending (mesh_id, event_type, actor, data, ts_micros)
    SELECT u.m, u.ev, u.a, u.d, u.t
    FROM unnest(p_mesh, p_event, p_actor, p_data, p_ts) WITH ORDINALITY AS u(m, ev, a, d, t, ord)
    ORDER BY u.ord;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.audit_seal(p_limit int, p_wait boolean) RETURNS int
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    k bigint := hashtextextended('claudemesh.audit_seal', 0);
    a_mesh text[];
    a_event text[];
    a_actor text[];
    a_data text[];
    a_ts bigint[];
BEGIN
    IF p_wait THEN
        PERFORM pg_advisory_xact_lock(k);
    ELSIF NOT pg_try_advisory_xact_lock(k) THEN
        RETURN 0;
    END IF;
    WITH taken AS (
        DELETE FROM claudemesh.audit_pending p
        WHERE p.id IN (SELECT q.id FROM claudemesh.audit_pending q
                       WHERE EXISTS (SELECT 1 FROM claudemesh.mesh m WHERE m.id = q.mesh_id)
                       ORDER BY q.id LIMIT p_limit)
        RETURNING p.*)
    SELECT array_agg(t.mesh_id ORDER BY t.id), array_agg(t.event_type ORDER BY t.id), array_agg(t.actor ORDER BY t.id),
           array_agg(t.data ORDER BY t.id), array_agg(t.ts_micros ORDER BY t.id)
    INTO a_mesh, a_event, a_actor, a_data, a_ts
    FROM taken t;
    IF a_mesh IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM claudemesh.audit_chain(a_mesh, a_event, a_actor, a_data, a_ts);
    RETURN cardinality(a_mesh);
END
$$;
-- +goose StatementEnd

-- +goose Down
-- The keys come back only over rows that satisfy them (NOT VALID: existing rows unchecked).
ALTER TABLE claudemesh.presence ADD CONSTRAINT presence_mesh_id_fkey FOREIGN KEY (mesh_id) REFERENCES claudemesh.mesh (id) NOT VALID,
    ADD CONSTRAINT presence_member_id_fkey FOREIGN KEY (member_id) REFERENCES claudemesh.member (id) NOT VALID,
    ADD CONSTRAINT presence_node_id_fkey FOREIGN KEY (node_id) REFERENCES claudemesh.node (id) NOT VALID;
ALTER TABLE claudemesh.audit_pending ADD CONSTRAINT audit_pending_mesh_id_fkey FOREIGN KEY (mesh_id) REFERENCES claudemesh.mesh (id) NOT VALID;
