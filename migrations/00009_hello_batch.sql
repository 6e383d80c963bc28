-- +goose Up
-- Hellos commit in groups, as sends do: the hellos a replica has waiting go to Postgres in one
-- statement, so a storm costs a few round trips instead of one wave of statements per pool's
-- worth of hellos. Each is registered by claudemesh.hello (00007) in its own subtransaction,
-- so one that fails (an error, not a refusal) fails alone. They go in mesh order: the per-mesh
-- locks each takes (the capacity lock, the audit-chain head) are then taken in one order by
-- every batch and never deadlock; they are held until the batch commits, which is why the
-- caller keeps batches small.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.hello_batch(p_node text, p_ns text, p_default_limit int,
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

-- +goose Down
DROP FUNCTION claudemesh.hello_batch;
