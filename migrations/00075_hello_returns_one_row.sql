-- +goose Up
-- The hello returns one row, not a set, and finds the member by its live key. hello_batch called
-- it as a table function: a function scan and a tuple store for each hello's one row, and the
-- capabilities' conversion in a subquery of the call. It now assigns the hello's result, with
-- the capabilities converted in the batch's own query. The member: at most one live member has
-- a key in a mesh (member_live_pubkey), so the hello reads that one by the unique index, with no
-- sort, and looks for a revoked one only to tell 'revoked' from 'unauthorized'. Together 3-8 %
-- less time a batch of ten hellos (both versions interleaved in the same pgbench clients, 4
-- runs). hello's result type changes, so it is dropped and created again, with hello_batch in
-- the same transaction: replicas of the previous release call only hello_batch, whose signature
-- and rows are unchanged. And three things 00074's grouping had moved (a review):
-- - whether a revoked member had the key is read in the first read's snapshot, so a member
--   joining meanwhile is never told 'revoked';
-- - a hello with a session key probes for a move after the key's checks, which may wait for
--   another hello binding the same key, as before 00074;
-- - a presence read under the mesh's lock and ended before the hello's update (a close, a
--   grace sweep) makes a new presence, not a resume: no 'resumed', no close sent to its old
--   replica, and its join is told.
-- Capabilities that are not a JSON array fail their hello alone, as when the hello converted
-- them. The four shared locks on the hook signals' keys are taken before the revocation and
-- capacity checks since 00074, so a hello refused there holds them to its batch's commit, as
-- an accepted one does.
-- +goose StatementBegin
DROP FUNCTION claudemesh.hello(text, text, text, text, text, text, text, text, int, text, jsonb, text[], int, text, timestamptz, boolean, text, text, text, text, text);
-- +goose StatementEnd
-- +goose StatementBegin
CREATE FUNCTION claudemesh.hello(p_node text, p_ns text, p_mesh text, p_member_id text, p_pubkey text,
    p_session_id text, p_session_pubkey text, p_display_name text, p_pid int, p_cwd text, p_groups jsonb,
    p_caps text[], p_default_limit int, p_signature text, p_sig_expires timestamptz, p_local_live boolean,
    p_role text, p_hostname text, p_peer_type text, p_channel text, p_model text,
    OUT code text, OUT presence_id text, OUT status text, OUT epoch bigint, OUT old_node text, OUT resumed boolean,
    OUT display_name text, OUT max_sessions int, OUT member_id text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    mesh_live boolean;
    mesh_max int;
    mb_id text;
    mb_name text;
    was_member boolean;
    moving boolean;
    still boolean;
    lim int;
    live bigint;
    heard boolean; -- another member's live session in the mesh takes system events
    signals boolean;
    owner text;
    hook text;
    keyed record;
    gone text[];
    old_id text;
    old_node_id text;
    old_grace timestamptz;
    up_id text;
    up_status text;
    up_epoch bigint;
    name text;
BEGIN
    -- The mesh, the member by key alone, as the protocol has it (unauthorized: no live member
    -- with that mesh and pubkey; a plain hello's memberId is signed but names nothing the key
    -- does not, 00053), and whether the session is live on another replica (below): one read.
    -- The last is two probes, each by a whole index key led by the mesh, the rest tested on the
    -- row found: a test of the node in the scan's condition let the planner walk the index of
    -- every live session by node (00025).
    SELECT ms.archived_at IS NULL, ms.max_peers, mb.id, mb.display_name,
           -- No live member with this key: whether a revoked one has it (in this read's
           -- snapshot: a member joining meanwhile is not taken for a revoked one).
           CASE WHEN mb.id IS NULL THEN EXISTS (
               SELECT 1 FROM claudemesh.member m WHERE m.mesh_id = p_mesh AND m.pubkey = p_pubkey) END,
           -- A hello with a session key probes after the key's checks (below), which may wait
           -- for another hello binding the same key.
           mb.id IS NOT NULL AND p_session_pubkey = '' AND
               EXISTS (SELECT 1 FROM (SELECT x.node_id, x.grace_until FROM claudemesh.presence x
                                      WHERE x.mesh_id = p_mesh AND x.member_id = mb.id AND x.session_id = p_session_id
                                        AND x.ended_at IS NULL OFFSET 0) y
                       WHERE y.grace_until IS NULL AND y.node_id <> p_node)
    INTO mesh_live, mesh_max, mb_id, mb_name, was_member, moving
    FROM claudemesh.mesh ms
    LEFT JOIN claudemesh.member mb ON mb.mesh_id = ms.id AND mb.pubkey = p_pubkey AND mb.revoked_at IS NULL
    WHERE ms.id = p_mesh;
    IF FOUND AND mesh_live THEN
        lim := CASE WHEN mesh_max > 0 THEN mesh_max ELSE p_default_limit END;
        max_sessions := lim;
    ELSE
        code := 'unauthorized'; RETURN;
    END IF;
    IF mb_id IS NULL THEN
        code := CASE WHEN was_member THEN 'revoked' ELSE 'unauthorized' END;
        RETURN;
    ELSIF p_role = 'session' AND p_member_id <> '' AND p_member_id <> mb_id THEN
        code := 'parent_member_id_mismatch'; RETURN;
    END IF;
    member_id := mb_id;
    -- Accepted once cluster-wide: a captured hello replayed on any replica is refused.
    INSERT INTO claudemesh.seen_signature (signature, expires_at) VALUES (p_signature, p_sig_expires)
    ON CONFLICT (signature) DO NOTHING;
    IF NOT FOUND THEN
        code := 'hello_replayed'; RETURN;
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
            VALUES (p_mesh, p_session_pubkey, mb_id) ON CONFLICT (mesh_id, session_pubkey) DO NOTHING;
            SELECT k.member_id INTO owner FROM claudemesh.session_key k
            WHERE k.mesh_id = p_mesh AND k.session_pubkey = p_session_pubkey;
        END IF;
        IF owner <> mb_id THEN
            code := 'session_key_taken'; RETURN;
        END IF;
        -- The probe for a move, as the first read's for a plain hello, and by the key too.
        moving := EXISTS (SELECT 1 FROM (SELECT x.node_id, x.grace_until FROM claudemesh.presence x
                                         WHERE x.mesh_id = p_mesh AND x.member_id = mb_id AND x.session_id = p_session_id
                                           AND x.ended_at IS NULL OFFSET 0) y
                          WHERE y.grace_until IS NULL AND y.node_id <> p_node)
               OR EXISTS (SELECT 1 FROM (SELECT x.node_id, x.grace_until FROM claudemesh.presence x
                                         WHERE x.mesh_id = p_mesh AND x.session_pubkey = p_session_pubkey AND x.ended_at IS NULL
                                           AND x.member_id = mb_id OFFSET 0) y
                          WHERE y.grace_until IS NULL AND y.node_id <> p_node);
    END IF;
    -- A hello that moves a live session from another replica waits for the sends in flight
    -- that may have read it there (they hold this lock shared, see send_batch_capped), and
    -- holds the sends that come after until it commits, so that they read it here. Otherwise a
    -- send that read the session on its old replica and committed after this statement left its
    -- row assigned there: pushed by no one until the catch-up poll, seconds later and after
    -- messages sent after it (00072). Per mesh: sends wait only for a move in their own mesh,
    -- and hellos of other meshes not at all. Taken before the mesh's lock, as a hello batch
    -- takes its meshes' locks, in mesh order, and sends theirs: no cycle of waits. Decided
    -- before the mesh's lock (the first read above); a move that only the mesh's lock reveals
    -- (the session's other hello committing meanwhile on a third replica) takes it after, below.
    IF moving THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.route:' || p_mesh, 0));
    END IF;
    -- Hellos of one mesh (not of the cluster) serialize from here to the end of this
    -- statement, so neither the capacity check nor the reattach can be raced by a hello on
    -- another replica.
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
    -- A hook that fired before this hello (the first-turn race) applies now (below). The shared
    -- locks on the cwd (the member's, and unsigned hooks') make a hook that finds no session
    -- wait for this statement (hook_status), so it either sees this presence or leaves its
    -- signal where this hello's lookup, after them, sees it. And on the sessionId, which a hook
    -- finds its session by whatever cwd it names (00067).
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status:' || p_pubkey || ':' || p_cwd, 0));
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status::' || p_cwd, 0));
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status.session:' || p_pubkey || ':' || p_session_id, 0));
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status.session::' || p_session_id, 0));
    -- Under the locks, one read (00074): whether the member is still live (a ban or revoke
    -- takes the mesh's lock too: one that committed while this hello waited for it is seen
    -- here, not after the presence is registered); the mesh's other live sessions, and whether
    -- any of another member takes system events; whether a hook left a signal this session may
    -- take; and the session's own live presence.
    SELECT EXISTS (SELECT 1 FROM claudemesh.member m WHERE m.id = mb_id AND m.revoked_at IS NULL),
           c.live, c.heard,
           EXISTS (SELECT 1 FROM claudemesh.pending_status q
                   WHERE q.expires_at > now() AND (q.member_pubkey IS NULL OR q.member_pubkey = p_pubkey)
                     AND (q.session_id = p_session_id OR q.cwd = p_cwd)),
           o.id, o.node_id, o.grace_until
    INTO still, live, heard, signals, old_id, old_node_id, old_grace
    FROM (SELECT count(*) AS live,
                 coalesce(bool_or(x.member_id <> mb_id AND 'system_events' = ANY (x.capabilities)), false) AS heard
          FROM claudemesh.presence x
          WHERE x.mesh_id = p_mesh AND x.ended_at IS NULL
            AND NOT (x.session_id = p_session_id AND x.member_pubkey = p_pubkey)
            AND NOT (p_session_pubkey <> '' AND x.session_pubkey IS NOT DISTINCT FROM p_session_pubkey)) c
    LEFT JOIN claudemesh.presence o
      ON o.mesh_id = p_mesh AND o.member_id = mb_id AND o.session_id = p_session_id AND o.ended_at IS NULL;
    IF NOT still THEN
        code := 'revoked'; member_id := NULL; RETURN;
    END IF;
    IF live >= lim THEN
        code := 'capacity'; RETURN;
    END IF;
    IF signals THEN
        -- A signal is this session's by its sessionId, else by the pid and cwd it names
        -- (whatever sessionId it gave: meshctl's hook and peer name one process with two ids),
        -- else by cwd when it names no process at all (00053). A signal naming another pid or
        -- sessionId is another session's. The best-matching kind wins; its newest signal
        -- applies and its older ones go with it, so none of them comes back at the session's
        -- next hello. A hello refused above leaves them for the next.
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
    END IF;
    IF p_session_pubkey <> '' THEN
        -- Reattach by session key: the member's live presence with this key becomes this
        -- hello's, under its new sessionId.
        SELECT x.id, x.session_id INTO keyed FROM claudemesh.presence x
        WHERE x.mesh_id = p_mesh AND x.member_id = mb_id AND x.session_pubkey = p_session_pubkey AND x.ended_at IS NULL
        ORDER BY x.connected_at DESC LIMIT 1;
        IF keyed.id IS NOT NULL THEN
            WITH g AS (
                UPDATE claudemesh.presence x SET ended_at = now(), grace_until = NULL
                WHERE x.mesh_id = p_mesh AND x.member_id = mb_id AND x.ended_at IS NULL AND x.id <> keyed.id
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
                WHERE d.recipient_member_id = mb_id AND d.state IN ('pending', 'assigned', 'pushed')
                  AND d.recipient_session_id = keyed.session_id;
            END IF;
            -- The reattach changed which presence is this session's: read it again.
            SELECT x.id, x.node_id, x.grace_until INTO old_id, old_node_id, old_grace FROM claudemesh.presence x
            WHERE x.mesh_id = p_mesh AND x.member_id = mb_id AND x.session_id = p_session_id AND x.ended_at IS NULL;
        END IF;
    END IF;
    IF NOT moving AND old_node_id IS NOT NULL AND old_node_id <> p_node AND old_grace IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.route:' || p_mesh, 0));
    END IF;
    name := CASE WHEN p_display_name = '' THEN mb_name ELSE p_display_name END;
    IF old_id IS NOT NULL THEN
        -- The session's live presence, resumed or taken over. A close or sweep may have ended
        -- it since the read above (they take no mesh lock): then it is a new one, below.
        UPDATE claudemesh.presence x
        SET node_id = p_node, session_pubkey = nullif(p_session_pubkey, ''), display_name = name,
            pid = p_pid, cwd = p_cwd, groups = p_groups, capabilities = p_caps,
            role = p_role, hostname = p_hostname, peer_type = p_peer_type, channel = p_channel, model = p_model,
            last_seen_at = now(), grace_until = NULL, epoch = x.epoch + 1,
            status = CASE WHEN hook IS NOT NULL AND x.status <> 'dnd' THEN hook ELSE x.status END,
            status_source = CASE WHEN hook IS NOT NULL AND x.status <> 'dnd' THEN 'hook' ELSE x.status_source END,
            status_at = CASE WHEN hook IS NOT NULL AND x.status <> 'dnd' THEN now() ELSE x.status_at END
        WHERE x.id = old_id AND x.ended_at IS NULL
        RETURNING x.id, x.status, x.epoch INTO up_id, up_status, up_epoch;
    END IF;
    IF up_id IS NULL THEN
        -- A plain insert, no ON CONFLICT: only a hello makes a live presence, under the mesh's
        -- lock, and none is ever made live again, so with none read above there is none now.
        -- One read above and ended since is gone, and was told gone: this is a new presence,
        -- not a resume (its socket closed, its held messages released by whoever ended it).
        old_id := NULL; old_node_id := NULL; old_grace := NULL;
        INSERT INTO claudemesh.presence AS x (mesh_id, member_id, member_pubkey, node_id, session_id, session_pubkey,
            connected_at, display_name, pid, cwd, groups, capabilities, status, status_source, role, hostname,
            peer_type, channel, model)
        VALUES (p_mesh, mb_id, p_pubkey, p_node, p_session_id, nullif(p_session_pubkey, ''), clock_timestamp(), name,
            p_pid, p_cwd, p_groups, p_caps, coalesce(hook, 'idle'), CASE WHEN hook IS NULL THEN 'manual' ELSE 'hook' END,
            p_role, p_hostname, p_peer_type, p_channel, p_model)
        RETURNING x.id, x.status, x.epoch INTO up_id, up_status, up_epoch;
    END IF;
    code := '';
    presence_id := up_id;
    status := up_status;
    epoch := up_epoch;
    old_node := old_node_id;
    display_name := name;
    -- Resumed: the presence was in its grace, or its socket on this node is already gone.
    resumed := coalesce(old_grace IS NOT NULL, false) OR coalesce(old_node_id = p_node AND NOT p_local_live, false);
    IF old_id IS NOT NULL THEN
        -- Pushed to the old socket and never acked: pending again, for this one (at once, not
        -- when the old socket's close is recorded, which for a socket taken over is never).
        PERFORM claudemesh.release_held(p_ns, ARRAY[up_id]);
    END IF;
    IF old_node_id IS NOT NULL AND old_node_id <> p_node THEN
        -- The session was live on another replica: that one closes its socket.
        PERFORM claudemesh.notify_lines(p_ns || '_n_' || old_node_id,
            ARRAY[json_build_object('k', 'r', 'p', up_id, 'n', p_node)::text]);
    END IF;
    -- A new presence, not a resume or replacement: tell the mesh, when a session there listens
    -- (00073). Sessions that connect later are not told joins before theirs (the mesh's hello
    -- lock orders them: a listener's hello that committed first is counted above).
    IF old_id IS NULL AND heard THEN
        PERFORM claudemesh.notify_lines(p_ns || '_all', ARRAY[json_build_object('k', 'e', 'h', p_mesh, 'm', mb_id,
            'y', 'peer_joined', 'x', json_build_object('presenceId', up_id,
                'pubkey', coalesce(nullif(p_session_pubkey, ''), p_pubkey), 'displayName', name, 'status', up_status))::text]);
    END IF;
    -- The audit data is canonical JSON (keys sorted, no spaces), as broker/audit encodes it.
    -- The entry as claudemesh.audit_append records it, without its check that the mesh
    -- exists: this statement read the mesh at its start (meshes are never deleted).
    INSERT INTO claudemesh.audit_pending (mesh_id, event_type, actor, data, ts_micros)
    VALUES (p_mesh, 'peer_connected', p_pubkey,
        '{"node":' || to_json(p_node)::text || ',"presence_id":' || to_json(up_id::text)::text ||
            ',"resumed":' || resumed::text || ',"role":' || to_json(p_role)::text || '}',
        (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    RETURN;
END
$$;
-- +goose StatementEnd
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
    busy_mesh text; -- the mesh whose lock a hello of this batch could not get
    busy_failure text;
BEGIN
    FOR r IN
        SELECT u.*, u.ord::int AS i,
               CASE WHEN u.caps IS NULL OR jsonb_typeof(u.caps) = 'array'
                    THEN ARRAY(SELECT jsonb_array_elements_text(u.caps)) END AS cap_list
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
            -- Its mesh's lock was not to be had a moment ago: the rest of the mesh's hellos fail
            -- with it rather than wait a second each.
            code := 'failed'; presence_id := NULL; status := NULL; epoch := NULL; old_node := NULL;
            resumed := NULL; display_name := NULL; max_sessions := NULL; member_id := NULL;
            failure := busy_failure;
            RETURN NEXT;
            CONTINUE;
        END IF;
        BEGIN
            IF r.cap_list IS NULL THEN
                RAISE EXCEPTION 'capabilities are not a JSON array';
            END IF;
            h := claudemesh.hello(p_node, p_ns, r.mesh, r.member_id, r.pubkey, r.session_id,
                r.session_pubkey, r.display_name, r.pid, r.cwd, r.groups, r.cap_list, p_default_limit,
                r.signature, r.sig_expires, r.local_live, r.role, r.hostname, r.peer_type, r.channel, r.model);
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
-- The function of 00074 and the batch of 00035.
-- +goose StatementBegin
DROP FUNCTION claudemesh.hello(text, text, text, text, text, text, text, text, int, text, jsonb, text[], int, text, timestamptz, boolean, text, text, text, text, text);
-- +goose StatementEnd
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
    mesh_live boolean;
    mesh_max int;
    mb_id text;
    mb_revoked timestamptz;
    mb_name text;
    moving boolean;
    still boolean;
    lim int;
    live bigint;
    heard boolean; -- another member's live session in the mesh takes system events
    signals boolean;
    owner text;
    hook text;
    keyed record;
    gone text[];
    old_id text;
    old_node_id text;
    old_grace timestamptz;
    up_id text;
    up_status text;
    up_epoch bigint;
    name text;
BEGIN
    -- The mesh, the member by key alone, as the protocol has it (unauthorized: no live member
    -- with that mesh and pubkey; a plain hello's memberId is signed but names nothing the key
    -- does not, 00053), and whether the session is live on another replica (below): one read.
    -- The last is two probes, each by a whole index key led by the mesh, the rest tested on the
    -- row found: a test of the node in the scan's condition let the planner walk the index of
    -- every live session by node (00025).
    SELECT ms.archived_at IS NULL, ms.max_peers, mb.id, mb.revoked_at, mb.display_name,
           mb.id IS NOT NULL AND (
               EXISTS (SELECT 1 FROM (SELECT x.node_id, x.grace_until FROM claudemesh.presence x
                                      WHERE x.mesh_id = p_mesh AND x.member_id = mb.id AND x.session_id = p_session_id
                                        AND x.ended_at IS NULL OFFSET 0) y
                       WHERE y.grace_until IS NULL AND y.node_id <> p_node)
               OR (p_session_pubkey <> '' AND EXISTS (
                       SELECT 1 FROM (SELECT x.node_id, x.grace_until FROM claudemesh.presence x
                                      WHERE x.mesh_id = p_mesh AND x.session_pubkey = p_session_pubkey AND x.ended_at IS NULL
                                        AND x.member_id = mb.id OFFSET 0) y
                       WHERE y.grace_until IS NULL AND y.node_id <> p_node)))
    INTO mesh_live, mesh_max, mb_id, mb_revoked, mb_name, moving
    FROM claudemesh.mesh ms
    LEFT JOIN LATERAL (SELECT m.id, m.revoked_at, m.display_name FROM claudemesh.member m
                       WHERE m.mesh_id = ms.id AND m.pubkey = p_pubkey
                       ORDER BY m.revoked_at IS NULL DESC, m.created_at DESC LIMIT 1) mb ON true
    WHERE ms.id = p_mesh;
    IF FOUND AND mesh_live THEN
        lim := CASE WHEN mesh_max > 0 THEN mesh_max ELSE p_default_limit END;
        max_sessions := lim;
    ELSE
        code := 'unauthorized'; RETURN NEXT; RETURN;
    END IF;
    IF mb_id IS NULL THEN
        code := 'unauthorized'; RETURN NEXT; RETURN;
    ELSIF mb_revoked IS NOT NULL THEN
        code := 'revoked'; RETURN NEXT; RETURN;
    ELSIF p_role = 'session' AND p_member_id <> '' AND p_member_id <> mb_id THEN
        code := 'parent_member_id_mismatch'; RETURN NEXT; RETURN;
    END IF;
    member_id := mb_id;
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
            VALUES (p_mesh, p_session_pubkey, mb_id) ON CONFLICT (mesh_id, session_pubkey) DO NOTHING;
            SELECT k.member_id INTO owner FROM claudemesh.session_key k
            WHERE k.mesh_id = p_mesh AND k.session_pubkey = p_session_pubkey;
        END IF;
        IF owner <> mb_id THEN
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
    -- before the mesh's lock (the first read above); a move that only the mesh's lock reveals
    -- (the session's other hello committing meanwhile on a third replica) takes it after, below.
    IF moving THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.route:' || p_mesh, 0));
    END IF;
    -- Hellos of one mesh (not of the cluster) serialize from here to the end of this
    -- statement, so neither the capacity check nor the reattach can be raced by a hello on
    -- another replica.
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
    -- A hook that fired before this hello (the first-turn race) applies now (below). The shared
    -- locks on the cwd (the member's, and unsigned hooks') make a hook that finds no session
    -- wait for this statement (hook_status), so it either sees this presence or leaves its
    -- signal where this hello's lookup, after them, sees it. And on the sessionId, which a hook
    -- finds its session by whatever cwd it names (00067).
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status:' || p_pubkey || ':' || p_cwd, 0));
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status::' || p_cwd, 0));
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status.session:' || p_pubkey || ':' || p_session_id, 0));
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('claudemesh.pending_status.session::' || p_session_id, 0));
    -- Under the locks, one read (00074): whether the member is still live (a ban or revoke
    -- takes the mesh's lock too: one that committed while this hello waited for it is seen
    -- here, not after the presence is registered); the mesh's other live sessions, and whether
    -- any of another member takes system events; whether a hook left a signal this session may
    -- take; and the session's own live presence.
    SELECT EXISTS (SELECT 1 FROM claudemesh.member m WHERE m.id = mb_id AND m.revoked_at IS NULL),
           c.live, c.heard,
           EXISTS (SELECT 1 FROM claudemesh.pending_status q
                   WHERE q.expires_at > now() AND (q.member_pubkey IS NULL OR q.member_pubkey = p_pubkey)
                     AND (q.session_id = p_session_id OR q.cwd = p_cwd)),
           o.id, o.node_id, o.grace_until
    INTO still, live, heard, signals, old_id, old_node_id, old_grace
    FROM (SELECT count(*) AS live,
                 coalesce(bool_or(x.member_id <> mb_id AND 'system_events' = ANY (x.capabilities)), false) AS heard
          FROM claudemesh.presence x
          WHERE x.mesh_id = p_mesh AND x.ended_at IS NULL
            AND NOT (x.session_id = p_session_id AND x.member_pubkey = p_pubkey)
            AND NOT (p_session_pubkey <> '' AND x.session_pubkey IS NOT DISTINCT FROM p_session_pubkey)) c
    LEFT JOIN claudemesh.presence o
      ON o.mesh_id = p_mesh AND o.member_id = mb_id AND o.session_id = p_session_id AND o.ended_at IS NULL;
    IF NOT still THEN
        code := 'revoked'; member_id := NULL; RETURN NEXT; RETURN;
    END IF;
    IF live >= lim THEN
        code := 'capacity'; RETURN NEXT; RETURN;
    END IF;
    IF signals THEN
        -- A signal is this session's by its sessionId, else by the pid and cwd it names
        -- (whatever sessionId it gave: meshctl's hook and peer name one process with two ids),
        -- else by cwd when it names no process at all (00053). A signal naming another pid or
        -- sessionId is another session's. The best-matching kind wins; its newest signal
        -- applies and its older ones go with it, so none of them comes back at the session's
        -- next hello. A hello refused above leaves them for the next.
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
    END IF;
    IF p_session_pubkey <> '' THEN
        -- Reattach by session key: the member's live presence with this key becomes this
        -- hello's, under its new sessionId.
        SELECT x.id, x.session_id INTO keyed FROM claudemesh.presence x
        WHERE x.mesh_id = p_mesh AND x.member_id = mb_id AND x.session_pubkey = p_session_pubkey AND x.ended_at IS NULL
        ORDER BY x.connected_at DESC LIMIT 1;
        IF keyed.id IS NOT NULL THEN
            WITH g AS (
                UPDATE claudemesh.presence x SET ended_at = now(), grace_until = NULL
                WHERE x.mesh_id = p_mesh AND x.member_id = mb_id AND x.ended_at IS NULL AND x.id <> keyed.id
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
                WHERE d.recipient_member_id = mb_id AND d.state IN ('pending', 'assigned', 'pushed')
                  AND d.recipient_session_id = keyed.session_id;
            END IF;
            -- The reattach changed which presence is this session's: read it again.
            SELECT x.id, x.node_id, x.grace_until INTO old_id, old_node_id, old_grace FROM claudemesh.presence x
            WHERE x.mesh_id = p_mesh AND x.member_id = mb_id AND x.session_id = p_session_id AND x.ended_at IS NULL;
        END IF;
    END IF;
    IF NOT moving AND old_node_id IS NOT NULL AND old_node_id <> p_node AND old_grace IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.route:' || p_mesh, 0));
    END IF;
    name := CASE WHEN p_display_name = '' THEN mb_name ELSE p_display_name END;
    IF old_id IS NOT NULL THEN
        -- The session's live presence, resumed or taken over. A close or sweep may have ended
        -- it since the read above (they take no mesh lock): then it is a new one, below.
        UPDATE claudemesh.presence x
        SET node_id = p_node, session_pubkey = nullif(p_session_pubkey, ''), display_name = name,
            pid = p_pid, cwd = p_cwd, groups = p_groups, capabilities = p_caps,
            role = p_role, hostname = p_hostname, peer_type = p_peer_type, channel = p_channel, model = p_model,
            last_seen_at = now(), grace_until = NULL, epoch = x.epoch + 1,
            status = CASE WHEN hook IS NOT NULL AND x.status <> 'dnd' THEN hook ELSE x.status END,
            status_source = CASE WHEN hook IS NOT NULL AND x.status <> 'dnd' THEN 'hook' ELSE x.status_source END,
            status_at = CASE WHEN hook IS NOT NULL AND x.status <> 'dnd' THEN now() ELSE x.status_at END
        WHERE x.id = old_id AND x.ended_at IS NULL
        RETURNING x.id, x.status, x.epoch INTO up_id, up_status, up_epoch;
    END IF;
    IF up_id IS NULL THEN
        -- A plain insert, no ON CONFLICT: only a hello makes a live presence, under the mesh's
        -- lock, and none is ever made live again, so with none read above there is none now.
        INSERT INTO claudemesh.presence AS x (mesh_id, member_id, member_pubkey, node_id, session_id, session_pubkey,
            connected_at, display_name, pid, cwd, groups, capabilities, status, status_source, role, hostname,
            peer_type, channel, model)
        VALUES (p_mesh, mb_id, p_pubkey, p_node, p_session_id, nullif(p_session_pubkey, ''), clock_timestamp(), name,
            p_pid, p_cwd, p_groups, p_caps, coalesce(hook, 'idle'), CASE WHEN hook IS NULL THEN 'manual' ELSE 'hook' END,
            p_role, p_hostname, p_peer_type, p_channel, p_model)
        RETURNING x.id, x.status, x.epoch INTO up_id, up_status, up_epoch;
    END IF;
    code := '';
    presence_id := up_id;
    status := up_status;
    epoch := up_epoch;
    old_node := old_node_id;
    display_name := name;
    -- Resumed: the presence was in its grace, or its socket on this node is already gone.
    resumed := coalesce(old_grace IS NOT NULL, false) OR coalesce(old_node_id = p_node AND NOT p_local_live, false);
    IF old_id IS NOT NULL THEN
        -- Pushed to the old socket and never acked: pending again, for this one (at once, not
        -- when the old socket's close is recorded, which for a socket taken over is never).
        PERFORM claudemesh.release_held(p_ns, ARRAY[up_id]);
    END IF;
    IF old_node_id IS NOT NULL AND old_node_id <> p_node THEN
        -- The session was live on another replica: that one closes its socket.
        PERFORM claudemesh.notify_lines(p_ns || '_n_' || old_node_id,
            ARRAY[json_build_object('k', 'r', 'p', up_id, 'n', p_node)::text]);
    END IF;
    -- A new presence, not a resume or replacement: tell the mesh, when a session there listens
    -- (00073). Sessions that connect later are not told joins before theirs (the mesh's hello
    -- lock orders them: a listener's hello that committed first is counted above).
    IF old_id IS NULL AND heard THEN
        PERFORM claudemesh.notify_lines(p_ns || '_all', ARRAY[json_build_object('k', 'e', 'h', p_mesh, 'm', mb_id,
            'y', 'peer_joined', 'x', json_build_object('presenceId', up_id,
                'pubkey', coalesce(nullif(p_session_pubkey, ''), p_pubkey), 'displayName', name, 'status', up_status))::text]);
    END IF;
    -- The audit data is canonical JSON (keys sorted, no spaces), as broker/audit encodes it.
    -- The entry as claudemesh.audit_append records it, without its check that the mesh
    -- exists: this statement read the mesh at its start (meshes are never deleted).
    INSERT INTO claudemesh.audit_pending (mesh_id, event_type, actor, data, ts_micros)
    VALUES (p_mesh, 'peer_connected', p_pubkey,
        '{"node":' || to_json(p_node)::text || ',"presence_id":' || to_json(up_id::text)::text ||
            ',"resumed":' || resumed::text || ',"role":' || to_json(p_role)::text || '}',
        (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    RETURN NEXT;
END
$$;
-- +goose StatementEnd
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
    busy_mesh text; -- the mesh whose lock a hello of this batch could not get
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
            -- Its mesh's lock was not to be had a moment ago: the rest of the mesh's hellos fail
            -- with it rather than wait a second each.
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
