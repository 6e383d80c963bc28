-- +goose Up
-- A delivery assigned to a session by the statement that stores (or releases) it is
-- "assigned" until that session's replica has pushed it: pushed, then delivered or acked. A
-- replica whose notification was lost finds its old assigned rows in its catch-up.
ALTER TABLE claudemesh.delivery DROP CONSTRAINT delivery_state_check;
ALTER TABLE claudemesh.delivery ADD CONSTRAINT delivery_state_check
    CHECK (state IN ('pending', 'assigned', 'pushed', 'acked', 'expired')) NOT VALID;
ALTER TABLE claudemesh.delivery VALIDATE CONSTRAINT delivery_state_check;

-- One round trip per hot operation: a replica may be a wide-area round trip from the primary,
-- so hello, a send batch, a status change (hook or peer) with the release of what it held, the
-- end of closed sessions and a shared-state write are each one statement: these functions,
-- called through sqlc. The audit-chain append and the per-mesh capacity lock happen inside
-- them, so they are held for the statement's server time, never across a network round trip.
-- Notifications are sent from inside too (they go out at commit).

-- The audit hash, byte for byte the one broker/audit.Hash computes (and Verify recomputes):
-- sha256 over length-prefixed fields. data must be the entry's canonical JSON text.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.audit_field(v text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT octet_length(v)::text || ':' || v || E'\n'
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE FUNCTION claudemesh.audit_hash(prev text, mesh text, event text, actor text, data text, ts bigint)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT encode(sha256(convert_to(
        claudemesh.audit_field('claudemesh-audit-v1') || claudemesh.audit_field(prev) ||
        claudemesh.audit_field(mesh) || claudemesh.audit_field(event) || claudemesh.audit_field(actor) ||
        claudemesh.audit_field(data) || claudemesh.audit_field(ts::text), 'UTF8')), 'hex')
$$;
-- +goose StatementEnd

-- Appends entries to their meshes' chains, in array order per mesh. The heads are locked in
-- mesh-id order (bytewise, like the Go side) so appenders to overlapping meshes never
-- deadlock; the locks end with the caller's statement or transaction. The hashes are chained
-- in a loop; the rows go in with one INSERT.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.audit_append(p_mesh text[], p_event text[], p_actor text[], p_data text[], p_ts bigint[])
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

-- Sends lines (bus messages, one JSON object each) on a channel, packed into as few NOTIFY
-- payloads as fit under Postgres's 8000-byte limit (pgbus.MaxPayload).
-- +goose StatementBegin
CREATE FUNCTION claudemesh.notify_lines(p_channel text, p_lines text[]) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    buf text := '';
    l text;
    n int := 0;
BEGIN
    IF p_lines IS NULL THEN
        RETURN 0;
    END IF;
    FOREACH l IN ARRAY p_lines LOOP
        IF buf <> '' AND octet_length(buf) + 1 + octet_length(l) > 7600 THEN
            PERFORM pg_notify(p_channel, buf);
            n := n + 1;
            buf := '';
        END IF;
        buf := CASE WHEN buf = '' THEN l ELSE buf || E'\n' || l END;
    END LOOP;
    IF buf <> '' THEN
        PERFORM pg_notify(p_channel, buf);
        n := n + 1;
    END IF;
    RETURN n;
END
$$;
-- +goose StatementEnd

-- A bus message announcing a push: the receiving replica writes it to the presence's socket at
-- once (and records it delivered afterwards). Small envelopes only: the caller leaves larger
-- ones pending and wakes the holder, which claims them.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.push_line(d_id bigint, presence text, e claudemesh.envelope) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT json_build_object('k', 'u', 'p', presence, 'x', json_build_object(
        'i', d_id, 'e', e.id, 'h', e.mesh_id, 's', e.sender_pubkey, 'm', e.sender_member_pubkey,
        'r', e.priority, 'n', e.nonce, 'c', e.ciphertext,
        't', (extract(epoch FROM e.created_at) * 1000000)::bigint))::text
$$;
-- +goose StatementEnd

-- How large an envelope may be to ride inside a notification (bytes of nonce + ciphertext).
-- +goose StatementBegin
CREATE FUNCTION claudemesh.inline_max() RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT 6000 $$;
-- +goose StatementEnd

-- Assigns up to p_limit deliveries that presence p may take now (claimable, held priorities
-- when it is idle) to it, in id order, and announces them to its node: inline pushes for small
-- envelopes; a wake-up for the rest, which stay pending for the node's claim. Used when a
-- status change releases held messages. Returns how many were assigned.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.release_to(p claudemesh.presence, p_ns text, p_limit int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    lines text[];
    wake boolean;
    n int;
BEGIN
    WITH c AS (
        SELECT d.id FROM claudemesh.delivery d JOIN claudemesh.envelope e ON e.id = d.envelope_id
        WHERE d.recipient_member_id = p.member_id AND d.state = 'pending'
          AND claudemesh.claimable(d, p.member_id, coalesce(p.session_pubkey, ''), p.session_id, p.status = 'idle')
          AND octet_length(e.nonce) + octet_length(e.ciphertext) <= claudemesh.inline_max()
        ORDER BY d.id LIMIT p_limit
        FOR UPDATE OF d SKIP LOCKED
    ), up AS (
        UPDATE claudemesh.delivery d SET state = 'assigned', pushed_node = p.node_id, pushed_presence = p.id,
            pushed_at = now(), acked_at = NULL
        FROM c WHERE d.id = c.id
        RETURNING d.id, d.envelope_id
    )
    SELECT array_agg(claudemesh.push_line(up.id, p.id, e) ORDER BY up.id), count(*)
    INTO lines, n
    FROM up JOIN claudemesh.envelope e ON e.id = up.envelope_id;
    -- What could not ride along (too large, or beyond the limit) is claimed by the node.
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

-- The status model for one presence: dnd is changed only by the peer itself (manual); a hook
-- never touches dnd; a lower-rank source does not override a fresh higher-rank one. A change
-- tells the owning node (with the new status) and the mesh (peer_status), and, when the
-- presence may now take held messages, releases them to it. Returns the changed presence, or
-- nothing when the model refused the change.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.apply_status(p_id text, p_status text, p_source text, p_fresh_seconds float8,
                                        p_ns text, p_release int)
RETURNS SETOF claudemesh.presence LANGUAGE plpgsql AS $$
DECLARE
    p claudemesh.presence;
BEGIN
    UPDATE claudemesh.presence x
    SET status = p_status, status_source = p_source, status_at = now()
    WHERE x.id = p_id AND x.ended_at IS NULL
      AND (p_source = 'manual' OR x.status <> 'dnd')
      AND NOT (p_source <> 'hook' AND p_status <> 'dnd' AND x.status <> 'dnd' AND x.status_source = 'hook'
               AND x.status_at > now() - make_interval(secs => p_fresh_seconds))
      AND NOT (p_source = 'inferred' AND x.status_source = 'manual'
               AND x.status_at > now() - make_interval(secs => p_fresh_seconds))
    RETURNING x.* INTO p;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM claudemesh.notify_lines(p_ns || '_n_' || p.node_id,
        ARRAY[json_build_object('k', 's', 'p', p.id, 'y', p.status)::text]);
    PERFORM claudemesh.notify_lines(p_ns || '_all', ARRAY[json_build_object('k', 'e', 'h', p.mesh_id, 'm', p.member_id,
        'y', 'peer_status', 'x', json_build_object('presenceId', p.id,
            'pubkey', coalesce(p.session_pubkey, p.member_pubkey), 'displayName', p.display_name, 'status', p.status))::text]);
    IF p.grace_until IS NULL THEN
        PERFORM claudemesh.release_to(p, p_ns, p_release);
    END IF;
    RETURN NEXT p;
END
$$;
-- +goose StatementEnd

-- A hook's status change in one statement: record a signed hook's signature (accepted once
-- cluster-wide), resolve its sessions (a signed hook reaches only its member's:
-- p_member_pubkey), apply the status to each, or keep the signal for 10 s when no session
-- matches yet. Returns the ids matched, or one row saying the signal was kept pending or the
-- signature replayed.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.hook_status(p_member_pubkey text, p_session_id text, p_pid int, p_cwd text,
                                       p_status text, p_fresh_seconds float8, p_ns text, p_release int,
                                       p_signature text, p_sig_expires timestamptz)
RETURNS TABLE (presence_id text, pending boolean, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    ids text[];
    t text;
BEGIN
    replayed := false;
    IF p_signature <> '' THEN
        INSERT INTO claudemesh.seen_signature (signature, expires_at) VALUES (p_signature, p_sig_expires)
        ON CONFLICT (signature) DO NOTHING;
        IF NOT FOUND THEN
            replayed := true;
            pending := false;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    WITH mine AS NOT MATERIALIZED (
        SELECT x.id, x.session_id, x.pid, x.cwd, x.connected_at FROM claudemesh.presence x
        WHERE x.ended_at IS NULL AND (p_member_pubkey = '' OR x.member_pubkey = p_member_pubkey)
    ), by_session AS (
        SELECT id FROM mine WHERE p_session_id <> '' AND session_id = p_session_id
    ), by_pid AS (
        SELECT id FROM mine
        WHERE NOT EXISTS (SELECT 1 FROM by_session) AND p_pid <> 0 AND pid = p_pid AND cwd = p_cwd
    ), by_cwd AS (
        SELECT id FROM mine
        WHERE NOT EXISTS (SELECT 1 FROM by_session) AND NOT EXISTS (SELECT 1 FROM by_pid) AND cwd = p_cwd
        ORDER BY connected_at DESC LIMIT 1
    )
    SELECT array_agg(id) INTO ids FROM (
        SELECT id FROM by_session UNION ALL SELECT id FROM by_pid UNION ALL SELECT id FROM by_cwd) u;
    IF ids IS NULL THEN
        INSERT INTO claudemesh.pending_status (cwd, pid, session_id, status, member_pubkey, expires_at)
        VALUES (p_cwd, nullif(p_pid, 0), nullif(p_session_id, ''), p_status, nullif(p_member_pubkey, ''),
                now() + interval '10 seconds');
        presence_id := NULL;
        pending := true;
        RETURN NEXT;
        RETURN;
    END IF;
    pending := false;
    FOREACH t IN ARRAY ids LOOP
        presence_id := t;
        -- dnd (which hooks never change) or a fresher source: no change, still a match.
        PERFORM claudemesh.apply_status(t, p_status, 'hook', p_fresh_seconds, p_ns, p_release);
        RETURN NEXT;
    END LOOP;
END
$$;
-- +goose StatementEnd

-- A hello's registration in one statement, after its signature was verified by the replica:
-- the checks that need the database, in protocol order (capacity, unauthorized, revoked,
-- then a replayed signature and a taken session key), the session-key binding, a hook signal
-- that came first, the capacity check again under the mesh's lock (held until this statement
-- commits), the presence upsert, its notifications (replace, peer_joined) and its audit entry.
-- code is '' on success, else the refusal.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.hello(p_node text, p_ns text, p_mesh text, p_member_id text, p_pubkey text,
    p_session_id text, p_session_pubkey text, p_display_name text, p_pid int, p_cwd text, p_groups jsonb,
    p_caps text[], p_default_limit int, p_signature text, p_sig_expires timestamptz, p_local_live boolean)
RETURNS TABLE (code text, presence_id text, status text, epoch bigint, old_node text, resumed boolean,
               display_name text, max_sessions int)
LANGUAGE plpgsql AS $$
DECLARE
    ms claudemesh.mesh;
    mb claudemesh.member;
    lim int;
    live bigint;
    owner text;
    hook text;
    old record;
    up record;
    name text;
BEGIN
    SELECT * INTO ms FROM claudemesh.mesh WHERE id = p_mesh;
    IF FOUND AND ms.archived_at IS NULL THEN
        lim := CASE WHEN ms.max_peers > 0 THEN ms.max_peers ELSE p_default_limit END;
        max_sessions := lim;
        SELECT count(*) INTO live FROM claudemesh.presence x
        WHERE x.mesh_id = p_mesh AND x.ended_at IS NULL AND NOT (x.session_id = p_session_id AND x.member_pubkey = p_pubkey);
        IF live >= lim THEN
            code := 'capacity'; RETURN NEXT; RETURN;
        END IF;
    ELSE
        code := 'unauthorized'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO mb FROM claudemesh.member m
    WHERE m.mesh_id = p_mesh AND m.pubkey = p_pubkey AND m.id = p_member_id
    ORDER BY m.revoked_at IS NULL DESC LIMIT 1;
    IF NOT FOUND THEN
        code := 'unauthorized'; RETURN NEXT; RETURN;
    ELSIF mb.revoked_at IS NOT NULL THEN
        code := 'revoked'; RETURN NEXT; RETURN;
    END IF;
    -- Accepted once cluster-wide: a captured hello replayed on any replica is refused.
    INSERT INTO claudemesh.seen_signature (signature, expires_at) VALUES (p_signature, p_sig_expires)
    ON CONFLICT (signature) DO NOTHING;
    IF NOT FOUND THEN
        code := 'hello_replayed'; RETURN NEXT; RETURN;
    END IF;
    IF p_session_pubkey <> '' THEN
        -- Never another member's own key; bound to the first member that uses it, forever.
        SELECT m.id INTO owner FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.pubkey = p_session_pubkey AND m.pubkey <> p_pubkey LIMIT 1;
        IF owner IS NULL THEN
            INSERT INTO claudemesh.session_key (mesh_id, session_pubkey, member_id)
            VALUES (p_mesh, p_session_pubkey, mb.id) ON CONFLICT (mesh_id, session_pubkey) DO NOTHING;
            SELECT k.member_id INTO owner FROM claudemesh.session_key k
            WHERE k.mesh_id = p_mesh AND k.session_pubkey = p_session_pubkey;
        END IF;
        IF owner <> mb.id THEN
            code := 'session_key_taken'; RETURN NEXT; RETURN;
        END IF;
    END IF;
    -- A hook that fired before this hello (the first-turn race) applies now.
    DELETE FROM claudemesh.pending_status ps
    WHERE ps.id = (
        SELECT q.id FROM claudemesh.pending_status q
        WHERE q.expires_at > now() AND (q.member_pubkey IS NULL OR q.member_pubkey = p_pubkey)
          AND ((q.session_id IS NOT NULL AND q.session_id = p_session_id)
               OR (q.session_id IS NULL AND q.pid IS NOT NULL AND q.pid = p_pid AND q.cwd = p_cwd)
               OR (q.session_id IS NULL AND q.pid IS NULL AND q.cwd = p_cwd))
        ORDER BY q.created_at DESC LIMIT 1)
    RETURNING ps.status INTO hook;
    -- Hellos of one mesh (not of the cluster) serialize from here to the end of this
    -- statement, so the capacity check can't be raced by a hello on another replica.
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
    SELECT count(*) INTO live FROM claudemesh.presence x
    WHERE x.mesh_id = p_mesh AND x.ended_at IS NULL AND NOT (x.session_id = p_session_id AND x.member_pubkey = p_pubkey);
    IF live >= lim THEN
        code := 'capacity'; RETURN NEXT; RETURN;
    END IF;
    SELECT x.id, x.node_id, x.grace_until INTO old FROM claudemesh.presence x
    WHERE x.mesh_id = p_mesh AND x.member_id = mb.id AND x.session_id = p_session_id AND x.ended_at IS NULL;
    name := CASE WHEN p_display_name = '' THEN mb.display_name ELSE p_display_name END;
    INSERT INTO claudemesh.presence AS x (mesh_id, member_id, member_pubkey, node_id, session_id, session_pubkey,
        display_name, pid, cwd, groups, capabilities, status, status_source)
    VALUES (p_mesh, mb.id, p_pubkey, p_node, p_session_id, nullif(p_session_pubkey, ''), name,
        p_pid, p_cwd, p_groups, p_caps, coalesce(hook, 'idle'), CASE WHEN hook IS NULL THEN 'manual' ELSE 'hook' END)
    ON CONFLICT (mesh_id, member_id, session_id) WHERE ended_at IS NULL DO UPDATE
    SET node_id = EXCLUDED.node_id, session_pubkey = EXCLUDED.session_pubkey, display_name = EXCLUDED.display_name,
        pid = EXCLUDED.pid, cwd = EXCLUDED.cwd, groups = EXCLUDED.groups, capabilities = EXCLUDED.capabilities,
        last_seen_at = now(), grace_until = NULL, epoch = x.epoch + 1,
        status = CASE WHEN hook IS NOT NULL AND x.status <> 'dnd' THEN hook ELSE x.status END,
        status_source = CASE WHEN hook IS NOT NULL AND x.status <> 'dnd' THEN 'hook' ELSE x.status_source END,
        status_at = CASE WHEN hook IS NOT NULL AND x.status <> 'dnd' THEN now() ELSE x.status_at END
    RETURNING x.id, x.status, x.epoch INTO up;
    code := '';
    presence_id := up.id;
    status := up.status;
    epoch := up.epoch;
    old_node := old.node_id;
    display_name := name;
    -- Resumed: the presence was in its grace, or its socket on this node is already gone.
    resumed := coalesce(old.grace_until IS NOT NULL, false) OR coalesce(old.node_id = p_node AND NOT p_local_live, false);
    IF old.node_id IS NOT NULL AND old.node_id <> p_node THEN
        -- The session was live on another replica: that one closes its socket.
        PERFORM claudemesh.notify_lines(p_ns || '_n_' || old.node_id,
            ARRAY[json_build_object('k', 'r', 'p', up.id, 'n', p_node)::text]);
    END IF;
    IF old.id IS NULL THEN -- a new presence, not a resume or replacement: tell the mesh
        PERFORM claudemesh.notify_lines(p_ns || '_all', ARRAY[json_build_object('k', 'e', 'h', p_mesh, 'm', mb.id,
            'y', 'peer_joined', 'x', json_build_object('presenceId', up.id,
                'pubkey', coalesce(nullif(p_session_pubkey, ''), p_pubkey), 'displayName', name, 'status', up.status))::text]);
    END IF;
    -- The audit data is canonical JSON (keys sorted, no spaces), as broker/audit encodes it.
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['peer_connected'], ARRAY[p_pubkey],
        ARRAY['{"node":' || to_json(p_node)::text || ',"presence_id":' || to_json(up.id::text)::text ||
              ',"resumed":' || resumed::text || '}'],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    RETURN NEXT;
END
$$;
-- +goose StatementEnd

-- A send batch in one statement: every envelope's recipients resolved cluster-wide (a direct
-- target's member or session key; a broadcast's or group's live sessions, never the sender's
-- own), envelopes and deliveries stored, each delivery assigned to a connected session that
-- may take it now (this node's first; small envelopes only), the other replicas told (inline
-- pushes for what was assigned to their sessions, wake-ups for what they should claim) and the
-- audit entries appended. Returns one row per envelope ('e': queued, recipients) and one per
-- delivery this node has a part in ('d': assigned to a local session, or pending for one).
-- +goose StatementBegin
CREATE FUNCTION claudemesh.send_batch(p_node text, p_ns text,
    e_ids text[], e_mesh text[], e_sender text[], e_sender_pub text[], e_sender_member_pub text[],
    e_spec text[], e_kind text[], e_key text[], e_prio text[], e_nonce text[], e_cipher text[],
    e_client text[], e_created timestamptz[], e_expires timestamptz[])
RETURNS TABLE (row_kind text, idx int, queued boolean, recipients int, delivery_id bigint, presence_id text, assigned boolean)
LANGUAGE plpgsql AS $fn$
BEGIN
    -- Planned at each call with the batch's arrays in hand (EXECUTE ... USING), so the planner
    -- knows how many rows each step has and joins the batch's rows by hashing, never in nested
    -- loops over them. The arrays are unnested once: subscripting a text array is a walk, and
    -- per row it would make the batch quadratic.
    RETURN QUERY EXECUTE $q$
    WITH env AS MATERIALIZED (
        SELECT u.ord::int AS i, u.id, u.mesh_id, u.sender, u.sender_pub, u.sender_member_pub, u.spec, u.kind, u.key,
               u.prio, u.nonce, u.cipher, u.client, u.created, u.expires
        FROM unnest($3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
            WITH ORDINALITY AS u(id, mesh_id, sender, sender_pub, sender_member_pub, spec, kind, key, prio, nonce,
                                 cipher, client, created, expires, ord)
    ), direct AS (
        -- A member key first; else a session key of a live member.
        SELECT e.i, e.mesh_id, e.prio, coalesce(m.id, k.member_id) AS member_id,
               CASE WHEN m.id IS NULL THEN e.key END AS session_pubkey
        FROM env e
        LEFT JOIN claudemesh.member m ON m.mesh_id = e.mesh_id AND m.pubkey = e.key AND m.revoked_at IS NULL
        LEFT JOIN LATERAL (
            SELECT s.member_id FROM claudemesh.session_key s
            WHERE m.id IS NULL AND s.mesh_id = e.mesh_id AND s.session_pubkey = e.key
              AND EXISTS (SELECT 1 FROM claudemesh.member sm WHERE sm.id = s.member_id AND sm.revoked_at IS NULL)) k ON true
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
            ORDER BY x.node_id = $1 DESC, x.connected_at DESC LIMIT 1) p ON true
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
        FROM (SELECT pk.*, e.id AS env_id, e.mesh_id, e.prio, e.expires, e.sender_pub, e.sender_member_pub,
                     e.nonce, e.cipher, e.created,
                     pk.presence_id IS NOT NULL
                     AND octet_length(e.nonce) + octet_length(e.cipher) <= claudemesh.inline_max() AS assign
              FROM picked pk JOIN env e ON e.i = pk.i ORDER BY pk.i) q
    ), counts AS MATERIALIZED (
        SELECT e.i, e.kind <> 'direct' OR count(r.id) > 0 AS queued, count(r.id)::int AS n
        FROM env e LEFT JOIN r ON r.i = e.i GROUP BY e.i, e.kind
    ), ins_env AS (
        INSERT INTO claudemesh.envelope (id, mesh_id, sender_member_id, sender_pubkey, sender_member_pubkey,
            target_spec, priority, nonce, ciphertext, client_id, created_at, expires_at)
        SELECT e.id, e.mesh_id, e.sender, e.sender_pub, e.sender_member_pub, e.spec, e.prio, e.nonce, e.cipher,
            e.client, e.created, e.expires
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
        SELECT claudemesh.notify_lines($2 || '_n_' || n.node, array_agg(n.line ORDER BY n.ord)) AS sent
        FROM (
            SELECT r.node_id AS node, r.id AS ord, json_build_object('k', 'u', 'p', r.presence_id, 'x', json_build_object(
                'i', r.id, 'e', r.env_id, 'h', r.mesh_id, 's', r.sender_pub, 'm', r.sender_member_pub,
                'r', r.prio, 'n', r.nonce, 'c', r.cipher,
                't', (extract(epoch FROM r.created) * 1000000)::bigint))::text AS line
            FROM r WHERE r.assign AND r.node_id <> $1
            UNION ALL
            SELECT DISTINCT ON (r.node_id, r.member_id) r.node_id, r.id, json_build_object('k', 'd', 'm', r.member_id)::text
            FROM r WHERE NOT r.assign AND r.presence_id IS NOT NULL AND r.node_id <> $1
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
    SELECT 'e'::text, c.i, c.queued, c.n, NULL::bigint, NULL::text, NULL::boolean FROM counts c, side
    UNION ALL
    SELECT 'd', r.i, NULL, NULL, r.id, r.presence_id, r.assign FROM r, side
    WHERE r.node_id = $1 AND r.presence_id IS NOT NULL
    $q$ USING p_node, p_ns, e_ids, e_mesh, e_sender, e_sender_pub, e_sender_member_pub, e_spec, e_kind, e_key,
        e_prio, e_nonce, e_cipher, e_client, e_created, e_expires;
END
$fn$;
-- +goose StatementEnd

-- The ends of closed sockets in one statement: presences put in their reconnect grace (or
-- ended, with peer_left and an audit entry each), only at the epoch the closed socket owned;
-- what was assigned or pushed to them back to pending, and the replicas holding other
-- sessions of those members woken to take it. Returns how many presences ended.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.end_sessions(p_node text, p_ns text, g_ids text[], g_epochs bigint[],
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

-- A shared-state write in one statement, within the mesh's quota (keys, and bytes of keys and
-- values as stored; concurrent writers on several replicas can overshoot by one value each):
-- the row, the state_change for every replica (inline when small) and the audit entry, whose
-- canonical data the caller passes (it holds the user's key). No row: over the quota.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.set_state(p_ns text, p_mesh text, p_key text, p_value jsonb, p_updated_by text,
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

-- +goose Down
DROP FUNCTION claudemesh.set_state;
DROP FUNCTION claudemesh.end_sessions;
DROP FUNCTION claudemesh.send_batch;
UPDATE claudemesh.delivery SET state = 'pushed' WHERE state = 'assigned';
ALTER TABLE claudemesh.delivery DROP CONSTRAINT delivery_state_check;
ALTER TABLE claudemesh.delivery ADD CONSTRAINT delivery_state_check
    CHECK (state IN ('pending', 'pushed', 'acked', 'expired'));
DROP FUNCTION claudemesh.hello;
DROP FUNCTION claudemesh.hook_status;
DROP FUNCTION claudemesh.apply_status;
DROP FUNCTION claudemesh.release_to;
DROP FUNCTION claudemesh.inline_max;
DROP FUNCTION claudemesh.push_line;
DROP FUNCTION claudemesh.notify_lines;
DROP FUNCTION claudemesh.audit_append;
DROP FUNCTION claudemesh.audit_hash;
DROP FUNCTION claudemesh.audit_field;
