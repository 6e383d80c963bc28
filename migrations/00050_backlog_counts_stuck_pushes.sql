-- +goose Up
-- What waits for one member is bounded for a member that is connected but reads slowly, too.
-- Rows assigned to a live session go out as its push window frees; beyond the window they wait
-- in Postgres, assigned. 00046 counted none of them and never refused a send a session takes
-- at once, so a recipient that kept its socket alive while reading a frame every few seconds
-- (a stalled process, a dying link) let senders pile up rows without bound until the TTL.
--
-- Now backlog_count counts, as waiting, rows assigned to the member's live sessions more than
-- 5 s ago (what is on its way leaves in milliseconds; what is still assigned after 5 s waits
-- behind a full window). For a member at the bound, the send statements refuse what would wait
-- (as before) and also what would be assigned to a session that is stuck that way: a direct
-- send gets recipient_full, a multicast leaves that copy out. A session that reads keeps
-- getting what it takes at once, so a `now` message still reaches a member whose held messages
-- fill its bound.
--
-- Same names and signatures, replaced in place: the previous release's replicas read 'f' rows
-- already.
-- +goose StatementBegin
-- As 00046's, and waiting also counts what is assigned to the member's live sessions since
-- more than 5 s (up to p_limit): it waits behind a full push window.
CREATE OR REPLACE FUNCTION claudemesh.backlog_count(p_member text, p_mesh text, p_limit int)
 RETURNS TABLE(waiting int, upper int)
 LANGUAGE sql
 STABLE
AS $function$
    SELECT count(*) FILTER (WHERE
           (w.sk IS NULL AND w.sid IS NULL)
        OR (w.sk IS NOT NULL AND EXISTS (
            SELECT 1 FROM claudemesh.presence x
            WHERE x.mesh_id = w.mesh_id AND x.session_pubkey = w.sk AND x.ended_at IS NULL))
        OR (w.sk IS NOT NULL AND EXISTS (
            SELECT 1 FROM claudemesh.envelope e WHERE e.id = w.envelope_id AND lower(e.target_spec) = w.sk))
        OR (w.sk IS NULL AND w.sid IS NOT NULL AND EXISTS (
            SELECT 1 FROM claudemesh.presence x
            WHERE x.mesh_id = w.mesh_id AND x.member_id = p_member AND x.session_id = w.sid AND x.ended_at IS NULL)))::int
        + (SELECT count(*) FROM (
            SELECT 1 FROM claudemesh.presence x
            CROSS JOIN LATERAL (
                SELECT 1 FROM claudemesh.delivery d
                WHERE d.pushed_presence = x.id AND d.state = 'assigned' AND d.pushed_at < now() - interval '5 seconds'
                LIMIT p_limit) a
            WHERE x.mesh_id = p_mesh AND x.member_id = p_member AND x.ended_at IS NULL
            LIMIT p_limit) z)::int,
        count(*)::int + (SELECT count(*) FROM (
            SELECT 1 FROM claudemesh.presence x
            CROSS JOIN LATERAL (
                SELECT 1 FROM claudemesh.delivery d
                WHERE d.pushed_presence = x.id AND d.state = 'assigned' LIMIT p_limit) a
            WHERE x.mesh_id = p_mesh AND x.member_id = p_member AND x.ended_at IS NULL
            LIMIT p_limit) z)::int
    FROM (
        SELECT o.mesh_id, o.envelope_id, o.recipient_session_pubkey AS sk, o.recipient_session_id AS sid
        FROM claudemesh.delivery o
        WHERE o.recipient_member_id = p_member AND o.state IN ('pending', 'pushed')
        ORDER BY o.id DESC LIMIT 2 * p_limit::bigint) w
$function$;
-- +goose StatementEnd

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
CREATE OR REPLACE FUNCTION claudemesh.send_batch_set_capped(p_node text, p_ns text, e_ids text[], e_mesh text[], e_sender text[], e_sender_pub text[], e_sender_member_pub text[], e_spec text[], e_kind text[], e_key text[], e_prio text[], e_nonce text[], e_cipher text[], e_client text[], e_created timestamp with time zone[], e_expires timestamp with time zone[], e_cmid text[], e_fp text[], e_sender_name text[], e_frame text[])
 RETURNS TABLE(row_kind text, idx integer, queued boolean, recipients integer, delivery_id bigint, presence_id text, assigned boolean, original text, fingerprint text)
 LANGUAGE plpgsql
 SET enable_nestloop TO 'off'
 SET enable_seqscan TO 'off'
 SET jit TO 'off'
AS $function$
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
        SELECT e.i, e.mesh_id, e.prio, e.key, coalesce(m.id, k.member_id) AS member_id,
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
    ), candidates AS (
        -- A direct message goes to one connected session of its member that may take it now
        -- (this node's first), or waits; a multicast has one delivery per session.
        SELECT d.i, d.member_id, d.session_pubkey, NULL::text AS session_id, p.id AS presence_id, p.node_id,
               NULL::text AS grace_presence
        FROM direct d
        LEFT JOIN LATERAL (
            -- By both key columns of one index, a member's key or a session's: one branch runs.
            (SELECT x.id, x.node_id FROM claudemesh.presence x
             WHERE d.session_pubkey IS NULL AND x.mesh_id = d.mesh_id AND x.member_pubkey = d.key
               AND x.ended_at IS NULL AND x.member_id = d.member_id AND x.grace_until IS NULL
               AND (d.prio = 'now' OR x.status = 'idle')
             ORDER BY x.node_id = p_node DESC, x.connected_at DESC LIMIT 1)
            UNION ALL
            (SELECT x.id, x.node_id FROM claudemesh.presence x
             WHERE d.session_pubkey IS NOT NULL AND x.mesh_id = d.mesh_id AND x.session_pubkey = d.session_pubkey
               AND x.ended_at IS NULL AND x.member_id = d.member_id AND x.grace_until IS NULL
               AND (d.prio = 'now' OR x.status = 'idle')
             ORDER BY x.node_id = p_node DESC, x.connected_at DESC LIMIT 1)) p ON true
        UNION ALL
        -- Addressed to the session's key when it has one (which a reattach keeps), else to its
        -- sessionId.
        SELECT e.i, x.member_id, x.session_pubkey, CASE WHEN x.session_pubkey IS NULL THEN x.session_id END,
               CASE WHEN x.grace_until IS NULL AND (e.prio = 'now' OR x.status = 'idle') THEN x.id END, x.node_id,
               CASE WHEN x.grace_until IS NOT NULL THEN x.id END
        FROM env e CROSS JOIN LATERAL (
            -- The envelope's own mesh, probed per envelope. As a join (nested loops are off in
            -- this function) it was hashed: every live session of the cluster read per batch.
            SELECT x.* FROM claudemesh.presence x
            WHERE e.kind IN ('all', 'group') AND x.mesh_id = e.mesh_id AND x.ended_at IS NULL
              AND x.member_id <> e.sender
            OFFSET 0) x
        WHERE e.kind IN ('all', 'group')
          AND (e.kind = 'all' OR EXISTS (SELECT 1 FROM jsonb_array_elements(x.groups) g
                                         WHERE g->>'name' = e.key OR starts_with(g->>'name', e.key || '/')))
    ), refused AS MATERIALIZED (
        -- Rows that would wait (no session takes them now, or the one that would has had rows
        -- assigned for 5 s, behind its full window: 00050) for a member whose waiting messages
        -- are at the bound (claudemesh.backlog, kept by sweep_backlog) are not written: a
        -- direct send is refused, a multicast leaves that member out. Per envelope, how many.
        SELECT c.i, count(*)::int AS n FROM candidates c
        WHERE EXISTS (SELECT 1 FROM claudemesh.backlog f WHERE f.member_id = c.member_id AND f.at_bound)
          AND (c.presence_id IS NULL OR EXISTS (SELECT 1 FROM claudemesh.delivery d WHERE d.pushed_presence = c.presence_id
                                         AND d.state = 'assigned' AND d.pushed_at < now() - interval '5 seconds'))
        GROUP BY c.i
    ), picked AS (
        SELECT c.* FROM candidates c
        WHERE NOT (EXISTS (SELECT 1 FROM claudemesh.backlog f WHERE f.member_id = c.member_id AND f.at_bound)
                   AND (c.presence_id IS NULL OR EXISTS (SELECT 1 FROM claudemesh.delivery d WHERE d.pushed_presence = c.presence_id
                                         AND d.state = 'assigned' AND d.pushed_at < now() - interval '5 seconds')))
    ), r AS MATERIALIZED (
        -- Delivery ids are taken here, in batch order, so the rows below need no join back.
        SELECT nextval('claudemesh.delivery_id_seq') AS id, q.*
        FROM (SELECT pk.*, e.id AS env_id, e.kind, e.mesh_id, e.prio, e.expires, e.sender, e.sender_pub, e.sender_member_pub,
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
        SELECT claudemesh.notify_lines(p_ns || n.chan, array_agg(n.line ORDER BY n.ord)) AS sent
        FROM (
            -- Ids are uuids and priorities a fixed set: plain concatenation is valid JSON.
            SELECT '_n_' || r.node_id AS chan, r.id AS ord,
                '{"k":"w","p":"' || r.presence_id || '","i":' || r.id || ',"y":"' || r.prio || '","x":' || r.frame || '}' AS line
            FROM r WHERE r.assign AND r.node_id <> p_node
            UNION ALL
            SELECT DISTINCT ON (r.node_id, r.member_id) '_n_' || r.node_id, r.id, json_build_object('k', 'd', 'm', r.member_id)::text
            FROM r WHERE NOT r.assign AND r.presence_id IS NOT NULL AND r.node_id <> p_node
            UNION ALL
            -- Nobody took it: every replica looks for the member's sessions (a direct message,
            -- which any of them may take) or for the one session it is for (a multicast's row
            -- for a session in its grace, which a hello may be resuming), so one that registers
            -- while this statement runs is woken (see the migration's comment). A multicast's
            -- row for a session at work waits for its change of status, which releases it.
            SELECT DISTINCT ON (r.member_id, r.prio, r.grace_presence) '_all', r.id,
                '{"k":"d","m":"' || r.member_id || coalesce('","p":"' || r.grace_presence, '') || '","y":"' || r.prio || '"}'
            FROM r WHERE r.presence_id IS NULL AND (r.kind = 'direct' OR r.grace_presence IS NOT NULL)
        ) n
        GROUP BY n.chan
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
    SELECT 'x', p.i, true, 0, NULL, NULL, NULL, p.orig, p.fp FROM prior p, side
    UNION ALL
    SELECT 'f', f.i, false, f.n, NULL, NULL, NULL, NULL, NULL FROM refused f, side;
END
$function$;
-- +goose StatementEnd

-- +goose Down
-- 00046's bodies.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.backlog_count(p_member text, p_mesh text, p_limit int)
 RETURNS TABLE(waiting int, upper int)
 LANGUAGE sql
 STABLE
AS $function$
    SELECT count(*) FILTER (WHERE
           (w.sk IS NULL AND w.sid IS NULL)
        OR (w.sk IS NOT NULL AND EXISTS (
            SELECT 1 FROM claudemesh.presence x
            WHERE x.mesh_id = w.mesh_id AND x.session_pubkey = w.sk AND x.ended_at IS NULL))
        OR (w.sk IS NOT NULL AND EXISTS (
            SELECT 1 FROM claudemesh.envelope e WHERE e.id = w.envelope_id AND lower(e.target_spec) = w.sk))
        OR (w.sk IS NULL AND w.sid IS NOT NULL AND EXISTS (
            SELECT 1 FROM claudemesh.presence x
            WHERE x.mesh_id = w.mesh_id AND x.member_id = p_member AND x.session_id = w.sid AND x.ended_at IS NULL)))::int,
        count(*)::int + (SELECT count(*) FROM (
            SELECT 1 FROM claudemesh.presence x
            CROSS JOIN LATERAL (
                SELECT 1 FROM claudemesh.delivery d
                WHERE d.pushed_presence = x.id AND d.state = 'assigned' LIMIT p_limit) a
            WHERE x.mesh_id = p_mesh AND x.member_id = p_member AND x.ended_at IS NULL
            LIMIT p_limit) z)::int
    FROM (
        SELECT o.mesh_id, o.envelope_id, o.recipient_session_pubkey AS sk, o.recipient_session_id AS sid
        FROM claudemesh.delivery o
        WHERE o.recipient_member_id = p_member AND o.state IN ('pending', 'pushed')
        ORDER BY o.id DESC LIMIT 2 * p_limit::bigint) w
$function$;
-- +goose StatementEnd

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
        -- No session takes it now, so it would wait: refused while the member's waiting
        -- messages are at the bound (claudemesh.backlog, kept by sweep_backlog).
        IF v_pres IS NULL AND EXISTS (SELECT 1 FROM claudemesh.backlog f WHERE f.member_id = v_member AND f.at_bound) THEN
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
CREATE OR REPLACE FUNCTION claudemesh.send_batch_set_capped(p_node text, p_ns text, e_ids text[], e_mesh text[], e_sender text[], e_sender_pub text[], e_sender_member_pub text[], e_spec text[], e_kind text[], e_key text[], e_prio text[], e_nonce text[], e_cipher text[], e_client text[], e_created timestamp with time zone[], e_expires timestamp with time zone[], e_cmid text[], e_fp text[], e_sender_name text[], e_frame text[])
 RETURNS TABLE(row_kind text, idx integer, queued boolean, recipients integer, delivery_id bigint, presence_id text, assigned boolean, original text, fingerprint text)
 LANGUAGE plpgsql
 SET enable_nestloop TO 'off'
 SET enable_seqscan TO 'off'
 SET jit TO 'off'
AS $function$
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
        SELECT e.i, e.mesh_id, e.prio, e.key, coalesce(m.id, k.member_id) AS member_id,
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
    ), candidates AS (
        -- A direct message goes to one connected session of its member that may take it now
        -- (this node's first), or waits; a multicast has one delivery per session.
        SELECT d.i, d.member_id, d.session_pubkey, NULL::text AS session_id, p.id AS presence_id, p.node_id,
               NULL::text AS grace_presence
        FROM direct d
        LEFT JOIN LATERAL (
            -- By both key columns of one index, a member's key or a session's: one branch runs.
            (SELECT x.id, x.node_id FROM claudemesh.presence x
             WHERE d.session_pubkey IS NULL AND x.mesh_id = d.mesh_id AND x.member_pubkey = d.key
               AND x.ended_at IS NULL AND x.member_id = d.member_id AND x.grace_until IS NULL
               AND (d.prio = 'now' OR x.status = 'idle')
             ORDER BY x.node_id = p_node DESC, x.connected_at DESC LIMIT 1)
            UNION ALL
            (SELECT x.id, x.node_id FROM claudemesh.presence x
             WHERE d.session_pubkey IS NOT NULL AND x.mesh_id = d.mesh_id AND x.session_pubkey = d.session_pubkey
               AND x.ended_at IS NULL AND x.member_id = d.member_id AND x.grace_until IS NULL
               AND (d.prio = 'now' OR x.status = 'idle')
             ORDER BY x.node_id = p_node DESC, x.connected_at DESC LIMIT 1)) p ON true
        UNION ALL
        -- Addressed to the session's key when it has one (which a reattach keeps), else to its
        -- sessionId.
        SELECT e.i, x.member_id, x.session_pubkey, CASE WHEN x.session_pubkey IS NULL THEN x.session_id END,
               CASE WHEN x.grace_until IS NULL AND (e.prio = 'now' OR x.status = 'idle') THEN x.id END, x.node_id,
               CASE WHEN x.grace_until IS NOT NULL THEN x.id END
        FROM env e CROSS JOIN LATERAL (
            -- The envelope's own mesh, probed per envelope. As a join (nested loops are off in
            -- this function) it was hashed: every live session of the cluster read per batch.
            SELECT x.* FROM claudemesh.presence x
            WHERE e.kind IN ('all', 'group') AND x.mesh_id = e.mesh_id AND x.ended_at IS NULL
              AND x.member_id <> e.sender
            OFFSET 0) x
        WHERE e.kind IN ('all', 'group')
          AND (e.kind = 'all' OR EXISTS (SELECT 1 FROM jsonb_array_elements(x.groups) g
                                         WHERE g->>'name' = e.key OR starts_with(g->>'name', e.key || '/')))
    ), refused AS MATERIALIZED (
        -- Rows that would wait (no session takes them now) for a member whose waiting messages
        -- are at the bound (claudemesh.backlog, kept by sweep_backlog) are not written: a
        -- direct send is refused, a multicast leaves that member out. Per envelope, how many.
        SELECT c.i, count(*)::int AS n FROM candidates c
        WHERE c.presence_id IS NULL AND EXISTS (SELECT 1 FROM claudemesh.backlog f WHERE f.member_id = c.member_id AND f.at_bound)
        GROUP BY c.i
    ), picked AS (
        SELECT c.* FROM candidates c
        WHERE c.presence_id IS NOT NULL OR NOT EXISTS (SELECT 1 FROM claudemesh.backlog f WHERE f.member_id = c.member_id AND f.at_bound)
    ), r AS MATERIALIZED (
        -- Delivery ids are taken here, in batch order, so the rows below need no join back.
        SELECT nextval('claudemesh.delivery_id_seq') AS id, q.*
        FROM (SELECT pk.*, e.id AS env_id, e.kind, e.mesh_id, e.prio, e.expires, e.sender, e.sender_pub, e.sender_member_pub,
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
        SELECT claudemesh.notify_lines(p_ns || n.chan, array_agg(n.line ORDER BY n.ord)) AS sent
        FROM (
            -- Ids are uuids and priorities a fixed set: plain concatenation is valid JSON.
            SELECT '_n_' || r.node_id AS chan, r.id AS ord,
                '{"k":"w","p":"' || r.presence_id || '","i":' || r.id || ',"y":"' || r.prio || '","x":' || r.frame || '}' AS line
            FROM r WHERE r.assign AND r.node_id <> p_node
            UNION ALL
            SELECT DISTINCT ON (r.node_id, r.member_id) '_n_' || r.node_id, r.id, json_build_object('k', 'd', 'm', r.member_id)::text
            FROM r WHERE NOT r.assign AND r.presence_id IS NOT NULL AND r.node_id <> p_node
            UNION ALL
            -- Nobody took it: every replica looks for the member's sessions (a direct message,
            -- which any of them may take) or for the one session it is for (a multicast's row
            -- for a session in its grace, which a hello may be resuming), so one that registers
            -- while this statement runs is woken (see the migration's comment). A multicast's
            -- row for a session at work waits for its change of status, which releases it.
            SELECT DISTINCT ON (r.member_id, r.prio, r.grace_presence) '_all', r.id,
                '{"k":"d","m":"' || r.member_id || coalesce('","p":"' || r.grace_presence, '') || '","y":"' || r.prio || '"}'
            FROM r WHERE r.presence_id IS NULL AND (r.kind = 'direct' OR r.grace_presence IS NOT NULL)
        ) n
        GROUP BY n.chan
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
    SELECT 'x', p.i, true, 0, NULL, NULL, NULL, p.orig, p.fp FROM prior p, side
    UNION ALL
    SELECT 'f', f.i, false, f.n, NULL, NULL, NULL, NULL, NULL FROM refused f, side;
END
$function$;
-- +goose StatementEnd
