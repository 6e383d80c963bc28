-- +goose Up
-- unban by display name matches each banned key by the name of its latest revocation, the name
-- list_bans shows. It matched every revoked row, so a key an admin had banned under one name,
-- added again by the operator under another and revoked by the operator (a compromised key),
-- was let back in by an admin's unban of the old name: that lifted the old row, and a hello
-- takes a live row first. A key still names its latest revocation. Same signature, replaced in
-- place: the previous release's replicas get the same codes.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.unban(p_mesh text, p_caller_member text, p_actor text, p_target text)
RETURNS TABLE (code text, name text) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    mb claudemesh.member;
    owner_key text;
    by_owner boolean;
    n bigint;
BEGIN
    -- The caller's rights are read under the mesh's lock (see ban).
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO mb FROM claudemesh.member m
    WHERE m.mesh_id = p_mesh AND m.revoked_at IS NOT NULL AND m.pubkey = t
      AND NOT EXISTS (SELECT 1 FROM claudemesh.member l WHERE l.mesh_id = p_mesh AND l.pubkey = m.pubkey AND l.revoked_at IS NULL)
    ORDER BY m.revoked_at DESC LIMIT 1;
    IF NOT FOUND THEN
        -- A name must name one banned key (one key's several revoked rows are one member), by
        -- the name of its latest revocation, as list_bans shows it: an older row's name would
        -- lift that row while the key's latest revocation (the operator's, say) stands (00068).
        SELECT count(DISTINCT m.pubkey) INTO n FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.revoked_at IS NOT NULL AND m.display_name = p_target
          AND NOT EXISTS (SELECT 1 FROM claudemesh.member l WHERE l.mesh_id = p_mesh AND l.pubkey = m.pubkey AND l.revoked_at IS NULL)
          AND NOT EXISTS (SELECT 1 FROM claudemesh.member r WHERE r.mesh_id = p_mesh AND r.pubkey = m.pubkey
                          AND r.revoked_at > m.revoked_at);
        IF n > 1 THEN
            code := 'ambiguous'; RETURN NEXT; RETURN;
        END IF;
        SELECT * INTO mb FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.revoked_at IS NOT NULL AND m.display_name = p_target
          AND NOT EXISTS (SELECT 1 FROM claudemesh.member l WHERE l.mesh_id = p_mesh AND l.pubkey = m.pubkey AND l.revoked_at IS NULL)
          AND NOT EXISTS (SELECT 1 FROM claudemesh.member r WHERE r.mesh_id = p_mesh AND r.pubkey = m.pubkey
                          AND r.revoked_at > m.revoked_at)
        ORDER BY m.revoked_at DESC LIMIT 1;
    END IF;
    IF NOT FOUND THEN
        code := 'not_found'; RETURN NEXT; RETURN;
    END IF;
    -- An admin undoes only what an admin did: not the owner's ban, not the ban of an admin,
    -- and never the operator's revocation (a compromised key, say), which only the operator
    -- lifts (by adding the member again).
    SELECT ms.owner_pubkey INTO owner_key FROM claudemesh.mesh ms WHERE ms.id = p_mesh;
    by_owner := EXISTS (SELECT 1 FROM claudemesh.member c WHERE c.id = p_caller_member AND c.pubkey = owner_key);
    IF mb.revoked_by = 'operator' OR (NOT by_owner AND (mb.revoked_by = 'owner' OR mb.role = 'admin')) THEN
        code := 'protected'; RETURN NEXT; RETURN;
    END IF;
    UPDATE claudemesh.member m SET revoked_at = NULL, revoked_by = NULL WHERE m.id = mb.id;
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['member_unbanned'], ARRAY[p_actor],
        ARRAY['{"member_id":' || to_json(mb.id)::text || ',"pubkey":' || to_json(mb.pubkey)::text || '}'],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    code := '';
    name := mb.display_name;
    RETURN NEXT;
END
$$;
-- +goose StatementEnd

-- +goose Down
-- 00064's unban.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.unban(p_mesh text, p_caller_member text, p_actor text, p_target text)
RETURNS TABLE (code text, name text) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    mb claudemesh.member;
    owner_key text;
    by_owner boolean;
    n bigint;
BEGIN
    -- The caller's rights are read under the mesh's lock (see ban).
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO mb FROM claudemesh.member m
    WHERE m.mesh_id = p_mesh AND m.revoked_at IS NOT NULL AND m.pubkey = t
      AND NOT EXISTS (SELECT 1 FROM claudemesh.member l WHERE l.mesh_id = p_mesh AND l.pubkey = m.pubkey AND l.revoked_at IS NULL)
    ORDER BY m.revoked_at DESC LIMIT 1;
    IF NOT FOUND THEN
        -- A name must name one banned key (one key's several revoked rows are one member).
        SELECT count(DISTINCT m.pubkey) INTO n FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.revoked_at IS NOT NULL AND m.display_name = p_target
          AND NOT EXISTS (SELECT 1 FROM claudemesh.member l WHERE l.mesh_id = p_mesh AND l.pubkey = m.pubkey AND l.revoked_at IS NULL);
        IF n > 1 THEN
            code := 'ambiguous'; RETURN NEXT; RETURN;
        END IF;
        SELECT * INTO mb FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.revoked_at IS NOT NULL AND m.display_name = p_target
          AND NOT EXISTS (SELECT 1 FROM claudemesh.member l WHERE l.mesh_id = p_mesh AND l.pubkey = m.pubkey AND l.revoked_at IS NULL)
        ORDER BY m.revoked_at DESC LIMIT 1;
    END IF;
    IF NOT FOUND THEN
        code := 'not_found'; RETURN NEXT; RETURN;
    END IF;
    -- An admin undoes only what an admin did: not the owner's ban, not the ban of an admin,
    -- and never the operator's revocation (a compromised key, say), which only the operator
    -- lifts (by adding the member again).
    SELECT ms.owner_pubkey INTO owner_key FROM claudemesh.mesh ms WHERE ms.id = p_mesh;
    by_owner := EXISTS (SELECT 1 FROM claudemesh.member c WHERE c.id = p_caller_member AND c.pubkey = owner_key);
    IF mb.revoked_by = 'operator' OR (NOT by_owner AND (mb.revoked_by = 'owner' OR mb.role = 'admin')) THEN
        code := 'protected'; RETURN NEXT; RETURN;
    END IF;
    UPDATE claudemesh.member m SET revoked_at = NULL, revoked_by = NULL WHERE m.id = mb.id;
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['member_unbanned'], ARRAY[p_actor],
        ARRAY['{"member_id":' || to_json(mb.id)::text || ',"pubkey":' || to_json(mb.pubkey)::text || '}'],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    code := '';
    name := mb.display_name;
    RETURN NEXT;
END
$$;
-- +goose StatementEnd

