-- +goose Up
-- A batch's new sessions are registered by a handful of set-based statements instead of one
-- claudemesh.hello call (about fifteen statements, in a subtransaction) each. In a 10,000-
-- session connect on 2 cores, the per-hello path cost Postgres 1.2-1.3 ms a hello, most of it
-- the executor's start and end of each small statement; 64 presence rows inserted by one
-- statement cost 31 µs each against 78 µs inserted one at a time from PL/pgSQL.
--
-- The steps:
--  1. The meshes where some hello names an existing, unarchived mesh and a live member are
--     locked, all of them, in one statement, in the same ("C") order as before, with the same
--     1 s lock_timeout. Every later read of the function sees what hellos committed before.
--     If a lock is not to be had, nothing of the batch is decided here: every hello goes the
--     per-hello way below, which fails only the busy mesh's hellos (00035).
--  2. A mesh goes the per-hello way, all its hellos in order, when one of its hellos
--     resumes, replaces or reattaches a live session (a live presence of the mesh with its
--     sessionId or session key), takes a hook's waiting status (pending_status), or repeats
--     another hello of the batch (sessionId, session key or signature). Those are the cases
--     with more to do than an insert; in a storm of new sessions there are none.
--  3. Every other hello is decided by one statement, with the checks in the per-hello order
--     and the same refusals: membership (unauthorized, revoked, parent_member_id_mismatch),
--     the signature spent cluster-wide (hello_replayed), the session key's owner
--     (session_key_taken), then capacity, counted once per mesh and then in batch order.
--     It inserts the presences, their audit entries and one peer_joined line each, sent by
--     one notify_lines call. The membership is read after the locks, so the per-hello path's
--     second look at the member under the lock is not needed.
--     The statement and the notification run in one subtransaction. If anything in it fails,
--     or it cannot be sure (a session key bound by a transaction that committed after it
--     started, or a member added to a mesh between step 1 and step 3), it rolls back and its
--     hellos go the per-hello way too: the answer is never a guess.
-- The result rows are those of the per-hello path: the store reads them by idx.
--
-- The function's statements use generic plans (planned once per connection; step 3's custom
-- plan took longer to make than to run) and no JIT (a plan made with a high cost estimate was
-- compiled for 290 ms, to run for 1).
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.hello_batch(p_node text, p_ns text, p_default_limit int,
    h_mesh text[], h_member_id text[], h_pubkey text[], h_session_id text[], h_session_pubkey text[],
    h_display_name text[], h_pid int[], h_cwd text[], h_groups jsonb[], h_caps jsonb[], h_signature text[],
    h_sig_expires timestamptz[], h_local_live boolean[], h_role text[], h_hostname text[], h_peer_type text[],
    h_channel text[], h_model text[])
RETURNS TABLE (idx int, code text, presence_id text, status text, epoch bigint, old_node text, resumed boolean,
               display_name text, max_sessions int, member_id text, failure text)
LANGUAGE plpgsql SET lock_timeout = '1s' SET jit = off SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    r record;
    h record;
    busy_mesh text; -- the mesh whose lock a hello of this batch could not get
    busy_failure text;
    lockset text[];   -- step 1's meshes, in lock order
    slow text[];      -- step 2's meshes
    locked boolean := false;
    f_idx int[];      -- step 3's answers, one element per hello it decided
    f_code text[];
    f_presence text[];
    f_status text[];
    f_epoch bigint[];
    f_name text[];
    f_lim int[];
    f_member text[];
    f_lines text[];
    f_unsure boolean;
    -- claudemesh.hello_one_at_a_time = on (a session or database setting) turns steps 1-3 off:
    -- every hello goes the per-hello way, as before this migration. For tests that compare the
    -- two, and for an operator who suspects the set-based path.
    one_at_a_time boolean := coalesce(current_setting('claudemesh.hello_one_at_a_time', true), '') = 'on';
BEGIN
    -- Step 1.
    SELECT array_agg(DISTINCT u.m COLLATE "C" ORDER BY u.m COLLATE "C") INTO lockset
    FROM unnest(h_mesh, h_member_id, h_pubkey, h_role) AS u(m, mid, pk, rl)
    WHERE NOT one_at_a_time
      AND EXISTS (SELECT 1 FROM claudemesh.mesh ms WHERE ms.id = u.m AND ms.archived_at IS NULL)
      AND EXISTS (SELECT 1 FROM claudemesh.member mb
                  WHERE mb.mesh_id = u.m AND mb.pubkey = u.pk AND (u.rl = 'session' OR mb.id = u.mid)
                    AND mb.revoked_at IS NULL);
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || l.m, 0))
        FROM unnest(lockset) WITH ORDINALITY AS l(m, o) ORDER BY l.o;
        locked := NOT one_at_a_time;
    EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
        locked := false; -- released with the subtransaction; the per-hello path waits mesh by mesh
    END;

    IF locked THEN
        -- Step 2. Each probe is a lateral subquery with a LIMIT, so that it is one index probe a
        -- hello: as EXISTS in an OR, the planner may hash it, which reads every live presence.
        SELECT array_agg(DISTINCT s.m) INTO slow
        FROM (
            SELECT d.m FROM (
                SELECT v.m, v.spk, count(*) OVER (PARTITION BY v.m, v.sid) AS same_sid,
                       count(*) OVER (PARTITION BY v.m, v.spk) AS same_spk,
                       count(*) OVER (PARTITION BY v.sig) AS same_sig
                FROM unnest(h_mesh, h_session_id, h_session_pubkey, h_signature) AS v(m, sid, spk, sig)) d
            WHERE d.same_sid > 1 OR (d.spk <> '' AND d.same_spk > 1) OR d.same_sig > 1
            UNION ALL
            SELECT v.m FROM unnest(h_mesh, h_session_id) AS v(m, sid)
            CROSS JOIN LATERAL (SELECT 1 FROM claudemesh.presence x
                                WHERE x.session_id = v.sid AND x.mesh_id = v.m AND x.ended_at IS NULL LIMIT 1) e
            UNION ALL
            SELECT v.m FROM unnest(h_mesh, h_session_pubkey) AS v(m, spk)
            CROSS JOIN LATERAL (SELECT 1 FROM claudemesh.presence x
                                WHERE x.mesh_id = v.m AND x.session_pubkey = v.spk AND x.ended_at IS NULL LIMIT 1) e
            WHERE v.spk <> ''
            UNION ALL
            SELECT v.m FROM unnest(h_mesh, h_pubkey, h_session_id, h_pid, h_cwd) AS v(m, pk, sid, pid, cwd)
            CROSS JOIN LATERAL (SELECT 1 FROM claudemesh.pending_status q
                                WHERE q.expires_at > now() AND (q.member_pubkey IS NULL OR q.member_pubkey = v.pk)
                                  AND ((q.session_id IS NOT NULL AND q.session_id = v.sid)
                                       OR (q.session_id IS NULL AND q.pid IS NOT NULL AND q.pid = v.pid AND q.cwd = v.cwd)
                                       OR (q.session_id IS NULL AND q.pid IS NULL AND q.cwd = v.cwd))
                                LIMIT 1) e
        ) s;

        -- Step 3.
        BEGIN
            WITH h AS (
                SELECT u.*, u.ord::int AS i
                FROM unnest(h_mesh, h_member_id, h_pubkey, h_session_id, h_session_pubkey, h_display_name, h_pid,
                            h_cwd, h_groups, h_caps, h_signature, h_sig_expires, h_role, h_hostname, h_peer_type,
                            h_channel, h_model)
                    WITH ORDINALITY AS u(mesh, mid, pk, sid, spk, dname, pid, cwd, grp, caps, sig, sig_exp, rl,
                                         host, ptype, chan, mdl, ord)
                WHERE u.mesh <> ALL (coalesce(slow, '{}'))
            ), c AS (
                SELECT h.*, ms.id IS NOT NULL AS mesh_ok,
                       CASE WHEN ms.max_peers > 0 THEN ms.max_peers ELSE p_default_limit END AS lim,
                       mb.id AS mb_id, mb.revoked_at AS mb_revoked, mb.display_name AS mb_name
                FROM h
                LEFT JOIN claudemesh.mesh ms ON ms.id = h.mesh AND ms.archived_at IS NULL
                LEFT JOIN LATERAL (
                    SELECT m.id, m.revoked_at, m.display_name FROM claudemesh.member m
                    WHERE m.mesh_id = h.mesh AND m.pubkey = h.pk AND (h.rl = 'session' OR m.id = h.mid)
                    ORDER BY m.revoked_at IS NULL DESC, m.created_at DESC LIMIT 1) mb ON ms.id IS NOT NULL
            ), pre AS (
                SELECT c.*,
                       CASE WHEN NOT c.mesh_ok OR c.mb_id IS NULL THEN 'unauthorized'
                            WHEN c.mb_revoked IS NOT NULL THEN 'revoked'
                            WHEN c.rl = 'session' AND c.mid <> '' AND c.mid <> c.mb_id THEN 'parent_member_id_mismatch'
                       END AS refusal
                FROM c
            ), sig AS (
                -- Spent once cluster-wide, as in the per-hello path.
                INSERT INTO claudemesh.seen_signature (signature, expires_at)
                SELECT p.sig, p.sig_exp FROM pre p WHERE p.refusal IS NULL
                ON CONFLICT (signature) DO NOTHING
                RETURNING signature
            ), other AS (
                -- Never another member's own key.
                SELECT p.i, (SELECT m.id FROM claudemesh.member m
                             WHERE m.mesh_id = p.mesh AND m.pubkey = p.spk AND m.pubkey <> p.pk LIMIT 1) AS owner
                FROM pre p
                WHERE p.refusal IS NULL AND p.spk <> '' AND p.sig IN (SELECT s.signature FROM sig s)
            ), bound AS (
                -- Bound to the first member that uses it, forever.
                INSERT INTO claudemesh.session_key (mesh_id, session_pubkey, member_id)
                SELECT p.mesh, p.spk, p.mb_id FROM pre p JOIN other o ON o.i = p.i WHERE o.owner IS NULL
                ON CONFLICT (mesh_id, session_pubkey) DO NOTHING
                RETURNING mesh_id, session_pubkey, member_id
            ), k AS (
                SELECT p.*, s.signature IS NOT NULL AS sig_ok,
                       CASE WHEN p.spk = '' THEN p.mb_id
                            ELSE coalesce(o.owner, b.member_id,
                                 (SELECT x.member_id FROM claudemesh.session_key x
                                  WHERE x.mesh_id = p.mesh AND x.session_pubkey = p.spk))
                       END AS owner
                FROM pre p
                LEFT JOIN sig s ON s.signature = p.sig AND p.refusal IS NULL
                LEFT JOIN other o ON o.i = p.i
                LEFT JOIN bound b ON b.mesh_id = p.mesh AND b.session_pubkey = p.spk
            ), ok AS (
                SELECT k.*,
                       CASE WHEN k.refusal IS NOT NULL THEN k.refusal
                            WHEN NOT k.sig_ok THEN 'hello_replayed'
                            WHEN k.owner <> k.mb_id THEN 'session_key_taken'
                       END AS code0
                FROM k
            ), live AS (
                SELECT x.mesh_id, count(*) AS n FROM claudemesh.presence x
                WHERE x.ended_at IS NULL AND x.mesh_id IN (SELECT o.mesh FROM ok o WHERE o.code0 IS NULL)
                GROUP BY x.mesh_id
            ), ranked AS (
                SELECT o.i, row_number() OVER (PARTITION BY o.mesh ORDER BY o.i) AS rk
                FROM ok o WHERE o.code0 IS NULL
            ), fin AS (
                SELECT o.*,
                       coalesce(o.code0, CASE WHEN coalesce(l.n, 0) + rk.rk - 1 >= o.lim THEN 'capacity' ELSE '' END) AS code1,
                       CASE WHEN o.dname = '' THEN o.mb_name ELSE o.dname END AS name,
                       o.code0 IS NULL AND (o.owner IS NULL OR NOT (o.mesh = ANY (coalesce(lockset, '{}')))) AS unsure
                FROM ok o LEFT JOIN ranked rk ON rk.i = o.i LEFT JOIN live l ON l.mesh_id = o.mesh
            ), ins AS (
                INSERT INTO claudemesh.presence AS x (mesh_id, member_id, member_pubkey, node_id, session_id,
                    session_pubkey, display_name, pid, cwd, groups, capabilities, status, status_source, role,
                    hostname, peer_type, channel, model)
                SELECT f.mesh, f.mb_id, f.pk, p_node, f.sid, nullif(f.spk, ''), f.name, f.pid, f.cwd, f.grp,
                    ARRAY(SELECT jsonb_array_elements_text(f.caps)), 'idle', 'manual', f.rl, f.host, f.ptype,
                    f.chan, f.mdl
                FROM fin f WHERE f.code1 = '' AND NOT f.unsure ORDER BY f.i
                RETURNING x.id, x.mesh_id, x.member_id, x.session_id, x.status, x.epoch
            ), res AS (
                SELECT f.*, n.id AS new_id, n.status AS new_status, n.epoch AS new_epoch
                FROM fin f LEFT JOIN ins n ON n.mesh_id = f.mesh AND n.member_id = f.mb_id AND n.session_id = f.sid
                                           AND f.code1 = ''
            ), aud AS (
                -- As the per-hello path writes it: canonical JSON, as broker/audit encodes it.
                INSERT INTO claudemesh.audit_pending (mesh_id, event_type, actor, data, ts_micros)
                SELECT r.mesh, 'peer_connected', r.pk,
                    '{"node":' || to_json(p_node)::text || ',"presence_id":' || to_json(r.new_id)::text ||
                        ',"resumed":false,"role":' || to_json(r.rl)::text || '}',
                    (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
                FROM res r WHERE r.new_id IS NOT NULL ORDER BY r.i
            )
            SELECT array_agg(r.i ORDER BY r.i), array_agg(r.code1 ORDER BY r.i), array_agg(r.new_id ORDER BY r.i),
                   array_agg(r.new_status ORDER BY r.i), array_agg(r.new_epoch ORDER BY r.i),
                   array_agg(CASE WHEN r.new_id IS NOT NULL THEN r.name END ORDER BY r.i),
                   array_agg(CASE WHEN r.mesh_ok THEN r.lim END ORDER BY r.i),
                   array_agg(CASE WHEN r.code1 IN ('', 'hello_replayed', 'session_key_taken', 'capacity')
                                  THEN r.mb_id END ORDER BY r.i),
                   array_agg(json_build_object('k', 'e', 'h', r.mesh, 'm', r.mb_id, 'y', 'peer_joined',
                       'x', json_build_object('presenceId', r.new_id, 'pubkey', coalesce(nullif(r.spk, ''), r.pk),
                           'displayName', r.name, 'status', r.new_status))::text ORDER BY r.i)
                       FILTER (WHERE r.new_id IS NOT NULL),
                   coalesce(bool_or(r.unsure OR (r.code1 = '' AND r.new_id IS NULL)), false)
            INTO f_idx, f_code, f_presence, f_status, f_epoch, f_name, f_lim, f_member, f_lines, f_unsure
            FROM res r;
            IF f_unsure THEN
                RAISE EXCEPTION 'hello_batch: a hello needs the per-hello path';
            END IF;
            PERFORM claudemesh.notify_lines(p_ns || '_all', f_lines);
        EXCEPTION WHEN OTHERS THEN
            f_idx := NULL; -- rolled back: every hello goes the per-hello way
        END;
    END IF;

    IF f_idx IS NOT NULL THEN -- (the other arrays may hold a rolled-back attempt's values)
        RETURN QUERY
            SELECT f.i, f.c, f.p, f.s, f.e, NULL::text, CASE WHEN f.p IS NOT NULL THEN false END, f.n, f.l, f.mb,
                   NULL::text
            FROM unnest(f_idx, f_code, f_presence, f_status, f_epoch, f_name, f_lim, f_member)
                AS f(i, c, p, s, e, n, l, mb);
    END IF;

    -- The per-hello path (00035's loop), for the hellos step 3 did not decide.
    FOR r IN
        SELECT u.*, u.ord::int AS i
        FROM unnest(h_mesh, h_member_id, h_pubkey, h_session_id, h_session_pubkey, h_display_name, h_pid, h_cwd,
                    h_groups, h_caps, h_signature, h_sig_expires, h_local_live, h_role, h_hostname, h_peer_type,
                    h_channel, h_model)
            WITH ORDINALITY AS u(mesh, member_id, pubkey, session_id, session_pubkey, display_name, pid, cwd, groups, caps,
                                 signature, sig_expires, local_live, role, hostname, peer_type, channel, model, ord)
        WHERE NOT (u.ord::int = ANY (coalesce(f_idx, '{}')))
        ORDER BY u.mesh COLLATE "C", u.ord
    LOOP
        idx := r.i;
        failure := NULL;
        IF r.mesh = busy_mesh THEN
            code := 'failed'; presence_id := NULL; status := NULL; epoch := NULL; old_node := NULL;
            resumed := NULL; display_name := NULL; max_sessions := NULL; member_id := NULL;
            failure := busy_failure;
            RETURN NEXT;
            CONTINUE;
        END IF;
        BEGIN
            SELECT * INTO h FROM claudemesh.hello(p_node, p_ns, r.mesh, r.member_id, r.pubkey, r.session_id,
                r.session_pubkey, r.display_name, r.pid, r.cwd, r.groups,
                ARRAY(SELECT jsonb_array_elements_text(r.caps)), p_default_limit, r.signature, r.sig_expires,
                r.local_live, r.role, r.hostname, r.peer_type, r.channel, r.model);
            code := h.code; presence_id := h.presence_id; status := h.status; epoch := h.epoch;
            old_node := h.old_node; resumed := h.resumed; display_name := h.display_name;
            max_sessions := h.max_sessions; member_id := h.member_id;
        EXCEPTION WHEN OTHERS THEN
            code := 'failed'; presence_id := NULL; status := NULL; epoch := NULL; old_node := NULL;
            resumed := NULL; display_name := NULL; max_sessions := NULL; member_id := NULL;
            failure := SQLSTATE || ': ' || SQLERRM;
            IF SQLSTATE IN ('55P03', '40P01') THEN -- lock_not_available, deadlock_detected
                busy_mesh := r.mesh; busy_failure := failure;
            END IF;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;
-- +goose StatementEnd

-- +goose Down
-- 00035's body.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.hello_batch(p_node text, p_ns text, p_default_limit int,
    h_mesh text[], h_member_id text[], h_pubkey text[], h_session_id text[], h_session_pubkey text[],
    h_display_name text[], h_pid int[], h_cwd text[], h_groups jsonb[], h_caps jsonb[], h_signature text[],
    h_sig_expires timestamptz[], h_local_live boolean[], h_role text[], h_hostname text[], h_peer_type text[],
    h_channel text[], h_model text[])
RETURNS TABLE (idx int, code text, presence_id text, status text, epoch bigint, old_node text, resumed boolean,
               display_name text, max_sessions int, member_id text, failure text)
LANGUAGE plpgsql SET lock_timeout = '1s' AS $$
#variable_conflict use_column
DECLARE
    r record;
    h record;
    busy_mesh text;
    busy_failure text;
BEGIN
    FOR r IN
        SELECT u.*, u.ord::int AS i
        FROM unnest(h_mesh, h_member_id, h_pubkey, h_session_id, h_session_pubkey, h_display_name, h_pid, h_cwd,
                    h_groups, h_caps, h_signature, h_sig_expires, h_local_live, h_role, h_hostname, h_peer_type,
                    h_channel, h_model)
            WITH ORDINALITY AS u(mesh, member_id, pubkey, session_id, session_pubkey, display_name, pid, cwd, groups, caps,
                                 signature, sig_expires, local_live, role, hostname, peer_type, channel, model, ord)
        ORDER BY u.mesh COLLATE "C", u.ord
    LOOP
        idx := r.i;
        failure := NULL;
        IF r.mesh = busy_mesh THEN
            code := 'failed'; presence_id := NULL; status := NULL; epoch := NULL; old_node := NULL;
            resumed := NULL; display_name := NULL; max_sessions := NULL; member_id := NULL;
            failure := busy_failure;
            RETURN NEXT;
            CONTINUE;
        END IF;
        BEGIN
            SELECT * INTO h FROM claudemesh.hello(p_node, p_ns, r.mesh, r.member_id, r.pubkey, r.session_id,
                r.session_pubkey, r.display_name, r.pid, r.cwd, r.groups,
                ARRAY(SELECT jsonb_array_elements_text(r.caps)), p_default_limit, r.signature, r.sig_expires,
                r.local_live, r.role, r.hostname, r.peer_type, r.channel, r.model);
            code := h.code; presence_id := h.presence_id; status := h.status; epoch := h.epoch;
            old_node := h.old_node; resumed := h.resumed; display_name := h.display_name;
            max_sessions := h.max_sessions; member_id := h.member_id;
        EXCEPTION WHEN OTHERS THEN
            code := 'failed'; presence_id := NULL; status := NULL; epoch := NULL; old_node := NULL;
            resumed := NULL; display_name := NULL; max_sessions := NULL; member_id := NULL;
            failure := SQLSTATE || ': ' || SQLERRM;
            IF SQLSTATE IN ('55P03', '40P01') THEN -- lock_not_available, deadlock_detected
                busy_mesh := r.mesh; busy_failure := failure;
            END IF;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;
-- +goose StatementEnd
