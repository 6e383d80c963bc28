-- +goose Up
-- A small batch of direct envelopes runs as a handful of single-row statements per envelope
-- instead of the set-based statement. Under trickling traffic most batches hold one to a few
-- envelopes (1.6 on average at 1,000 msgs/s over three replicas), and for those the set-based
-- statement's cost is its plan's executor start-up (a few dozen nodes, every CTE, sort and hash):
-- for one envelope 0.85 ms per call against 0.5 ms here (pgbench, one client, commit
-- included); the two cost the same at about four envelopes (0.14 ms per further envelope
-- here, 0.09 there). Larger batches and multicasts keep the set-based statement, renamed
-- send_batch_set, whose results are unchanged; called from here, it runs under this
-- function's settings, so its plan is generic from the first call (as 00010 meant it to be).
-- Callers send a client_message_id at most once per batch (the committer folds repeats before
-- the statement): within one batch the set-based form would refuse a repeat (unique index),
-- while these statements would answer it as a retry of the first.
--
-- The statements below are index probes by both key columns (a member's key, or a session's),
-- so a plan cached while the tables were small cannot be a walk over every session of the
-- mesh. Results match the set-based form row for row: 'x' for a retry of a stored
-- client_message_id, 'e' for the envelope, 'd' for a delivery to a session on this node; the
-- other node is told in the same payload format; the audit entry is the same canonical JSON.
-- +goose StatementBegin
DO $$ BEGIN
    ALTER FUNCTION claudemesh.send_batch(text, text, text[], text[], text[], text[], text[], text[], text[],
        text[], text[], text[], text[], text[], timestamptz[], timestamptz[], text[], text[], text[], text[])
        RENAME TO send_batch_set;
END $$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.send_batch(p_node text, p_ns text,
    e_ids text[], e_mesh text[], e_sender text[], e_sender_pub text[], e_sender_member_pub text[],
    e_spec text[], e_kind text[], e_key text[], e_prio text[], e_nonce text[], e_cipher text[],
    e_client text[], e_created timestamptz[], e_expires timestamptz[],
    e_cmid text[], e_fp text[], e_sender_name text[], e_frame text[])
RETURNS TABLE (row_kind text, idx int, queued boolean, recipients int, delivery_id bigint, presence_id text,
               assigned boolean, original text, fingerprint text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off AS $fn$
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
BEGIN
    IF cardinality(e_ids) > 4 OR NOT (e_kind <@ ARRAY['direct']) THEN
        RETURN QUERY SELECT * FROM claudemesh.send_batch_set(p_node, p_ns, e_ids, e_mesh, e_sender, e_sender_pub,
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
        IF v_pres IS NOT NULL AND v_pnode <> p_node THEN
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
    IF cardinality(n_line) > 0 THEN
        -- One payload per node, its lines in batch order, as the set-based form packs them.
        PERFORM claudemesh.notify_lines(p_ns || '_n_' || n.node, array_agg(n.line ORDER BY n.ord))
        FROM unnest(n_node, n_line) WITH ORDINALITY AS n(node, line, ord)
        GROUP BY n.node;
    END IF;
END
$fn$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP FUNCTION claudemesh.send_batch(text, text, text[], text[], text[], text[], text[], text[], text[],
    text[], text[], text[], text[], text[], timestamptz[], timestamptz[], text[], text[], text[], text[]);
-- +goose StatementEnd
-- +goose StatementBegin
DO $$ BEGIN
    ALTER FUNCTION claudemesh.send_batch_set(text, text, text[], text[], text[], text[], text[], text[], text[],
        text[], text[], text[], text[], text[], timestamptz[], timestamptz[], text[], text[], text[], text[])
        RENAME TO send_batch;
END $$;
-- +goose StatementEnd
