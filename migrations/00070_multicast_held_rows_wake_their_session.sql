-- +goose Up
-- A multicast (broadcast or group) "next" or "low" message for a session at work left its row
-- pending and told no replica: the session's change to idle releases it. A change committing
-- while the send ran may not see the row (its release reads before the send commits, the send
-- read the session as at work), so the row waited for the catch-up poll, and a later message
-- to the session, finding it idle, reached it first. Now the session's replica gets a wake-up
-- naming the session and the priority, as a direct send's row that waits gets one: a replica
-- that skipped it (the session at work, as it knew it) claims for the session when the change's
-- notice arrives after it (broker/router.go, KindStatus).
-- Same signature and result: the replicas call it unchanged.
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
               NULL::text AS grace_presence, NULL::text AS held_presence
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
               CASE WHEN x.grace_until IS NOT NULL THEN x.id END,
               CASE WHEN x.grace_until IS NULL AND NOT (e.prio = 'now' OR x.status = 'idle') THEN x.id END
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
            UNION ALL
            -- A multicast's row for a session at work (00070): its change of status releases it,
            -- unless that change committed while this statement ran and its release did not see
            -- the row. The session's replica (this one too) is told, and claims for it when the
            -- change's notice comes after this one. Once per session.
            SELECT DISTINCT ON (r.node_id, r.held_presence) '_n_' || r.node_id, r.id,
                '{"k":"d","m":"' || r.member_id || '","p":"' || r.held_presence || '","y":"' || r.prio || '"}'
            FROM r WHERE r.held_presence IS NOT NULL
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
