-- +goose Up
-- A send batch in one statement (see 00005 and 00007), with a plan that is cached and does not
-- depend on estimates: a static query (planned once per connection, not at every call: planning
-- this statement costs more than running it for one envelope), whose lookups (a target's
-- member, a session key's member, the session a direct message goes to, an earlier envelope
-- with the same client_message_id) are each an index probe per envelope (LATERAL ... LIMIT 1).
-- The cached plan is generic: it guesses ten rows per array (one per probe), so it would join
-- the batch's own rows in nested loops, quadratic in the batch (seconds for 500), and probe a
-- small table by scanning it, once per envelope. Inside the function nested loops and
-- sequential scans are therefore off: the batch's rows join by hashing whatever the guess,
-- and each probe (which can only be a nested loop) uses its index. JIT is off too: those
-- penalties inflate the plan's cost past JIT's threshold, and compiling would take longer than
-- running. The replica passes
-- each envelope's push frame, encoded once (e_frame; '' when too large to ride in a
-- notification): the notifications to other replicas carry it as is ('w' lines), so Postgres
-- builds no JSON per delivery. A new overload; the 00007 one stays for replicas of the previous
-- version during a rolling deploy.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.send_batch(p_node text, p_ns text,
    e_ids text[], e_mesh text[], e_sender text[], e_sender_pub text[], e_sender_member_pub text[],
    e_spec text[], e_kind text[], e_key text[], e_prio text[], e_nonce text[], e_cipher text[],
    e_client text[], e_created timestamptz[], e_expires timestamptz[],
    e_cmid text[], e_fp text[], e_sender_name text[], e_frame text[])
RETURNS TABLE (row_kind text, idx int, queued boolean, recipients int, delivery_id bigint, presence_id text,
               assigned boolean, original text, fingerprint text)
LANGUAGE plpgsql SET enable_nestloop = off SET enable_seqscan = off SET jit = off AS $fn$
#variable_conflict use_column
BEGIN
    -- The arrays are unnested once: subscripting a text array is a walk, and per row it would
    -- make the batch quadratic.
    RETURN QUERY
    WITH input AS MATERIALIZED (
        SELECT u.ord::int AS i, u.id, u.mesh_id, u.sender, u.sender_pub, u.sender_member_pub, u.spec, u.kind, u.key,
               u.prio, u.nonce, u.cipher, u.client, u.created, u.expires, u.cmid, u.fp, u.sender_name, u.frame
        FROM unnest(e_ids, e_mesh, e_sender, e_sender_pub, e_sender_member_pub, e_spec, e_kind, e_key, e_prio,
                    e_nonce, e_cipher, e_client, e_created, e_expires, e_cmid, e_fp, e_sender_name, e_frame)
            WITH ORDINALITY AS u(id, mesh_id, sender, sender_pub, sender_member_pub, spec, kind, key, prio, nonce,
                                 cipher, client, created, expires, cmid, fp, sender_name, frame, ord)
    ), prior AS MATERIALIZED (
        -- Retries: the sender already stored an envelope with this client_message_id.
        SELECT n.i, o.id AS orig, o.request_fingerprint AS fp
        FROM input n CROSS JOIN LATERAL (
            SELECT o.id, o.request_fingerprint FROM claudemesh.envelope o
            WHERE o.mesh_id = n.mesh_id AND o.sender_member_id = n.sender AND o.client_message_id = n.cmid
              AND o.client_message_id <> '' LIMIT 1) o
        WHERE n.cmid <> ''
    ), env AS MATERIALIZED (
        SELECT n.* FROM input n WHERE NOT EXISTS (SELECT 1 FROM prior p WHERE p.i = n.i)
    ), direct AS (
        -- A member key first; else a session key of a live member.
        SELECT e.i, e.mesh_id, e.prio, coalesce(m.id, k.member_id) AS member_id,
               CASE WHEN m.id IS NULL THEN e.key END AS session_pubkey
        FROM env e
        LEFT JOIN LATERAL (
            SELECT m.id FROM claudemesh.member m
            WHERE m.mesh_id = e.mesh_id AND m.pubkey = e.key AND m.revoked_at IS NULL LIMIT 1) m ON true
        LEFT JOIN LATERAL (
            SELECT s.member_id FROM claudemesh.session_key s
            WHERE m.id IS NULL AND s.mesh_id = e.mesh_id AND s.session_pubkey = e.key
              AND EXISTS (SELECT 1 FROM claudemesh.member sm WHERE sm.id = s.member_id AND sm.revoked_at IS NULL)
            LIMIT 1) k ON true
        WHERE e.kind = 'direct' AND coalesce(m.id, k.member_id) IS NOT NULL
    ), picked AS (
        -- A direct message goes to one connected session of its member that may take it now
        -- (this node's first), or waits; a multicast has one delivery per session.
        SELECT d.i, d.member_id, d.session_pubkey, NULL::text AS session_id, p.id AS presence_id, p.node_id
        FROM direct d
        LEFT JOIN LATERAL (
            SELECT x.id, x.node_id FROM claudemesh.presence x
            WHERE x.mesh_id = d.mesh_id AND x.member_id = d.member_id AND x.ended_at IS NULL AND x.grace_until IS NULL
              AND (d.session_pubkey IS NULL OR x.session_pubkey = d.session_pubkey)
              AND (d.prio = 'now' OR x.status = 'idle')
            ORDER BY x.node_id = p_node DESC, x.connected_at DESC LIMIT 1) p ON true
        UNION ALL
        SELECT e.i, x.member_id, NULL, x.session_id,
               CASE WHEN x.grace_until IS NULL AND (e.prio = 'now' OR x.status = 'idle') THEN x.id END, x.node_id
        FROM env e JOIN claudemesh.presence x ON x.mesh_id = e.mesh_id AND x.ended_at IS NULL
        WHERE e.kind IN ('all', 'group') AND x.member_id <> e.sender
          AND (e.kind = 'all' OR EXISTS (SELECT 1 FROM jsonb_array_elements(x.groups) g
                                         WHERE g->>'name' = e.key OR starts_with(g->>'name', e.key || '/')))
    ), r AS MATERIALIZED (
        -- Delivery ids are taken here, in batch order, so the rows below need no join back.
        SELECT nextval('claudemesh.delivery_id_seq') AS id, q.*
        FROM (SELECT pk.*, e.id AS env_id, e.mesh_id, e.prio, e.expires, e.sender, e.sender_pub, e.sender_member_pub,
                     e.frame, pk.presence_id IS NOT NULL AND e.frame <> '' AS assign
              FROM picked pk JOIN env e ON e.i = pk.i ORDER BY pk.i) q
    ), counts AS MATERIALIZED (
        SELECT e.i, e.kind <> 'direct' OR count(r.id) > 0 AS queued, count(r.id)::int AS n
        FROM env e LEFT JOIN r ON r.i = e.i GROUP BY e.i, e.kind
    ), ins_env AS (
        INSERT INTO claudemesh.envelope (id, mesh_id, sender_member_id, sender_pubkey, sender_member_pubkey,
            target_spec, priority, nonce, ciphertext, client_id, created_at, expires_at,
            client_message_id, request_fingerprint, sender_name)
        SELECT e.id, e.mesh_id, e.sender, e.sender_pub, e.sender_member_pub, e.spec, e.prio, e.nonce, e.cipher,
            e.client, e.created, e.expires, e.cmid, e.fp, e.sender_name
        FROM env e JOIN counts c ON c.i = e.i WHERE c.queued
        RETURNING 1
    ), ins_del AS (
        INSERT INTO claudemesh.delivery (id, envelope_id, mesh_id, recipient_member_id, recipient_session_pubkey,
            recipient_session_id, priority, state, pushed_node, pushed_presence, pushed_at, expires_at)
        OVERRIDING SYSTEM VALUE
        SELECT r.id, r.env_id, r.mesh_id, r.member_id, r.session_pubkey, r.session_id, r.prio,
            CASE WHEN r.assign THEN 'assigned' ELSE 'pending' END,
            CASE WHEN r.assign THEN r.node_id END, CASE WHEN r.assign THEN r.presence_id END,
            CASE WHEN r.assign THEN now() END, r.expires
        FROM r
        RETURNING 1
    ), notes AS (
        -- Other replicas: an inline push for what was assigned to their sessions; a wake-up for
        -- what a connected session there may claim (too large to ride along).
        SELECT claudemesh.notify_lines(p_ns || '_n_' || n.node, array_agg(n.line ORDER BY n.ord)) AS sent
        FROM (
            -- Ids are uuids and priorities a fixed set: plain concatenation is valid JSON.
            SELECT r.node_id AS node, r.id AS ord,
                '{"k":"w","p":"' || r.presence_id || '","i":' || r.id || ',"y":"' || r.prio || '","x":' || r.frame || '}' AS line
            FROM r WHERE r.assign AND r.node_id <> p_node
            UNION ALL
            SELECT DISTINCT ON (r.node_id, r.member_id) r.node_id, r.id, json_build_object('k', 'd', 'm', r.member_id)::text
            FROM r WHERE NOT r.assign AND r.presence_id IS NOT NULL AND r.node_id <> p_node
        ) n
        GROUP BY n.node
    ), audit AS (
        SELECT claudemesh.audit_append(array_agg(e.mesh_id ORDER BY e.i), array_agg('message_sent'::text ORDER BY e.i),
            array_agg(e.sender_pub ORDER BY e.i),
            -- Canonical JSON (keys sorted, no spaces), as broker/audit encodes it.
            array_agg('{"message_id":' || to_json(e.id)::text || ',"priority":' || to_json(e.prio)::text ||
                ',"recipients":' || c.n::text || ',"size":' || (octet_length(e.cipher) + octet_length(e.nonce))::text ||
                ',"target_kind":' || to_json(CASE e.kind WHEN 'all' THEN 'broadcast' ELSE e.kind END)::text || '}'
                ORDER BY e.i),
            array_agg((extract(epoch FROM e.created) * 1000000)::bigint ORDER BY e.i)) AS done
        FROM env e JOIN counts c ON c.i = e.i WHERE c.queued
    ), side AS MATERIALIZED (
        -- Referenced below so that everything runs, in this order: the rows and notifications
        -- first, the audit append last, so the mesh's chain head is locked only for the
        -- append and the commit.
        SELECT (SELECT count(*) FROM ins_env) AS envs, (SELECT count(*) FROM ins_del) AS dels,
               (SELECT count(*) FROM notes) AS notes, (SELECT count(*) FROM audit) AS audit
    )
    SELECT 'e'::text, c.i, c.queued, c.n, NULL::bigint, NULL::text, NULL::boolean, NULL::text, NULL::text
    FROM counts c, side
    UNION ALL
    SELECT 'd', r.i, NULL, NULL, r.id, r.presence_id, r.assign, NULL, NULL FROM r, side
    WHERE r.node_id = p_node AND r.presence_id IS NOT NULL
    UNION ALL
    SELECT 'x', p.i, true, 0, NULL, NULL, NULL, p.orig, p.fp FROM prior p, side;
END
$fn$;
-- +goose StatementEnd


-- The audit append (00005), same chain, cheaper: every field of an entry but the previous hash
-- is framed once, for all entries in one query; the loop that chains them only hashes (the
-- hash input is the constant prefix, the previous hash, and that framed rest). Framing in the
-- loop, a function call per field, was most of a send batch's audit cost.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.audit_append(p_mesh text[], p_event text[], p_actor text[], p_data text[], p_ts bigint[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    e_mesh text[];
    e_rest bytea[];
    e_ord int[];
    n int;
    cur text := NULL;
    s bigint;
    prev text;
    o_seq bigint[] := '{}';
    o_prev text[] := '{}';
    o_hash text[] := '{}';
    h_mesh text[] := '{}';
    h_seq bigint[] := '{}';
    h_hash text[] := '{}';
BEGIN
    IF p_mesh IS NULL OR cardinality(p_mesh) = 0 THEN
        RETURN;
    END IF;
    -- In mesh-id order (bytewise, like the Go side), so appenders to overlapping meshes lock
    -- the heads in one order and never deadlock; in array order within a mesh.
    SELECT array_agg(u.m ORDER BY u.m COLLATE "C", u.ord),
           array_agg(convert_to(claudemesh.audit_field(u.m) || claudemesh.audit_field(u.ev) || claudemesh.audit_field(u.a) ||
                                claudemesh.audit_field(u.d) || claudemesh.audit_field(u.t::text), 'UTF8')
                     ORDER BY u.m COLLATE "C", u.ord),
           array_agg(u.ord::int ORDER BY u.m COLLATE "C", u.ord)
    INTO e_mesh, e_rest, e_ord
    FROM unnest(p_mesh, p_event, p_actor, p_data, p_ts) WITH ORDINALITY AS u(m, ev, a, d, t, ord);
    n := cardinality(e_mesh);
    FOR k IN 1..n LOOP
        IF cur IS DISTINCT FROM e_mesh[k] THEN
            IF cur IS NOT NULL THEN
                h_mesh := h_mesh || cur; h_seq := h_seq || s; h_hash := h_hash || prev;
            END IF;
            cur := e_mesh[k];
            INSERT INTO claudemesh.audit_head AS a (mesh_id, seq, hash) VALUES (cur, 0, repeat('0', 64))
            ON CONFLICT (mesh_id) DO UPDATE SET seq = a.seq
            RETURNING a.seq, a.hash INTO s, prev;
        END IF;
        s := s + 1;
        o_seq := o_seq || s; o_prev := o_prev || prev;
        -- audit_field('claudemesh-audit-v1') || audit_field(prev) || the rest; prev is 64 hex.
        prev := encode(sha256('\x31393a636c617564656d6573682d61756469742d76310a36343a'::bytea || convert_to(prev, 'UTF8') ||
                              '\x0a'::bytea || e_rest[k]), 'hex');
        o_hash := o_hash || prev;
    END LOOP;
    h_mesh := h_mesh || cur; h_seq := h_seq || s; h_hash := h_hash || prev;
    INSERT INTO claudemesh.audit (mesh_id, seq, event_type, actor, data, ts_micros, prev_hash, hash)
    SELECT o.m, o.s, p_event[o.i], p_actor[o.i], p_data[o.i]::jsonb, p_ts[o.i], o.p, o.h
    FROM unnest(e_mesh, o_seq, e_ord, o_prev, o_hash) AS o(m, s, i, p, h);
    UPDATE claudemesh.audit_head a SET seq = h.s, hash = h.h
    FROM unnest(h_mesh, h_seq, h_hash) AS h(m, s, h) WHERE a.mesh_id = h.m;
END
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.audit_append(p_mesh text[], p_event text[], p_actor text[], p_data text[], p_ts bigint[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    e record;
    cur text := NULL;
    s bigint;
    prev text;
    o_mesh text[] := '{}';
    o_seq bigint[] := '{}';
    o_prev text[] := '{}';
    o_hash text[] := '{}';
    o_idx int[] := '{}';
    h_mesh text[] := '{}';
    h_seq bigint[] := '{}';
    h_hash text[] := '{}';
BEGIN
    IF p_mesh IS NULL OR cardinality(p_mesh) = 0 THEN
        RETURN;
    END IF;
    FOR e IN
        SELECT u.m, u.ev, u.a, u.d, u.t, u.ord::int AS ord
        FROM unnest(p_mesh, p_event, p_actor, p_data, p_ts) WITH ORDINALITY AS u(m, ev, a, d, t, ord)
        ORDER BY u.m COLLATE "C", u.ord
    LOOP
        IF cur IS DISTINCT FROM e.m THEN
            IF cur IS NOT NULL THEN
                h_mesh := h_mesh || cur; h_seq := h_seq || s; h_hash := h_hash || prev;
            END IF;
            cur := e.m;
            INSERT INTO claudemesh.audit_head AS a (mesh_id, seq, hash) VALUES (cur, 0, repeat('0', 64))
            ON CONFLICT (mesh_id) DO UPDATE SET seq = a.seq
            RETURNING a.seq, a.hash INTO s, prev;
        END IF;
        s := s + 1;
        o_mesh := o_mesh || cur; o_seq := o_seq || s; o_prev := o_prev || prev; o_idx := o_idx || e.ord;
        prev := encode(sha256(convert_to(
            '19:claudemesh-audit-v1' || E'\n' || claudemesh.audit_field(prev) || claudemesh.audit_field(cur) ||
            claudemesh.audit_field(e.ev) || claudemesh.audit_field(e.a) || claudemesh.audit_field(e.d) ||
            claudemesh.audit_field(e.t::text), 'UTF8')), 'hex');
        o_hash := o_hash || prev;
    END LOOP;
    h_mesh := h_mesh || cur; h_seq := h_seq || s; h_hash := h_hash || prev;
    INSERT INTO claudemesh.audit (mesh_id, seq, event_type, actor, data, ts_micros, prev_hash, hash)
    SELECT o.m, o.s, p_event[o.i], p_actor[o.i], p_data[o.i]::jsonb, p_ts[o.i], o.p, o.h
    FROM unnest(o_mesh, o_seq, o_idx, o_prev, o_hash) AS o(m, s, i, p, h);
    UPDATE claudemesh.audit_head a SET seq = h.s, hash = h.h
    FROM unnest(h_mesh, h_seq, h_hash) AS h(m, s, h) WHERE a.mesh_id = h.m;
END
$$;
-- +goose StatementEnd
DROP FUNCTION claudemesh.send_batch(text, text, text[], text[], text[], text[], text[], text[], text[], text[], text[],
    text[], text[], text[], timestamptz[], timestamptz[], text[], text[], text[], text[]);
