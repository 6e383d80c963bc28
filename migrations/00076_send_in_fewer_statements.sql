-- +goose Up
-- A send of a few direct messages in fewer statements. Postgres spends about as much on
-- starting and ending each statement inside a PL/pgSQL function (plan lookup, executor start
-- and end) as on its work, so at 1,000 msgs/s the send was the largest share of the
-- primary's CPU. Per message:
--   - one mesh (nearly always): its route lock taken without a query to sort the meshes;
--   - the member, its session and whether its backlog is at the bound in one read, not
--     three (a session key's path keeps its reads);
--   - rows returned by RETURN NEXT, not a query each;
--   - a push's line added without evaluating the wake-up's duplicate test, a query;
--   - one node's notifications sent without a query to group them.
-- Same signature, rows, notifications and audit entries: replicas of the previous release
-- call it unchanged. 9-12 % less time a one-message send transaction (pgbench, both versions
-- interleaved, commit not waiting for the flush; BENCHMARKS.md, stop 46).
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
    v_full boolean;
    v_n int;
BEGIN
    -- Before anything is read (a statement of its own, so the reads below take a snapshot
    -- after it): the route lock of each of the batch's meshes, shared, in mesh order. A hello
    -- that moves a live session between replicas takes it alone (see claudemesh.hello, 00072),
    -- so this send either commits before that hello releases what was assigned to the session,
    -- or reads the session where it moved to. A replica puts at most 64 meshes in a statement
    -- (broker/committer.go): Postgres's lock table is shared, sized for about 64 locks a
    -- connection.
    IF e_mesh[1] = ALL (e_mesh) THEN -- one mesh (nearly always): no query to sort them
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.route:' || e_mesh[1], 0));
    ELSE
        FOR v_mesh IN SELECT DISTINCT m COLLATE "C" FROM unnest(e_mesh) m ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.route:' || v_mesh, 0));
        END LOOP;
    END IF;
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
        v_orig := NULL; v_member := NULL; v_skey := NULL; v_pres := NULL; v_pnode := NULL; v_full := false;
        IF e_cmid[i] <> '' THEN
            SELECT o.id, o.request_fingerprint INTO v_orig, v_fp FROM claudemesh.envelope o
            WHERE o.mesh_id = v_mesh AND o.sender_member_id = e_sender[i] AND o.client_message_id = e_cmid[i]
              AND o.client_message_id <> ''
            LIMIT 1;
            IF v_orig IS NOT NULL THEN
                row_kind := 'x'; idx := i; queued := true; recipients := 0; delivery_id := NULL; presence_id := NULL;
                assigned := NULL; original := v_orig; fingerprint := v_fp;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        -- A member key first; else a session key of a live member. Then one connected session
        -- of that member (or that session) that may take it now, this node's first.
        -- The member, its session and whether its backlog is at the bound, in one read (00076).
        SELECT m.id, p.id, p.node_id, EXISTS (SELECT 1 FROM claudemesh.backlog f WHERE f.member_id = m.id AND f.at_bound)
        INTO v_member, v_pres, v_pnode, v_full
        FROM claudemesh.member m
        LEFT JOIN LATERAL (
            SELECT x.id, x.node_id FROM claudemesh.presence x
            WHERE x.mesh_id = v_mesh AND x.member_pubkey = v_key AND x.ended_at IS NULL
              AND x.member_id = m.id AND x.grace_until IS NULL AND (v_prio = 'now' OR x.status = 'idle')
            ORDER BY x.node_id = p_node DESC, x.connected_at DESC LIMIT 1) p ON true
        WHERE m.mesh_id = v_mesh AND m.pubkey = v_key AND m.revoked_at IS NULL LIMIT 1;
        IF v_member IS NULL THEN
            SELECT s.member_id INTO v_member FROM claudemesh.session_key s
            WHERE s.mesh_id = v_mesh AND s.session_pubkey = v_key LIMIT 1;
            IF v_member IS NOT NULL AND NOT EXISTS (
                    SELECT 1 FROM claudemesh.member sm WHERE sm.id = v_member AND sm.revoked_at IS NULL) THEN
                v_member := NULL;
            END IF;
            IF v_member IS NULL THEN
                row_kind := 'e'; idx := i; queued := false; recipients := 0; delivery_id := NULL; presence_id := NULL;
                assigned := NULL; original := NULL; fingerprint := NULL;
                RETURN NEXT;
                CONTINUE;
            END IF;
            v_skey := v_key;
            SELECT x.id, x.node_id INTO v_pres, v_pnode FROM claudemesh.presence x
            WHERE x.mesh_id = v_mesh AND x.session_pubkey = v_key AND x.ended_at IS NULL
              AND x.member_id = v_member AND x.grace_until IS NULL AND (v_prio = 'now' OR x.status = 'idle')
            ORDER BY x.node_id = p_node DESC, x.connected_at DESC LIMIT 1;
            v_full := EXISTS (SELECT 1 FROM claudemesh.backlog f WHERE f.member_id = v_member AND f.at_bound);
        END IF;
        -- Refused while the member's waiting messages are at the bound (claudemesh.backlog,
        -- kept by sweep_backlog) when it would wait: no session takes it now, or the one that
        -- would has had rows assigned for 5 s, behind its full window (00050).
        IF v_full AND (v_pres IS NULL OR EXISTS (SELECT 1 FROM claudemesh.delivery d WHERE d.pushed_presence = v_pres AND d.state = 'assigned'
                                                  AND d.pushed_at < now() - interval '5 seconds')) THEN
            row_kind := 'f'; idx := i; queued := false; recipients := 1; delivery_id := NULL; presence_id := NULL;
            assigned := NULL; original := NULL; fingerprint := NULL;
            RETURN NEXT;
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
            -- Tested apart: a condition with a subquery is run as a query each time.
            IF v_assign THEN
                n_node := n_node || v_pnode;
                n_line := n_line || v_line;
            ELSIF NOT EXISTS (SELECT 1 FROM unnest(n_node, n_line) AS n(node, line)
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
        row_kind := 'e'; idx := i; queued := true; recipients := 1; delivery_id := NULL; presence_id := NULL;
        assigned := NULL; original := NULL; fingerprint := NULL;
        RETURN NEXT;
        IF v_pres IS NOT NULL AND v_pnode = p_node THEN
            row_kind := 'd'; queued := NULL; recipients := NULL; delivery_id := v_did; presence_id := v_pres;
            assigned := v_assign;
            RETURN NEXT;
        END IF;
    END LOOP;
    IF cardinality(a_line) > 0 THEN
        v_n := claudemesh.notify_lines(p_ns || '_all', a_line);
    END IF;
    IF cardinality(n_line) > 0 AND n_node[1] = ALL (n_node) THEN -- one node: no query to group them
        v_n := claudemesh.notify_lines(p_ns || '_n_' || n_node[1], n_line);
    ELSIF cardinality(n_line) > 0 THEN
        -- One payload per node, its lines in batch order, as the set-based form packs them.
        PERFORM claudemesh.notify_lines(p_ns || '_n_' || n.node, array_agg(n.line ORDER BY n.ord))
        FROM unnest(n_node, n_line) WITH ORDINALITY AS n(node, line, ord)
        GROUP BY n.node;
    END IF;
END
$function$;
-- +goose StatementEnd

-- +goose Down
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
