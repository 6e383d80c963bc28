-- +goose Up
-- A hello waits at most a second for a lock. Past it, the hello fails (lock_not_available, or
-- deadlock_detected for a deadlock's victim, caught by its own subtransaction), the other
-- hellos of its mesh in the same statement fail at once with it, and the replica refuses them
-- as overloaded, which clients retry. The locks a hello takes (its mesh's advisory lock, its
-- presence row) are normally held for a statement's server time by another replica's hello
-- batch, a ban, or a session's end: milliseconds. A replica runs one hello statement at a
-- time (HELLO_CONCURRENCY 1 since 2026-12-01): without a bound, one hello behind a lock held
-- longer held up every hello of its replica until the statement's 5 s timeout, then failed its
-- whole batch; the hellos queued behind it past 3 s were refused too. Hellos of one mesh are
-- consecutive in a batch (mesh order), so a storm into a blocked mesh costs one second, not
-- one a hello. The setting applies inside the function only: the commit's wait for the
-- notification queue, after it returns, is not bounded by it.
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

-- +goose Down
-- 00009's body, without the setting.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.hello_batch(p_node text, p_ns text, p_default_limit int,
    h_mesh text[], h_member_id text[], h_pubkey text[], h_session_id text[], h_session_pubkey text[],
    h_display_name text[], h_pid int[], h_cwd text[], h_groups jsonb[], h_caps jsonb[], h_signature text[],
    h_sig_expires timestamptz[], h_local_live boolean[], h_role text[], h_hostname text[], h_peer_type text[],
    h_channel text[], h_model text[])
RETURNS TABLE (idx int, code text, presence_id text, status text, epoch bigint, old_node text, resumed boolean,
               display_name text, max_sessions int, member_id text, failure text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r record;
    h record;
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
        END;
        RETURN NEXT;
    END LOOP;
END
$$;
-- +goose StatementEnd
