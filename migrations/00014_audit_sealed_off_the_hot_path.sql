-- +goose Up
-- The audit chain is sealed off the hot path. An append (claudemesh.audit_append, called
-- inside send_batch, hello and every other writer, in the writer's own transaction) now only
-- records the entry in audit_pending: no lock, no hash. A sealer (claudemesh.audit_seal, run by
-- every replica each second and by every reader of the chain; one at a time, by an advisory
-- lock) moves committed pending entries onto their meshes' chains in one statement per batch,
-- in the order they were appended within a transaction.
--
-- Why: appending locked the mesh's chain head from the append until the writer's commit, so
-- every send batch and hello of one mesh queued behind the last one's commit, and the hashing
-- (four statements and a loop per call) was 40 % of a one-message send batch's time
-- (pgbench, one client: 1.57 ms per call with it, 0.94 ms without). An acked message still
-- commits with its audit entry; the entry is hashed into the chain within about a second.
-- The chain itself is unchanged (same hash, same seq from 1, same verification): chain order is
-- the order in which entries were sealed.
CREATE TABLE claudemesh.audit_pending (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Checked here, as the chain would check it, so a bad entry fails its writer and never
    -- the sealer (which would stop chaining for every mesh).
    mesh_id text NOT NULL REFERENCES claudemesh.mesh (id),
    event_type text NOT NULL,
    actor text NOT NULL,
    -- Canonical JSON as the writer encoded it: the hash is taken over this text.
    data text NOT NULL CHECK (data::jsonb IS NOT NULL),
    ts_micros bigint NOT NULL
) WITH (
    -- A queue: every row is deleted within seconds of its insert. Vacuumed by row count, not
    -- by a fraction of a table that is always nearly empty, so dead rows never pile up in
    -- front of the sealer's ORDER BY id scan.
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000
);

-- The chaining body (00010) keeps its code under a new name; only the sealer calls it. (In a DO
-- block, and the new append is CREATE OR REPLACE, because sqlc's schema reader does not follow
-- a function's rename.)
-- +goose StatementBegin
DO $$ BEGIN
    ALTER FUNCTION claudemesh.audit_append(text[], text[], text[], text[], bigint[]) RENAME TO audit_chain;
END $$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.audit_append(p_mesh text[], p_event text[], p_actor text[], p_data text[], p_ts bigint[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- plpgsql, not sql: a sql function's statement is planned at every call, this one once per
    -- connection.
    INSERT INTO claudemesh.audit_pending (mesh_id, event_type, actor, data, ts_micros)
    SELECT u.m, u.ev, u.a, u.d, u.t
    FROM unnest(p_mesh, p_event, p_actor, p_data, p_ts) WITH ORDINALITY AS u(m, ev, a, d, t, ord)
    ORDER BY u.ord;
END
$$;
-- +goose StatementEnd

-- Seals up to p_limit committed pending entries and returns how many. With p_wait false it
-- returns 0 at once when another session is sealing; with p_wait true it waits for it (a reader
-- that must see every committed entry).
-- +goose StatementBegin
CREATE FUNCTION claudemesh.audit_seal(p_limit int, p_wait boolean) RETURNS int
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
        WHERE p.id IN (SELECT q.id FROM claudemesh.audit_pending q ORDER BY q.id LIMIT p_limit)
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
-- What is pending goes onto the chains first, so rolling back loses no entry: the lock stops
-- writers of the new version from adding entries between the seal and the drop.
LOCK TABLE claudemesh.audit_pending IN EXCLUSIVE MODE;
SELECT claudemesh.audit_seal(2147483647, true);
DROP FUNCTION claudemesh.audit_seal(int, boolean);
DROP FUNCTION claudemesh.audit_append(text[], text[], text[], text[], bigint[]);
-- +goose StatementBegin
DO $$ BEGIN
    ALTER FUNCTION claudemesh.audit_chain(text[], text[], text[], text[], bigint[]) RENAME TO audit_append;
END $$;
-- +goose StatementEnd
DROP TABLE claudemesh.audit_pending;
