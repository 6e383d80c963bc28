-- +goose Up
-- Per-recipient order across a failover. A send reads where its recipient's session is
-- connected and assigns the row to it there; a hello that moves the session to another replica
-- (a kill -9 or a partition: the old presence still live) releases what was assigned to it and
-- claims it on its new replica. A send that read the session on the old replica before the
-- hello committed, and committed after the hello's claim looked, left its row assigned to the
-- old replica (dead, or with no such session any more): pushed only by the catch-up poll,
-- seconds later and after messages sent after it (the chaos test's order check found it).
-- Sends now take a shared "route" lock per mesh before they read anything, and a hello that
-- moves a live session takes its mesh's lock alone: it waits for the sends in flight, its
-- release sees their rows, and the sends after it read the session where it is now. Held for
-- server time only: no lock waits on a round trip. Same signatures and rows: replicas of the
-- previous release call them unchanged.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.send_batch_capped(p_node text, p_ns text, e_ids text[], e_mesh text[], e_sender text[], e_sender_pub text[], e_sender_member_pub text[], e_spec text[], e_kind text[], e_key text[], e_prio text[], e_nonce text[], e_cipher text[], e_client text[], e_created timestamp with time zone[], e_expires timestamp with time zone[], e_cmid text[], e_fp text[], e_sender_name text[], e_frame text[])
 RETURNS TABLE(row_kind text, idx integer, queued boolean, recipients integer, delivery_id bigint, presence_id text, assigned boolean, original text, fingerprint text)
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
 SET enable_seqscan TO 'off'
 SET jit TO 'off'
AS $function$
#variable_conflict use_column
DECLARE
    v_id text;
    v_mesh text;
    v_key text;
    v_prio text;
    v_frame text;
    v_orig text;
    v_fp text;
    v_member text;
    v_skey text;
    v_pres text;
    v_pnode text;
    v_did bigint;
    v_assign boolean;
    v_line text;
    n_node text[] := '{}';
    n_line text[] := '{}';
    a_line text[] := '{}'; -- wake-ups for the cluster: pending, no session took it
    v_wake text;
BEGIN
    -- Before anything is read (a statement of its own, so the reads below take a snapshot
    -- after it): the route lock of each of the batch's meshes, shared, in mesh order. A hello
    -- that moves a live session between replicas takes it alone (see claudemesh.hello, 00072),
    -- so this send either commits before that hello releases what was assigned to the session,
    -- or reads the session where it moved to. A replica puts at most 64 meshes in a statement
    -- (broker/committer.go): Postgres's lock table is shared, sized for about 64 locks a
    -- connection.
    FOR v_mesh IN SELECT DISTINCT m COLLATE "C" FROM unnest(e_mesh) m ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.route:' || v_mesh, 0));
    END LOOP;
    IF cardinality(e_ids) > 4 OR NOT (e_kind <@ ARRAY['direct']) THEN
        RETURN QUERY SELECT * FROM claudemesh.send_batch_set_capped(p_node, p_ns, e_ids, e_mesh, e_sender, e_sender_pub,
            e_sender_member_pub, e_spec, e_kind, e_key, e_prio, e_nonce, e_cipher, e_client, e_created, e_expires,
            e_cmid, e_fp, e_sender_name, e_frame);
        RETURN;
    END IF;
    -- In batch order: delivery ids, rows, notifications and audit entries come in the order the
    -- set-based form gives them.
    FOR i IN 1 .. cardinality(e_ids) LOOP
        v_id := e_ids[i]; v_mesh := e_mesh[i]; v_key := e_key[i]; v_prio := e_prio[i]; v_frame := e_frame[i];
        v_orig := NULL; v_member := NULL; v_skey := NULL; v_pres := NULL; v_pnode := NULL;
        IF e_cmid[i] <> '' THEN
            SELECT o.id, o.request_fingerprint INTO v_orig, v_fp FROM claudemesh.envelope o
            WHERE o.mesh_id = v_mesh AND o.sender_member_id = e_sender[i] AND o.client_message_id = e_cmid[i]
              AND o.client_message_id <> ''
            LIMIT 1;
            IF v_orig IS NOT NULL THEN
                RETURN QUERY SELECT 'x'::text, i, true, 0, NULL::bigint, NULL::text, NULL::boolean, v_orig, v_fp;
                CONTINUE;
            END IF;
        END IF;
        -- A member key first; else a session key of a live member. Then one connected session
        -- of that member (or that session) that may take it now, this node's first.
        SELECT m.id INTO v_member FROM claudemesh.member m
        WHERE m.mesh_id = v_mesh AND m.pubkey = v_key AND m.revoked_at IS NULL LIMIT 1;
        IF v_member IS NOT NULL THEN
            SELECT x.id, x.node_id INTO v_pres, v_pnode FROM claudemesh.presence x
            WHERE x.mesh_id = v_mesh AND x.member_pubkey = v_key AND x.ended_at IS NULL
              AND x.member_id = v_member AND x.grace_until IS NULL AND (v_prio = 'now' OR x.status = 'idle')
            ORDER BY x.node_id = p_node DESC, x.connected_at DESC LIMIT 1;
        ELSE
            SELECT s.member_id INTO v_member FROM claudemesh.session_key s
            WHERE s.mesh_id = v_mesh AND s.session_pubkey = v_key LIMIT 1;
            IF v_member IS NOT NULL AND NOT EXISTS (
                    SELECT 1 FROM claudemesh.member sm WHERE sm.id = v_member AND sm.revoked_at IS NULL) THEN
                v_member := NULL;
            END IF;
            IF v_member IS NULL THEN
                RETURN QUERY SELECT 'e'::text, i, false, 0, NULL::bigint, NULL::text, NULL::boolean, NULL::text, NULL::text;
                CONTINUE;
            END IF;
            v_skey := v_key;
            SELECT x.id, x.node_id INTO v_pres, v_pnode FROM claudemesh.presence x
            WHERE x.mesh_id = v_mesh AND x.session_pubkey = v_key AND x.ended_at IS NULL
              AND x.member_id = v_member AND x.grace_until IS NULL AND (v_prio = 'now' OR x.status = 'idle')
            ORDER BY x.node_id = p_node DESC, x.connected_at DESC LIMIT 1;
        END IF;
        -- Refused while the member's waiting messages are at the bound (claudemesh.backlog,
        -- kept by sweep_backlog) when it would wait: no session takes it now, or the one that
        -- would has had rows assigned for 5 s, behind its full window (00050).
        IF EXISTS (SELECT 1 FROM claudemesh.backlog f WHERE f.member_id = v_member AND f.at_bound)
           AND (v_pres IS NULL OR EXISTS (SELECT 1 FROM claudemesh.delivery d WHERE d.pushed_presence = v_pres AND d.state = 'assigned'
                           AND d.pushed_at < now() - interval '5 seconds')) THEN
            RETURN QUERY SELECT 'f'::text, i, false, 1, NULL::bigint, NULL::text, NULL::boolean, NULL::text, NULL::text;
            CONTINUE;
        END IF;
        v_assign := v_pres IS NOT NULL AND v_frame <> '';
        v_did := nextval('claudemesh.delivery_id_seq');
        INSERT INTO claudemesh.envelope (id, mesh_id, sender_member_id, sender_pubkey, sender_member_pubkey,
            target_spec, priority, nonce, ciphertext, client_id, created_at, expires_at,
            client_message_id, request_fingerprint, sender_name)
        VALUES (v_id, v_mesh, e_sender[i], e_sender_pub[i], e_sender_member_pub[i], e_spec[i], v_prio, e_nonce[i],
            e_cipher[i], e_client[i], e_created[i], e_expires[i], e_cmid[i], e_fp[i], e_sender_name[i]);
        INSERT INTO claudemesh.delivery (id, envelope_id, mesh_id, recipient_member_id, recipient_session_pubkey,
            recipient_session_id, priority, state, pushed_node, pushed_presence, pushed_at, expires_at)
        OVERRIDING SYSTEM VALUE
        VALUES (v_did, v_id, v_mesh, v_member, v_skey, NULL, v_prio,
            CASE WHEN v_assign THEN 'assigned' ELSE 'pending' END,
            CASE WHEN v_assign THEN v_pnode END, CASE WHEN v_assign THEN v_pres END,
            CASE WHEN v_assign THEN now() END, e_expires[i]);
        IF v_pres IS NULL THEN
            -- Nobody took it: every replica looks for the member's sessions, so one that
            -- registers while this statement runs is woken (see the migration's comment).
            v_wake := '{"k":"d","m":"' || v_member || '","y":"' || v_prio || '"}';
            IF NOT (v_wake = ANY (a_line)) THEN
                a_line := a_line || v_wake;
            END IF;
        ELSIF v_pnode <> p_node THEN
            -- The line the set-based form sends ('w': the push itself; 'd': a wake-up, once per
            -- member and node), sent below with the node's others.
            v_line := CASE WHEN v_assign
                THEN '{"k":"w","p":"' || v_pres || '","i":' || v_did || ',"y":"' || v_prio || '","x":' || v_frame || '}'
                ELSE json_build_object('k', 'd', 'm', v_member)::text END;
            IF v_assign OR NOT EXISTS (SELECT 1 FROM unnest(n_node, n_line) AS n(node, line)
                                       WHERE n.node = v_pnode AND n.line = v_line) THEN
                n_node := n_node || v_pnode;
                n_line := n_line || v_line;
            END IF;
        END IF;
        INSERT INTO claudemesh.audit_pending (mesh_id, event_type, actor, data, ts_micros)
        VALUES (v_mesh, 'message_sent', e_sender_pub[i],
            '{"message_id":' || to_json(v_id)::text || ',"priority":' || to_json(v_prio)::text ||
            ',"recipients":1,"size":' || (octet_length(e_cipher[i]) + octet_length(e_nonce[i]))::text ||
            ',"target_kind":"direct"}',
            (extract(epoch FROM e_created[i]) * 1000000)::bigint);
        RETURN QUERY SELECT 'e'::text, i, true, 1, NULL::bigint, NULL::text, NULL::boolean, NULL::text, NULL::text;
        IF v_pres IS NOT NULL AND v_pnode = p_node THEN
            RETURN QUERY SELECT 'd'::text, i, NULL::boolean, NULL::int, v_did, v_pres, v_assign, NULL::text, NULL::text;
        END IF;
    END LOOP;
    IF cardinality(a_line) > 0 THEN
        PERFORM claudemesh.notify_lines(p_ns || '_all', a_line);
    END IF;
    IF cardinality(n_line) > 0 THEN
        -- One payload per node, its lines in batch order, as the set-based form packs them.
        PERFORM claudemesh.notify_lines(p_ns || '_n_' || n.node, array_agg(n.line ORDER BY n.ord))
        FROM unnest(n_node, n_line) WITH ORDINALITY AS n(node, line, ord)
        GROUP BY n.node;
    END IF;
END
$function$;
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
    routed boolean := false;
BEGIN
    SELECT * INTO ms FROM claudemesh.mesh WHERE id = p_mesh;
    IF FOUND AND ms.archived_at IS NULL THEN
        lim := CASE WHEN ms.max_peers > 0 THEN ms.max_peers ELSE p_default_limit END;
        max_sessions := lim;
    ELSE
        code := 'unauthorized'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO mb FROM claudemesh.member m
    -- By key alone, as the protocol has it (unauthorized: no live member with that mesh and
    -- pubkey); a plain hello's memberId is signed but names nothing the key does not (00053).
    WHERE m.mesh_id = p_mesh AND m.pubkey = p_pubkey
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
            SELECT k.member_id INTO owner FROM claudemesh.session_key k
            WHERE k.mesh_id = p_mesh AND k.session_pubkey = p_session_pubkey;
        END IF;
        IF owner IS NULL THEN
            -- Nor, for a new binding, a live member's key in another mesh (00071): a plain
            -- hello proves nothing about its session key. A binding made before stays (/join
            -- takes any key, so a key joined elsewhere later must not end a member's session).
            SELECT m.id INTO owner FROM claudemesh.member m
            WHERE m.pubkey = p_session_pubkey AND m.revoked_at IS NULL AND m.pubkey <> p_pubkey LIMIT 1;
        END IF;
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
    -- A hello that moves a live session from another replica waits for the sends in flight
    -- that may have read it there (they hold this lock shared, see send_batch_capped), and
    -- holds the sends that come after until it commits, so that they read it here. Otherwise a
    -- send that read the session on its old replica and committed after this statement left its
    -- row assigned there: pushed by no one until the catch-up poll, seconds later and after
    -- messages sent after it (00072). Per mesh: sends wait only for a move in their own mesh,
    -- and hellos of other meshes not at all. Taken before the mesh's lock, as a hello batch
    -- takes its meshes' locks, in mesh order, and sends theirs: no cycle of waits. Decided
    -- before the mesh's lock; a move that only the mesh's lock reveals (the session's other
    -- hello committing meanwhile on a third replica) takes it after, below.
    -- Two probes, each by a whole index key led by the mesh (as the lookups below), the rest
    -- tested on the row found: a test of the node in the scan's condition let the planner walk
    -- the index of every live session by node (00025).
    IF EXISTS (SELECT 1 FROM (SELECT x.node_id, x.grace_until FROM claudemesh.presence x
                              WHERE x.mesh_id = p_mesh AND x.member_id = mb.id AND x.session_id = p_session_id
                                AND x.ended_at IS NULL OFFSET 0) y
               WHERE y.grace_until IS NULL AND y.node_id <> p_node)
       OR (p_session_pubkey <> '' AND EXISTS (
               SELECT 1 FROM (SELECT x.node_id, x.grace_until FROM claudemesh.presence x
                              WHERE x.mesh_id = p_mesh AND x.session_pubkey = p_session_pubkey AND x.ended_at IS NULL
                                AND x.member_id = mb.id OFFSET 0) y
               WHERE y.grace_until IS NULL AND y.node_id <> p_node)) THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.route:' || p_mesh, 0));
        routed := true;
    END IF;
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
    -- A hook that fired before this hello (the first-turn race) applies now; a hello refused
    -- above leaves it for the next. A signal is this session's by its sessionId, else by the
    -- pid and cwd it names (whatever sessionId it gave: meshctl's hook and peer name one
    -- process with two ids), else by cwd when it names no process at all (00053). A signal
    -- naming another pid or sessionId is another session's. The best-matching kind wins; its
    -- newest signal applies and its older ones go with it, so none of them comes back at the
    -- session's next hello. The shared locks on the cwd (the member's, and unsigned hooks') make
    -- a hook that finds no session wait for this statement (hook_status), so it either sees
    -- this presence or leaves its signal where this lookup sees it.
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status:' || p_pubkey || ':' || p_cwd, 0));
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status::' || p_cwd, 0));
    -- And on the sessionId, which a hook finds its session by whatever cwd it names (00067).
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status.session:' || p_pubkey || ':' || p_session_id, 0));
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status.session::' || p_session_id, 0));
    WITH m AS (
        SELECT q.id, r.rank
        FROM claudemesh.pending_status q
        CROSS JOIN LATERAL (SELECT CASE
            WHEN q.session_id = p_session_id THEN 1
            WHEN q.pid = p_pid AND q.cwd = p_cwd THEN 2
            WHEN q.pid IS NULL AND q.session_id IS NULL AND q.cwd = p_cwd THEN 3 END AS rank) r
        WHERE q.expires_at > now() AND (q.member_pubkey IS NULL OR q.member_pubkey = p_pubkey)
          AND (q.session_id = p_session_id OR q.cwd = p_cwd) AND r.rank IS NOT NULL
    ), gone AS (
        -- What this hello deletes is what it applies: a hello racing it for the same signals
        -- gets none of them.
        DELETE FROM claudemesh.pending_status ps USING m
        WHERE ps.id = m.id AND m.rank = (SELECT min(b.rank) FROM m b)
        RETURNING ps.id, ps.status, ps.created_at
    )
    SELECT gone.status INTO hook FROM gone ORDER BY gone.created_at DESC, gone.id DESC LIMIT 1;
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
    IF NOT routed AND old.node_id IS NOT NULL AND old.node_id <> p_node AND old.grace_until IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.route:' || p_mesh, 0));
    END IF;
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
    -- The entry as claudemesh.audit_append records it, without its check that the mesh
    -- exists: this statement read the mesh at its start (meshes are never deleted).
    INSERT INTO claudemesh.audit_pending (mesh_id, event_type, actor, data, ts_micros)
    VALUES (p_mesh, 'peer_connected', p_pubkey,
        '{"node":' || to_json(p_node)::text || ',"presence_id":' || to_json(up.id::text)::text ||
            ',"resumed":' || resumed::text || ',"role":' || to_json(p_role)::text || '}',
        (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    RETURN NEXT;
END
$$;
-- +goose StatementEnd

-- +goose Down
-- The bodies of 00050 (send_batch_capped) and 00071 (hello).
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.send_batch_capped(p_node text, p_ns text, e_ids text[], e_mesh text[], e_sender text[], e_sender_pub text[], e_sender_member_pub text[], e_spec text[], e_kind text[], e_key text[], e_prio text[], e_nonce text[], e_cipher text[], e_client text[], e_created timestamp with time zone[], e_expires timestamp with time zone[], e_cmid text[], e_fp text[], e_sender_name text[], e_frame text[])
 RETURNS TABLE(row_kind text, idx integer, queued boolean, recipients integer, delivery_id bigint, presence_id text, assigned boolean, original text, fingerprint text)
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
 SET enable_seqscan TO 'off'
 SET jit TO 'off'
AS $function$
#variable_conflict use_column
DECLARE
    v_id text;
    v_mesh text;
    v_key text;
    v_prio text;
    v_frame text;
    v_orig text;
    v_fp text;
    v_member text;
    v_skey text;
    v_pres text;
    v_pnode text;
    v_did bigint;
    v_assign boolean;
    v_line text;
    n_node text[] := '{}';
    n_line text[] := '{}';
    a_line text[] := '{}'; -- wake-ups for the cluster: pending, no session took it
    v_wake text;
BEGIN
    IF cardinality(e_ids) > 4 OR NOT (e_kind <@ ARRAY['direct']) THEN
        RETURN QUERY SELECT * FROM claudemesh.send_batch_set_capped(p_node, p_ns, e_ids, e_mesh, e_sender, e_sender_pub,
            e_sender_member_pub, e_spec, e_kind, e_key, e_prio, e_nonce, e_cipher, e_client, e_created, e_expires,
            e_cmid, e_fp, e_sender_name, e_frame);
        RETURN;
    END IF;
    -- In batch order: delivery ids, rows, notifications and audit entries come in the order the
    -- set-based form gives them.
    FOR i IN 1 .. cardinality(e_ids) LOOP
        v_id := e_ids[i]; v_mesh := e_mesh[i]; v_key := e_key[i]; v_prio := e_prio[i]; v_frame := e_frame[i];
        v_orig := NULL; v_member := NULL; v_skey := NULL; v_pres := NULL; v_pnode := NULL;
        IF e_cmid[i] <> '' THEN
            SELECT o.id, o.request_fingerprint INTO v_orig, v_fp FROM claudemesh.envelope o
            WHERE o.mesh_id = v_mesh AND o.sender_member_id = e_sender[i] AND o.client_message_id = e_cmid[i]
              AND o.client_message_id <> ''
            LIMIT 1;
            IF v_orig IS NOT NULL THEN
                RETURN QUERY SELECT 'x'::text, i, true, 0, NULL::bigint, NULL::text, NULL::boolean, v_orig, v_fp;
                CONTINUE;
            END IF;
        END IF;
        -- A member key first; else a session key of a live member. Then one connected session
        -- of that member (or that session) that may take it now, this node's first.
        SELECT m.id INTO v_member FROM claudemesh.member m
        WHERE m.mesh_id = v_mesh AND m.pubkey = v_key AND m.revoked_at IS NULL LIMIT 1;
        IF v_member IS NOT NULL THEN
            SELECT x.id, x.node_id INTO v_pres, v_pnode FROM claudemesh.presence x
            WHERE x.mesh_id = v_mesh AND x.member_pubkey = v_key AND x.ended_at IS NULL
              AND x.member_id = v_member AND x.grace_until IS NULL AND (v_prio = 'now' OR x.status = 'idle')
            ORDER BY x.node_id = p_node DESC, x.connected_at DESC LIMIT 1;
        ELSE
            SELECT s.member_id INTO v_member FROM claudemesh.session_key s
            WHERE s.mesh_id = v_mesh AND s.session_pubkey = v_key LIMIT 1;
            IF v_member IS NOT NULL AND NOT EXISTS (
                    SELECT 1 FROM claudemesh.member sm WHERE sm.id = v_member AND sm.revoked_at IS NULL) THEN
                v_member := NULL;
            END IF;
            IF v_member IS NULL THEN
                RETURN QUERY SELECT 'e'::text, i, false, 0, NULL::bigint, NULL::text, NULL::boolean, NULL::text, NULL::text;
                CONTINUE;
            END IF;
            v_skey := v_key;
            SELECT x.id, x.node_id INTO v_pres, v_pnode FROM claudemesh.presence x
            WHERE x.mesh_id = v_mesh AND x.session_pubkey = v_key AND x.ended_at IS NULL
              AND x.member_id = v_member AND x.grace_until IS NULL AND (v_prio = 'now' OR x.status = 'idle')
            ORDER BY x.node_id = p_node DESC, x.connected_at DESC LIMIT 1;
        END IF;
        -- Refused while the member's waiting messages are at the bound (claudemesh.backlog,
        -- kept by sweep_backlog) when it would wait: no session takes it now, or the one that
        -- would has had rows assigned for 5 s, behind its full window (00050).
        IF EXISTS (SELECT 1 FROM claudemesh.backlog f WHERE f.member_id = v_member AND f.at_bound)
           AND (v_pres IS NULL OR EXISTS (SELECT 1 FROM claudemesh.delivery d WHERE d.pushed_presence = v_pres AND d.state = 'assigned'
                           AND d.pushed_at < now() - interval '5 seconds')) THEN
            RETURN QUERY SELECT 'f'::text, i, false, 1, NULL::bigint, NULL::text, NULL::boolean, NULL::text, NULL::text;
            CONTINUE;
        END IF;
        v_assign := v_pres IS NOT NULL AND v_frame <> '';
        v_did := nextval('claudemesh.delivery_id_seq');
        INSERT INTO claudemesh.envelope (id, mesh_id, sender_member_id, sender_pubkey, sender_member_pubkey,
            target_spec, priority, nonce, ciphertext, client_id, created_at, expires_at,
            client_message_id, request_fingerprint, sender_name)
        VALUES (v_id, v_mesh, e_sender[i], e_sender_pub[i], e_sender_member_pub[i], e_spec[i], v_prio, e_nonce[i],
            e_cipher[i], e_client[i], e_created[i], e_expires[i], e_cmid[i], e_fp[i], e_sender_name[i]);
        INSERT INTO claudemesh.delivery (id, envelope_id, mesh_id, recipient_member_id, recipient_session_pubkey,
            recipient_session_id, priority, state, pushed_node, pushed_presence, pushed_at, expires_at)
        OVERRIDING SYSTEM VALUE
        VALUES (v_did, v_id, v_mesh, v_member, v_skey, NULL, v_prio,
            CASE WHEN v_assign THEN 'assigned' ELSE 'pending' END,
            CASE WHEN v_assign THEN v_pnode END, CASE WHEN v_assign THEN v_pres END,
            CASE WHEN v_assign THEN now() END, e_expires[i]);
        IF v_pres IS NULL THEN
            -- Nobody took it: every replica looks for the member's sessions, so one that
            -- registers while this statement runs is woken (see the migration's comment).
            v_wake := '{"k":"d","m":"' || v_member || '","y":"' || v_prio || '"}';
            IF NOT (v_wake = ANY (a_line)) THEN
                a_line := a_line || v_wake;
            END IF;
        ELSIF v_pnode <> p_node THEN
            -- The line the set-based form sends ('w': the push itself; 'd': a wake-up, once per
            -- member and node), sent below with the node's others.
            v_line := CASE WHEN v_assign
                THEN '{"k":"w","p":"' || v_pres || '","i":' || v_did || ',"y":"' || v_prio || '","x":' || v_frame || '}'
                ELSE json_build_object('k', 'd', 'm', v_member)::text END;
            IF v_assign OR NOT EXISTS (SELECT 1 FROM unnest(n_node, n_line) AS n(node, line)
                                       WHERE n.node = v_pnode AND n.line = v_line) THEN
                n_node := n_node || v_pnode;
                n_line := n_line || v_line;
            END IF;
        END IF;
        INSERT INTO claudemesh.audit_pending (mesh_id, event_type, actor, data, ts_micros)
        VALUES (v_mesh, 'message_sent', e_sender_pub[i],
            '{"message_id":' || to_json(v_id)::text || ',"priority":' || to_json(v_prio)::text ||
            ',"recipients":1,"size":' || (octet_length(e_cipher[i]) + octet_length(e_nonce[i]))::text ||
            ',"target_kind":"direct"}',
            (extract(epoch FROM e_created[i]) * 1000000)::bigint);
        RETURN QUERY SELECT 'e'::text, i, true, 1, NULL::bigint, NULL::text, NULL::boolean, NULL::text, NULL::text;
        IF v_pres IS NOT NULL AND v_pnode = p_node THEN
            RETURN QUERY SELECT 'd'::text, i, NULL::boolean, NULL::int, v_did, v_pres, v_assign, NULL::text, NULL::text;
        END IF;
    END LOOP;
    IF cardinality(a_line) > 0 THEN
        PERFORM claudemesh.notify_lines(p_ns || '_all', a_line);
    END IF;
    IF cardinality(n_line) > 0 THEN
        -- One payload per node, its lines in batch order, as the set-based form packs them.
        PERFORM claudemesh.notify_lines(p_ns || '_n_' || n.node, array_agg(n.line ORDER BY n.ord))
        FROM unnest(n_node, n_line) WITH ORDINALITY AS n(node, line, ord)
        GROUP BY n.node;
    END IF;
END
$function$;
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
    ELSE
        code := 'unauthorized'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO mb FROM claudemesh.member m
    -- By key alone, as the protocol has it (unauthorized: no live member with that mesh and
    -- pubkey); a plain hello's memberId is signed but names nothing the key does not (00053).
    WHERE m.mesh_id = p_mesh AND m.pubkey = p_pubkey
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
            SELECT k.member_id INTO owner FROM claudemesh.session_key k
            WHERE k.mesh_id = p_mesh AND k.session_pubkey = p_session_pubkey;
        END IF;
        IF owner IS NULL THEN
            -- Nor, for a new binding, a live member's key in another mesh (00071): a plain
            -- hello proves nothing about its session key. A binding made before stays (/join
            -- takes any key, so a key joined elsewhere later must not end a member's session).
            SELECT m.id INTO owner FROM claudemesh.member m
            WHERE m.pubkey = p_session_pubkey AND m.revoked_at IS NULL AND m.pubkey <> p_pubkey LIMIT 1;
        END IF;
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
    -- A hook that fired before this hello (the first-turn race) applies now; a hello refused
    -- above leaves it for the next. A signal is this session's by its sessionId, else by the
    -- pid and cwd it names (whatever sessionId it gave: meshctl's hook and peer name one
    -- process with two ids), else by cwd when it names no process at all (00053). A signal
    -- naming another pid or sessionId is another session's. The best-matching kind wins; its
    -- newest signal applies and its older ones go with it, so none of them comes back at the
    -- session's next hello. The shared locks on the cwd (the member's, and unsigned hooks') make
    -- a hook that finds no session wait for this statement (hook_status), so it either sees
    -- this presence or leaves its signal where this lookup sees it.
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status:' || p_pubkey || ':' || p_cwd, 0));
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status::' || p_cwd, 0));
    -- And on the sessionId, which a hook finds its session by whatever cwd it names (00067).
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status.session:' || p_pubkey || ':' || p_session_id, 0));
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status.session::' || p_session_id, 0));
    WITH m AS (
        SELECT q.id, r.rank
        FROM claudemesh.pending_status q
        CROSS JOIN LATERAL (SELECT CASE
            WHEN q.session_id = p_session_id THEN 1
            WHEN q.pid = p_pid AND q.cwd = p_cwd THEN 2
            WHEN q.pid IS NULL AND q.session_id IS NULL AND q.cwd = p_cwd THEN 3 END AS rank) r
        WHERE q.expires_at > now() AND (q.member_pubkey IS NULL OR q.member_pubkey = p_pubkey)
          AND (q.session_id = p_session_id OR q.cwd = p_cwd) AND r.rank IS NOT NULL
    ), gone AS (
        -- What this hello deletes is what it applies: a hello racing it for the same signals
        -- gets none of them.
        DELETE FROM claudemesh.pending_status ps USING m
        WHERE ps.id = m.id AND m.rank = (SELECT min(b.rank) FROM m b)
        RETURNING ps.id, ps.status, ps.created_at
    )
    SELECT gone.status INTO hook FROM gone ORDER BY gone.created_at DESC, gone.id DESC LIMIT 1;
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
    -- The entry as claudemesh.audit_append records it, without its check that the mesh
    -- exists: this statement read the mesh at its start (meshes are never deleted).
    INSERT INTO claudemesh.audit_pending (mesh_id, event_type, actor, data, ts_micros)
    VALUES (p_mesh, 'peer_connected', p_pubkey,
        '{"node":' || to_json(p_node)::text || ',"presence_id":' || to_json(up.id::text)::text ||
            ',"resumed":' || resumed::text || ',"role":' || to_json(p_role)::text || '}',
        (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    RETURN NEXT;
END
$$;
-- +goose StatementEnd
