-- +goose Up
-- Fixes from review of 00007 and 00010, as new bodies of the same functions (same signatures
-- and results, so replicas of the previous version call them unchanged):
--  * hello: a member banned or revoked while its hello waited for the mesh's lock is refused
--    (the ban takes that lock); a reattach re-addresses the session's older multicasts whatever
--    their state, not only pending ones (pushed ones were released under the old sessionId and
--    never claimed again).
--  * send_batch: a multicast to a session with a key is addressed to the key, which a reattach
--    keeps, so no send committing during a reattach can address it to a sessionId gone.
--  * ban: a display name or key prefix matching several members is refused (ambiguous) rather
--    than banning the oldest; the owner's key is protected, and only the owner bans an admin;
--    the hello lock closes the race with a hello in flight.
--  * close_presences: the line names the member too, so a replica of a version before 00007
--    (which closes by member) still closes the socket during a rolling deploy.

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.close_presences(p_ns text, p_ids text[], p_code int, p_reason text) RETURNS void
LANGUAGE sql AS $$
    SELECT claudemesh.notify_lines(p_ns || '_n_' || x.node_id,
        array_agg(json_build_object('k', 'k', 'p', x.id, 'm', x.member_id, 'c', p_code, 'y', p_reason)::text ORDER BY x.id))
    FROM claudemesh.presence x WHERE x.id = ANY(p_ids)
    GROUP BY x.node_id;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.ban(p_ns text, p_mesh text, p_caller_member text, p_actor text, p_target text)
RETURNS TABLE (code text, name text) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    mb claudemesh.member;
    ms claudemesh.mesh;
    n bigint;
    ids text[];
BEGIN
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    -- A key names one member; a display name or a key prefix must name exactly one.
    SELECT * INTO mb FROM claudemesh.member m WHERE m.mesh_id = p_mesh AND m.revoked_at IS NULL AND m.pubkey = t;
    IF NOT FOUND THEN
        SELECT count(*) INTO n FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.revoked_at IS NULL
          AND (m.display_name = p_target OR (length(t) >= 8 AND starts_with(m.pubkey, t)));
        IF n > 1 THEN
            code := 'ambiguous'; RETURN NEXT; RETURN;
        END IF;
        SELECT * INTO mb FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.revoked_at IS NULL
          AND (m.display_name = p_target OR (length(t) >= 8 AND starts_with(m.pubkey, t)));
    END IF;
    IF NOT FOUND THEN
        code := 'not_found'; RETURN NEXT; RETURN;
    ELSIF mb.id = p_caller_member THEN
        code := 'self'; RETURN NEXT; RETURN;
    END IF;
    -- The owner's key can't be banned, and only the owner bans another admin: an admin can't
    -- lock the owner (or a peer admin) out of the mesh.
    SELECT * INTO ms FROM claudemesh.mesh WHERE id = p_mesh;
    IF mb.pubkey = ms.owner_pubkey OR (mb.role = 'admin' AND NOT EXISTS (
            SELECT 1 FROM claudemesh.member c WHERE c.id = p_caller_member AND c.pubkey = ms.owner_pubkey)) THEN
        code := 'protected'; RETURN NEXT; RETURN;
    END IF;
    -- Hellos of the mesh take this lock and re-check membership under it: none registers the
    -- member after this revocation commits.
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
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

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.hello(p_node text, p_ns text, p_mesh text, p_member_id text, p_pubkey text,
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
    -- A ban (or revoke) takes this lock too: one that committed while this hello waited for it
    -- is seen here, not after the presence is registered.
    IF NOT EXISTS (SELECT 1 FROM claudemesh.member m WHERE m.id = mb.id AND m.revoked_at IS NULL) THEN
        code := 'revoked'; member_id := NULL; RETURN NEXT; RETURN;
    END IF;
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
                -- Multicasts for a session with a key are addressed to the key (since 00011);
                -- older ones, to its sessionId: those follow it, whatever their state (what was
                -- pushed and not acked is pending again below).
                UPDATE claudemesh.delivery d SET recipient_session_id = p_session_id
                WHERE d.recipient_member_id = mb.id AND d.state IN ('pending', 'assigned', 'pushed')
                  AND d.recipient_session_id = keyed.session_id;
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

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.send_batch(p_node text, p_ns text,
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
        -- Addressed to the session's key when it has one (which a reattach keeps), else to its
        -- sessionId.
        SELECT e.i, x.member_id, x.session_pubkey, CASE WHEN x.session_pubkey IS NULL THEN x.session_id END,
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

-- +goose Down
-- The bodies above stay: they have the signatures and results the previous version calls, and
-- rolling back should not bring back the bugs they fix.
