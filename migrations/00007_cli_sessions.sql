-- +goose Up
-- Today's claudemesh CLI (1.37): launched sessions (session_hello) beside the member's own
-- control-plane connection, what a hello says about its connection, idempotent sends, the
-- sender's name on pushes, reattach by session key, and the admin operations kick, disconnect,
-- ban, unban and list_bans. New columns have constant defaults: no table rewrite.
ALTER TABLE claudemesh.presence
    ADD COLUMN role      text NOT NULL DEFAULT 'control-plane' CHECK (role IN ('control-plane', 'session')),
    ADD COLUMN hostname  text NOT NULL DEFAULT '',
    ADD COLUMN peer_type text NOT NULL DEFAULT '',
    ADD COLUMN channel   text NOT NULL DEFAULT '',
    ADD COLUMN model     text NOT NULL DEFAULT '';

-- client_message_id: a send's idempotency key, unique per (mesh, sender member) while the
-- envelope is kept (index: migration 00008). Both it and request_fingerprint are echoed in
-- pushes; sender_name is the sender's display name at send time.
ALTER TABLE claudemesh.envelope
    ADD COLUMN client_message_id   text NOT NULL DEFAULT '',
    ADD COLUMN request_fingerprint text NOT NULL DEFAULT '',
    ADD COLUMN sender_name         text NOT NULL DEFAULT '';

-- The data of a push bus message (pgbus.PushData): the delivery and its envelope. The CLI's
-- fields ride along only when set, so April traffic pays nothing for them.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.push_data(d_id bigint, env_id text, mesh text, sender_pub text, sender_member_pub text,
    prio text, nonce text, cipher text, created timestamptz, sender_member text, sender_name text, cmid text, fp text)
RETURNS json LANGUAGE sql IMMUTABLE AS $$
    SELECT json_strip_nulls(json_build_object(
        'i', d_id, 'e', env_id, 'h', mesh, 's', sender_pub, 'm', sender_member_pub, 'r', prio, 'n', nonce, 'c', cipher,
        't', (extract(epoch FROM created) * 1000000)::bigint,
        'b', nullif(sender_member, ''), 'a', nullif(sender_name, ''), 'q', nullif(cmid, ''), 'f', nullif(fp, '')))
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.push_line(d_id bigint, presence text, e claudemesh.envelope) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT json_build_object('k', 'u', 'p', presence, 'x', claudemesh.push_data(d_id, e.id, e.mesh_id, e.sender_pubkey,
        e.sender_member_pubkey, e.priority, e.nonce, e.ciphertext, e.created_at, e.sender_member_id, e.sender_name,
        e.client_message_id, e.request_fingerprint))::text
$$;
-- +goose StatementEnd

-- Deliveries assigned or pushed to these presences go back to pending, and the replicas
-- holding connected sessions of their members are woken to claim them (end_sessions does the
-- same for closed sockets).
-- +goose StatementBegin
CREATE FUNCTION claudemesh.release_held(p_ns text, p_ids text[]) RETURNS void LANGUAGE sql AS $$
    WITH rel AS (
        UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL, pushed_at = NULL
        WHERE state IN ('assigned', 'pushed') AND pushed_presence = ANY(p_ids)
        RETURNING mesh_id, recipient_member_id
    ), holders AS (
        SELECT DISTINCT p.node_id, p.member_id FROM claudemesh.presence p
        JOIN (SELECT DISTINCT mesh_id, recipient_member_id FROM rel) r
          ON p.mesh_id = r.mesh_id AND p.member_id = r.recipient_member_id
        WHERE p.ended_at IS NULL AND p.grace_until IS NULL
    )
    SELECT count(*) FROM (
        SELECT claudemesh.notify_lines(p_ns || '_n_' || h.node_id, array_agg(json_build_object('k', 'd', 'm', h.member_id)::text))
        FROM holders h GROUP BY h.node_id) z;
$$;
-- +goose StatementEnd

-- peer_left for presences just ended, to every replica (each tells its sessions of the mesh).
-- +goose StatementBegin
CREATE FUNCTION claudemesh.announce_left(p_ns text, p_ids text[]) RETURNS void LANGUAGE sql AS $$
    SELECT claudemesh.notify_lines(p_ns || '_all', array_agg(json_build_object('k', 'e', 'h', x.mesh_id, 'm', x.member_id,
        'y', 'peer_left', 'x', json_build_object('presenceId', x.id, 'pubkey', coalesce(x.session_pubkey, x.member_pubkey),
            'displayName', x.display_name, 'status', ''))::text ORDER BY x.id))
    FROM claudemesh.presence x WHERE x.id = ANY(p_ids);
$$;
-- +goose StatementEnd

-- Closes the sockets of presences wherever they are (one line per presence to its replica):
-- code and reason are the WebSocket close's.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.close_presences(p_ns text, p_ids text[], p_code int, p_reason text) RETURNS void
LANGUAGE sql AS $$
    SELECT claudemesh.notify_lines(p_ns || '_n_' || x.node_id,
        array_agg(json_build_object('k', 'k', 'p', x.id, 'c', p_code, 'y', p_reason)::text ORDER BY x.id))
    FROM claudemesh.presence x WHERE x.id = ANY(p_ids)
    GROUP BY x.node_id;
$$;
-- +goose StatementEnd

-- Whether a member may run the admin operations: an admin, or the mesh owner's key.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.is_admin(p_mesh text, p_member text) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM claudemesh.member m JOIN claudemesh.mesh ms ON ms.id = m.mesh_id
                   WHERE m.id = p_member AND m.mesh_id = p_mesh AND m.revoked_at IS NULL
                     AND (m.role = 'admin' OR m.pubkey = ms.owner_pubkey))
$$;
-- +goose StatementEnd

-- A hello's registration in one statement (see 00005), now for both hellos: a plain hello
-- (p_role 'control-plane': the member's own connection, found by member id and key) and a
-- session_hello (p_role 'session': a launched session, found by its parent's key; p_member_id
-- is the optional parentMemberId, which must match). A hello whose session key is that of a
-- live presence of the same member (connected elsewhere, or in its grace) takes that presence
-- over, whatever its sessionId: same presence id, queue kept, no peer_left / peer_joined; any
-- other live presence of the member holding that sessionId or key is replaced (closed, ended).
-- What was pushed to a resumed presence and not acked is pending again, for the new socket.
-- A new overload: replicas of the previous version keep calling the old one during a rolling
-- deploy (a later migration drops it).
-- +goose StatementBegin
CREATE FUNCTION claudemesh.hello(p_node text, p_ns text, p_mesh text, p_member_id text, p_pubkey text,
    p_session_id text, p_session_pubkey text, p_display_name text, p_pid int, p_cwd text, p_groups jsonb,
    p_caps text[], p_default_limit int, p_signature text, p_sig_expires timestamptz, p_local_live boolean,
    p_role text, p_hostname text, p_peer_type text, p_channel text, p_model text)
RETURNS TABLE (code text, presence_id text, status text, epoch bigint, old_node text, resumed boolean,
               display_name text, max_sessions int, member_id text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    ms claudemesh.mesh;
    mb claudemesh.member;
    lim int;
    live bigint;
    owner text;
    hook text;
    keyed record;
    gone text[];
    old record;
    up record;
    name text;
BEGIN
    SELECT * INTO ms FROM claudemesh.mesh WHERE id = p_mesh;
    IF FOUND AND ms.archived_at IS NULL THEN
        lim := CASE WHEN ms.max_peers > 0 THEN ms.max_peers ELSE p_default_limit END;
        max_sessions := lim;
        SELECT count(*) INTO live FROM claudemesh.presence x
        WHERE x.mesh_id = p_mesh AND x.ended_at IS NULL
          AND NOT (x.session_id = p_session_id AND x.member_pubkey = p_pubkey)
          AND NOT (p_session_pubkey <> '' AND x.session_pubkey IS NOT DISTINCT FROM p_session_pubkey);
        IF live >= lim THEN
            code := 'capacity'; RETURN NEXT; RETURN;
        END IF;
    ELSE
        code := 'unauthorized'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO mb FROM claudemesh.member m
    WHERE m.mesh_id = p_mesh AND m.pubkey = p_pubkey AND (p_role = 'session' OR m.id = p_member_id)
    ORDER BY m.revoked_at IS NULL DESC, m.created_at DESC LIMIT 1;
    IF NOT FOUND THEN
        code := 'unauthorized'; RETURN NEXT; RETURN;
    ELSIF mb.revoked_at IS NOT NULL THEN
        code := 'revoked'; RETURN NEXT; RETURN;
    ELSIF p_role = 'session' AND p_member_id <> '' AND p_member_id <> mb.id THEN
        code := 'parent_member_id_mismatch'; RETURN NEXT; RETURN;
    END IF;
    member_id := mb.id;
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
    -- statement, so neither the capacity check nor the reattach can be raced by a hello on
    -- another replica.
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
    SELECT count(*) INTO live FROM claudemesh.presence x
    WHERE x.mesh_id = p_mesh AND x.ended_at IS NULL
      AND NOT (x.session_id = p_session_id AND x.member_pubkey = p_pubkey)
      AND NOT (p_session_pubkey <> '' AND x.session_pubkey IS NOT DISTINCT FROM p_session_pubkey);
    IF live >= lim THEN
        code := 'capacity'; RETURN NEXT; RETURN;
    END IF;
    IF p_session_pubkey <> '' THEN
        -- Reattach by session key: the member's live presence with this key becomes this
        -- hello's, under its new sessionId.
        SELECT x.id, x.session_id INTO keyed FROM claudemesh.presence x
        WHERE x.mesh_id = p_mesh AND x.member_id = mb.id AND x.session_pubkey = p_session_pubkey AND x.ended_at IS NULL
        ORDER BY x.connected_at DESC LIMIT 1;
        IF keyed.id IS NOT NULL THEN
            WITH g AS (
                UPDATE claudemesh.presence x SET ended_at = now(), grace_until = NULL
                WHERE x.mesh_id = p_mesh AND x.member_id = mb.id AND x.ended_at IS NULL AND x.id <> keyed.id
                  AND (x.session_id = p_session_id OR x.session_pubkey = p_session_pubkey)
                RETURNING x.id)
            SELECT array_agg(g.id) INTO gone FROM g;
            IF gone IS NOT NULL THEN
                PERFORM claudemesh.close_presences(p_ns, gone, 1000, 'session_replaced');
                PERFORM claudemesh.announce_left(p_ns, gone);
                PERFORM claudemesh.release_held(p_ns, gone);
            END IF;
            IF keyed.session_id <> p_session_id THEN
                UPDATE claudemesh.presence x SET session_id = p_session_id WHERE x.id = keyed.id;
                -- Multicasts waiting for the session are addressed to its sessionId.
                UPDATE claudemesh.delivery d SET recipient_session_id = p_session_id
                WHERE d.recipient_member_id = mb.id AND d.state = 'pending' AND d.recipient_session_id = keyed.session_id;
            END IF;
        END IF;
    END IF;
    SELECT x.id, x.node_id, x.grace_until INTO old FROM claudemesh.presence x
    WHERE x.mesh_id = p_mesh AND x.member_id = mb.id AND x.session_id = p_session_id AND x.ended_at IS NULL;
    name := CASE WHEN p_display_name = '' THEN mb.display_name ELSE p_display_name END;
    INSERT INTO claudemesh.presence AS x (mesh_id, member_id, member_pubkey, node_id, session_id, session_pubkey,
        display_name, pid, cwd, groups, capabilities, status, status_source, role, hostname, peer_type, channel, model)
    VALUES (p_mesh, mb.id, p_pubkey, p_node, p_session_id, nullif(p_session_pubkey, ''), name,
        p_pid, p_cwd, p_groups, p_caps, coalesce(hook, 'idle'), CASE WHEN hook IS NULL THEN 'manual' ELSE 'hook' END,
        p_role, p_hostname, p_peer_type, p_channel, p_model)
    ON CONFLICT (mesh_id, member_id, session_id) WHERE ended_at IS NULL DO UPDATE
    SET node_id = EXCLUDED.node_id, session_pubkey = EXCLUDED.session_pubkey, display_name = EXCLUDED.display_name,
        pid = EXCLUDED.pid, cwd = EXCLUDED.cwd, groups = EXCLUDED.groups, capabilities = EXCLUDED.capabilities,
        role = EXCLUDED.role, hostname = EXCLUDED.hostname, peer_type = EXCLUDED.peer_type,
        channel = EXCLUDED.channel, model = EXCLUDED.model,
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
    IF old.id IS NOT NULL THEN
        -- Pushed to the old socket and never acked: pending again, for this one (at once, not
        -- when the old socket's close is recorded, which for a socket taken over is never).
        PERFORM claudemesh.release_held(p_ns, ARRAY[up.id]);
    END IF;
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
              ',"resumed":' || resumed::text || ',"role":' || to_json(p_role)::text || '}'],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    RETURN NEXT;
END
$$;
-- +goose StatementEnd

-- A send batch in one statement (see 00005), now idempotent: an envelope whose
-- client_message_id its sender member already used in the mesh (while that envelope is kept)
-- is not stored again; its row ('x') names the first envelope and its request fingerprint.
-- Duplicates within the batch are the caller's to fold. A new overload, as for hello.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.send_batch(p_node text, p_ns text,
    e_ids text[], e_mesh text[], e_sender text[], e_sender_pub text[], e_sender_member_pub text[],
    e_spec text[], e_kind text[], e_key text[], e_prio text[], e_nonce text[], e_cipher text[],
    e_client text[], e_created timestamptz[], e_expires timestamptz[],
    e_cmid text[], e_fp text[], e_sender_name text[])
RETURNS TABLE (row_kind text, idx int, queued boolean, recipients int, delivery_id bigint, presence_id text,
               assigned boolean, original text, fingerprint text)
LANGUAGE plpgsql AS $fn$
BEGIN
    -- Planned at each call with the batch's arrays in hand (EXECUTE ... USING), so the planner
    -- knows how many rows each step has and joins the batch's rows by hashing, never in nested
    -- loops over them. The arrays are unnested once: subscripting a text array is a walk, and
    -- per row it would make the batch quadratic.
    RETURN QUERY EXECUTE $q$
    WITH input AS MATERIALIZED (
        SELECT u.ord::int AS i, u.id, u.mesh_id, u.sender, u.sender_pub, u.sender_member_pub, u.spec, u.kind, u.key,
               u.prio, u.nonce, u.cipher, u.client, u.created, u.expires, u.cmid, u.fp, u.sender_name
        FROM unnest($3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)
            WITH ORDINALITY AS u(id, mesh_id, sender, sender_pub, sender_member_pub, spec, kind, key, prio, nonce,
                                 cipher, client, created, expires, cmid, fp, sender_name, ord)
    ), prior AS MATERIALIZED (
        -- Retries: the sender already stored an envelope with this client_message_id.
        SELECT n.i, o.id AS orig, o.request_fingerprint AS fp
        FROM input n JOIN claudemesh.envelope o
          ON o.mesh_id = n.mesh_id AND o.sender_member_id = n.sender AND o.client_message_id = n.cmid
        WHERE n.cmid <> '' AND o.client_message_id <> ''
    ), env AS MATERIALIZED (
        SELECT n.* FROM input n WHERE NOT EXISTS (SELECT 1 FROM prior p WHERE p.i = n.i)
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
        FROM (SELECT pk.*, e.id AS env_id, e.mesh_id, e.prio, e.expires, e.sender, e.sender_pub, e.sender_member_pub,
                     e.nonce, e.cipher, e.created, e.cmid, e.fp, e.sender_name,
                     pk.presence_id IS NOT NULL
                     AND octet_length(e.nonce) + octet_length(e.cipher) <= claudemesh.inline_max() AS assign
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
        SELECT claudemesh.notify_lines($2 || '_n_' || n.node, array_agg(n.line ORDER BY n.ord)) AS sent
        FROM (
            SELECT r.node_id AS node, r.id AS ord, json_build_object('k', 'u', 'p', r.presence_id, 'x',
                claudemesh.push_data(r.id, r.env_id, r.mesh_id, r.sender_pub, r.sender_member_pub, r.prio, r.nonce,
                    r.cipher, r.created, r.sender, r.sender_name, r.cmid, r.fp))::text AS line
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
    SELECT 'e'::text, c.i, c.queued, c.n, NULL::bigint, NULL::text, NULL::boolean, NULL::text, NULL::text
    FROM counts c, side
    UNION ALL
    SELECT 'd', r.i, NULL, NULL, r.id, r.presence_id, r.assign, NULL, NULL FROM r, side
    WHERE r.node_id = $1 AND r.presence_id IS NOT NULL
    UNION ALL
    SELECT 'x', p.i, true, 0, NULL, NULL, NULL, p.orig, p.fp FROM prior p, side
    $q$ USING p_node, p_ns, e_ids, e_mesh, e_sender, e_sender_pub, e_sender_member_pub, e_spec, e_kind, e_key,
        e_prio, e_nonce, e_cipher, e_client, e_created, e_expires, e_cmid, e_fp, e_sender_name;
END
$fn$;
-- +goose StatementEnd

-- kick / disconnect in one statement, for an admin (code 'forbidden' otherwise): the mesh's
-- live presences matched by target (a display name, a member or session key, or a member-key
-- prefix of at least 8 characters), by stale (in their reconnect grace for longer than
-- p_stale_ms) or all (but the caller's). A kick leaves control-plane connections alone
-- (returned with skipped). The others are ended at once (no grace: peer_left, what they held
-- pending again), their sockets closed wherever they are (p_code, p_reason), each audited.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.kick(p_ns text, p_mesh text, p_caller_member text, p_caller_presence text, p_actor text,
    p_target text, p_stale_ms bigint, p_all boolean, p_skip_control boolean, p_code int, p_reason text)
RETURNS TABLE (code text, name text, skipped boolean) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    m_ids text[];
    m_names text[];
    m_skip boolean[];
    ids text[];
BEGIN
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    code := '';
    RETURN NEXT; -- the outcome row; the matches follow
    SELECT array_agg(x.id ORDER BY x.display_name, x.id), array_agg(x.display_name ORDER BY x.display_name, x.id),
           array_agg(p_skip_control AND x.role = 'control-plane' ORDER BY x.display_name, x.id)
    INTO m_ids, m_names, m_skip
    FROM claudemesh.presence x
    WHERE x.mesh_id = p_mesh AND x.ended_at IS NULL
      AND CASE
          WHEN p_all THEN x.id <> p_caller_presence
          WHEN p_stale_ms > 0 THEN x.id <> p_caller_presence AND x.grace_until IS NOT NULL
                                   AND x.last_seen_at < now() - make_interval(secs => p_stale_ms / 1000.0)
          WHEN p_target <> '' THEN x.display_name = p_target OR x.member_pubkey = t OR x.session_pubkey = t
                                   OR (length(t) >= 8 AND starts_with(x.member_pubkey, t))
          ELSE false END;
    IF m_ids IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(u.id) INTO ids FROM unnest(m_ids, m_skip) AS u(id, skip) WHERE NOT u.skip;
    IF ids IS NOT NULL THEN
        UPDATE claudemesh.presence x SET ended_at = now(), grace_until = NULL WHERE x.id = ANY(ids);
        PERFORM claudemesh.close_presences(p_ns, ids, p_code, p_reason);
        PERFORM claudemesh.announce_left(p_ns, ids);
        PERFORM claudemesh.release_held(p_ns, ids);
        PERFORM claudemesh.audit_append(array_agg(p_mesh), array_agg('peer_kicked'::text), array_agg(p_actor),
            array_agg('{"close_code":' || p_code::text || ',"presence_id":' || to_json(u.id)::text || '}'),
            array_agg((extract(epoch FROM clock_timestamp()) * 1000000)::bigint))
        FROM unnest(ids) AS u(id);
    END IF;
    RETURN QUERY SELECT 'match'::text, u.n, u.s FROM unnest(m_names, m_skip) WITH ORDINALITY AS u(n, s, o) ORDER BY u.o;
END
$$;
-- +goose StatementEnd

-- ban in one statement, for an admin: the live member matched by target (display name, key,
-- or a key prefix of at least 8 characters) is revoked, its presences ended and their sockets
-- closed with 4002 "banned", audited. Codes: '' (name: the member's display name),
-- 'forbidden', 'not_found', 'self'.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.ban(p_ns text, p_mesh text, p_caller_member text, p_actor text, p_target text)
RETURNS TABLE (code text, name text) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    mb claudemesh.member;
    ids text[];
BEGIN
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO mb FROM claudemesh.member m
    WHERE m.mesh_id = p_mesh AND m.revoked_at IS NULL
      AND (m.display_name = p_target OR m.pubkey = t OR (length(t) >= 8 AND starts_with(m.pubkey, t)))
    ORDER BY m.pubkey = t DESC, m.display_name = p_target DESC, m.created_at LIMIT 1;
    IF NOT FOUND THEN
        code := 'not_found'; RETURN NEXT; RETURN;
    ELSIF mb.id = p_caller_member THEN
        code := 'self'; RETURN NEXT; RETURN;
    END IF;
    UPDATE claudemesh.member m SET revoked_at = now() WHERE m.id = mb.id;
    WITH x AS (
        UPDATE claudemesh.presence x SET ended_at = now(), grace_until = NULL
        WHERE x.mesh_id = p_mesh AND x.member_id = mb.id AND x.ended_at IS NULL RETURNING x.id)
    SELECT array_agg(x.id) INTO ids FROM x;
    IF ids IS NOT NULL THEN
        PERFORM claudemesh.close_presences(p_ns, ids, 4002, 'banned');
        PERFORM claudemesh.announce_left(p_ns, ids);
        PERFORM claudemesh.release_held(p_ns, ids);
    END IF;
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['member_banned'], ARRAY[p_actor],
        ARRAY['{"member_id":' || to_json(mb.id)::text || ',"pubkey":' || to_json(mb.pubkey)::text || '}'],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    code := '';
    name := mb.display_name;
    RETURN NEXT;
END
$$;
-- +goose StatementEnd

-- unban in one statement, for an admin: the most recently revoked member matched by target
-- (display name or key) whose key has no live member again is restored, audited. Codes: '',
-- 'forbidden', 'not_found'.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.unban(p_mesh text, p_caller_member text, p_actor text, p_target text)
RETURNS TABLE (code text, name text) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    mb claudemesh.member;
BEGIN
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO mb FROM claudemesh.member m
    WHERE m.mesh_id = p_mesh AND m.revoked_at IS NOT NULL AND (m.display_name = p_target OR m.pubkey = t)
      AND NOT EXISTS (SELECT 1 FROM claudemesh.member l WHERE l.mesh_id = p_mesh AND l.pubkey = m.pubkey AND l.revoked_at IS NULL)
    ORDER BY m.pubkey = t DESC, m.revoked_at DESC LIMIT 1;
    IF NOT FOUND THEN
        code := 'not_found'; RETURN NEXT; RETURN;
    END IF;
    UPDATE claudemesh.member m SET revoked_at = NULL WHERE m.id = mb.id;
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['member_unbanned'], ARRAY[p_actor],
        ARRAY['{"member_id":' || to_json(mb.id)::text || ',"pubkey":' || to_json(mb.pubkey)::text || '}'],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    code := '';
    name := mb.display_name;
    RETURN NEXT;
END
$$;
-- +goose StatementEnd

-- list_bans, for an admin: the first row is the outcome ('' or 'forbidden'), then one row per
-- revoked key of the mesh that has no live member again (its latest revocation).
-- +goose StatementBegin
CREATE FUNCTION claudemesh.list_bans(p_mesh text, p_caller_member text, p_limit int)
RETURNS TABLE (code text, name text, pubkey text, revoked_at timestamptz) LANGUAGE plpgsql AS $$
BEGIN
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    code := '';
    RETURN NEXT;
    RETURN QUERY
    SELECT 'ban'::text, b.display_name, b.pubkey, b.revoked_at FROM (
        SELECT DISTINCT ON (m.pubkey) m.display_name, m.pubkey, m.revoked_at FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.revoked_at IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM claudemesh.member l WHERE l.mesh_id = p_mesh AND l.pubkey = m.pubkey AND l.revoked_at IS NULL)
        ORDER BY m.pubkey, m.revoked_at DESC) b
    ORDER BY b.revoked_at DESC, b.pubkey
    LIMIT p_limit;
END
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION claudemesh.list_bans;
DROP FUNCTION claudemesh.unban;
DROP FUNCTION claudemesh.ban;
DROP FUNCTION claudemesh.kick;
DROP FUNCTION claudemesh.send_batch(text, text, text[], text[], text[], text[], text[], text[], text[], text[], text[],
    text[], text[], text[], timestamptz[], timestamptz[], text[], text[], text[]);
DROP FUNCTION claudemesh.hello(text, text, text, text, text, text, text, text, int, text, jsonb, text[], int, text,
    timestamptz, boolean, text, text, text, text, text);
DROP FUNCTION claudemesh.is_admin;
DROP FUNCTION claudemesh.close_presences;
DROP FUNCTION claudemesh.announce_left;
DROP FUNCTION claudemesh.release_held;
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.push_line(d_id bigint, presence text, e claudemesh.envelope) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT json_build_object('k', 'u', 'p', presence, 'x', json_build_object(
        'i', d_id, 'e', e.id, 'h', e.mesh_id, 's', e.sender_pubkey, 'm', e.sender_member_pubkey,
        'r', e.priority, 'n', e.nonce, 'c', e.ciphertext,
        't', (extract(epoch FROM e.created_at) * 1000000)::bigint))::text
$$;
-- +goose StatementEnd
DROP FUNCTION claudemesh.push_data;
ALTER TABLE claudemesh.envelope DROP COLUMN client_message_id, DROP COLUMN request_fingerprint, DROP COLUMN sender_name;
ALTER TABLE claudemesh.presence DROP COLUMN role, DROP COLUMN hostname, DROP COLUMN peer_type, DROP COLUMN channel,
    DROP COLUMN model;
