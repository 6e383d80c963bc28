-- +goose Up
-- Sealing in one pass over the taken entries. The seal took its entries with five aggregates,
-- each sorting them by id, then audit_chain sorted them again six times by mesh, built every
-- entry's hashed fields in one more array and walked the arrays. It cost 22-30 µs per entry
-- (medians of 1,600-entry seals: 35-49 ms, one session, no other load): at saturation the
-- sealer used more of Postgres than any statement but the send. Now the taken entries come
-- sorted once, by mesh and id, and one loop hashes each as it arrives and keeps the row whole
-- for the insert: 24-34 ms for the same 1,600, and still linear (25,600 entries: 340-460 ms,
-- against 470-570). The chain is the same entry for entry: the mesh order (bytewise, the
-- heads locked in one order by every sealer), the order within a mesh (by id), the hashed bytes
-- (audit_field of each field, as broker/audit hashes them), the entries left pending when their
-- mesh does not exist. audit_chain stays for the Down of 00014 and 00020.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.audit_seal(p_limit int, p_wait boolean) RETURNS int
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    k bigint := hashtextextended('claudemesh.audit_seal', 0);
    e claudemesh.audit_pending;
    cur text := NULL;
    s bigint;
    prev text;
    o_ent claudemesh.audit_pending[] := '{}';
    o_seq bigint[] := '{}';
    o_prev text[] := '{}';
    o_hash text[] := '{}';
    h_mesh text[] := '{}';
    h_seq bigint[] := '{}';
    h_hash text[] := '{}';
BEGIN
    IF p_wait THEN
        PERFORM pg_advisory_xact_lock(k);
    ELSIF NOT pg_try_advisory_xact_lock(k) THEN
        RETURN 0;
    END IF;
    FOR e IN
        WITH taken AS (
            DELETE FROM claudemesh.audit_pending p
            WHERE p.id IN (SELECT q.id FROM claudemesh.audit_pending q
                           WHERE EXISTS (SELECT 1 FROM claudemesh.mesh m WHERE m.id = q.mesh_id)
                           ORDER BY q.id LIMIT p_limit)
            RETURNING p.*)
        SELECT t.* FROM taken t ORDER BY t.mesh_id COLLATE "C", t.id
    LOOP
        IF cur IS DISTINCT FROM e.mesh_id THEN
            IF cur IS NOT NULL THEN
                h_mesh := h_mesh || cur; h_seq := h_seq || s; h_hash := h_hash || prev;
            END IF;
            cur := e.mesh_id;
            -- Creates the head at genesis, and locks it, in mesh order.
            INSERT INTO claudemesh.audit_head AS a (mesh_id, seq, hash) VALUES (cur, 0, repeat('0', 64))
            ON CONFLICT (mesh_id) DO UPDATE SET seq = a.seq
            RETURNING a.seq, a.hash INTO s, prev;
        END IF;
        s := s + 1;
        o_ent := o_ent || e; o_seq := o_seq || s; o_prev := o_prev || prev;
        -- audit_field of 'claudemesh-audit-v1', of prev (64 hex), then of each field.
        prev := encode(sha256(convert_to('19:claudemesh-audit-v1' || E'\n64:' || prev || E'\n' ||
                    claudemesh.audit_field(e.mesh_id) || claudemesh.audit_field(e.event_type) ||
                    claudemesh.audit_field(e.actor) || claudemesh.audit_field(e.data) ||
                    claudemesh.audit_field(e.ts_micros::text), 'UTF8')), 'hex');
        o_hash := o_hash || prev;
    END LOOP;
    IF cur IS NULL THEN
        RETURN 0;
    END IF;
    h_mesh := h_mesh || cur; h_seq := h_seq || s; h_hash := h_hash || prev;
    INSERT INTO claudemesh.audit (mesh_id, seq, event_type, actor, data, ts_micros, prev_hash, hash)
    SELECT o.mesh_id, o.s, o.event_type, o.actor, o.data::jsonb, o.ts_micros, o.p, o.h
    -- The entries' columns come last and keep their names, whatever columns the table gains.
    FROM ROWS FROM (unnest(o_seq), unnest(o_prev), unnest(o_hash), unnest(o_ent)) AS o(s, p, h);
    UPDATE claudemesh.audit_head a SET seq = h.s, hash = h.h
    FROM unnest(h_mesh, h_seq, h_hash) AS h(m, s, h) WHERE a.mesh_id = h.m;
    RETURN cardinality(o_hash);
END
$$;
-- +goose StatementEnd

-- +goose Down
-- The body above stays: same signature and chain, and rolling back should not bring back the
-- slower form.
