-- +goose Up
-- Admin operations, guarded as the owner and the operator expect:
--  - unban undoes only what an admin may: not a ban by the owner, not the ban of an admin
--    (only the owner bans one), never an operator's revocation (`broker member revoke`: a
--    compromised key, say). member.revoked_by says who revoked it ('operator', 'owner',
--    'admin'; NULL for revocations made before this migration, which stay as they were).
--  - kick and disconnect leave the owner's sessions alone unless the owner asks (ban already
--    protects the owner's key).
--  - kick, ban and unban read the caller's rights under the mesh's lock, which bans and
--    revocations take: an admin banned while its own operation waited is refused, not obeyed.
--    (It is the hellos' lock: these are rare operations.)
-- Same signatures, replaced in place: the previous release's replicas get the same answers.
ALTER TABLE claudemesh.member ADD COLUMN revoked_by text;

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.kick(p_ns text, p_mesh text, p_caller_member text, p_caller_presence text, p_actor text,
    p_target text, p_stale_ms bigint, p_all boolean, p_skip_control boolean, p_code int, p_reason text)
RETURNS TABLE (code text, name text, skipped boolean) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    m_ids text[];
    m_names text[];
    m_skip boolean[];
    ids text[];
    owner_key text;
    by_owner boolean;
BEGIN
    -- The caller's rights are read under the mesh's lock, which a ban or a revocation takes
    -- too: an admin banned while this waited is refused, not obeyed.
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    SELECT ms.owner_pubkey INTO owner_key FROM claudemesh.mesh ms WHERE ms.id = p_mesh;
    by_owner := EXISTS (SELECT 1 FROM claudemesh.member c WHERE c.id = p_caller_member AND c.pubkey = owner_key);
    code := '';
    RETURN NEXT; -- the outcome row; the matches follow
    SELECT array_agg(x.id ORDER BY x.display_name, x.id), array_agg(x.display_name ORDER BY x.display_name, x.id),
           array_agg(p_skip_control AND x.role = 'control-plane' ORDER BY x.display_name, x.id)
    INTO m_ids, m_names, m_skip
    FROM claudemesh.presence x
    WHERE x.mesh_id = p_mesh AND x.ended_at IS NULL
      -- Only the owner kicks the owner's sessions (as only the owner may ban an admin).
      AND (by_owner OR x.member_pubkey <> owner_key)
      AND CASE
          WHEN p_all THEN x.id <> p_caller_presence
          WHEN p_stale_ms > 0 THEN x.id <> p_caller_presence AND x.grace_until IS NOT NULL
                                   AND x.last_seen_at < now() - make_interval(secs => p_stale_ms / 1000.0)
          WHEN p_target <> '' THEN x.display_name = p_target OR x.member_pubkey = t OR x.session_pubkey = t
                                   OR (length(t) >= 8 AND starts_with(x.member_pubkey, t))
          ELSE false END;
    IF m_ids IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(u.id) INTO ids FROM unnest(m_ids, m_skip) AS u(id, skip) WHERE NOT u.skip;
    IF ids IS NOT NULL THEN
        UPDATE claudemesh.presence x SET ended_at = now(), grace_until = NULL WHERE x.id = ANY(ids);
        PERFORM claudemesh.close_presences(p_ns, ids, p_code, p_reason);
        PERFORM claudemesh.announce_left(p_ns, ids);
        PERFORM claudemesh.release_held(p_ns, ids);
        PERFORM claudemesh.audit_append(array_agg(p_mesh), array_agg('peer_kicked'::text), array_agg(p_actor),
            array_agg('{"close_code":' || p_code::text || ',"presence_id":' || to_json(u.id)::text || '}'),
            array_agg((extract(epoch FROM clock_timestamp()) * 1000000)::bigint))
        FROM unnest(ids) AS u(id);
    END IF;
    RETURN QUERY SELECT 'match'::text, u.n, u.s FROM unnest(m_names, m_skip) WITH ORDINALITY AS u(n, s, o) ORDER BY u.o;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.ban(p_ns text, p_mesh text, p_caller_member text, p_actor text, p_target text)
RETURNS TABLE (code text, name text) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    mb claudemesh.member;
    ms claudemesh.mesh;
    n bigint;
    ids text[];
BEGIN
    -- Hellos of the mesh take this lock and re-check membership under it: none registers the
    -- member after this revocation commits. Taken first, so the caller's own rights are read
    -- under it: an admin banned while this waited is refused, not obeyed.
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    -- A key names one member; a display name or a key prefix must name exactly one.
    SELECT * INTO mb FROM claudemesh.member m WHERE m.mesh_id = p_mesh AND m.revoked_at IS NULL AND m.pubkey = t;
    IF NOT FOUND THEN
        SELECT count(*) INTO n FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.revoked_at IS NULL
          AND (m.display_name = p_target OR (length(t) >= 8 AND starts_with(m.pubkey, t)));
        IF n > 1 THEN
            code := 'ambiguous'; RETURN NEXT; RETURN;
        END IF;
        SELECT * INTO mb FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.revoked_at IS NULL
          AND (m.display_name = p_target OR (length(t) >= 8 AND starts_with(m.pubkey, t)));
    END IF;
    IF NOT FOUND THEN
        code := 'not_found'; RETURN NEXT; RETURN;
    ELSIF mb.id = p_caller_member THEN
        code := 'self'; RETURN NEXT; RETURN;
    END IF;
    -- The owner's key can't be banned, and only the owner bans another admin: an admin can't
    -- lock the owner (or a peer admin) out of the mesh.
    SELECT * INTO ms FROM claudemesh.mesh WHERE id = p_mesh;
    IF mb.pubkey = ms.owner_pubkey OR (mb.role = 'admin' AND NOT EXISTS (
            SELECT 1 FROM claudemesh.member c WHERE c.id = p_caller_member AND c.pubkey = ms.owner_pubkey)) THEN
        code := 'protected'; RETURN NEXT; RETURN;
    END IF;
    -- Who revoked it decides who may undo it (unban).
    UPDATE claudemesh.member m SET revoked_at = now(),
        revoked_by = CASE WHEN EXISTS (SELECT 1 FROM claudemesh.member c WHERE c.id = p_caller_member AND c.pubkey = ms.owner_pubkey)
                          THEN 'owner' ELSE 'admin' END
    WHERE m.id = mb.id;
    WITH x AS (
        UPDATE claudemesh.presence x SET ended_at = now(), grace_until = NULL
        WHERE x.mesh_id = p_mesh AND x.member_id = mb.id AND x.ended_at IS NULL RETURNING x.id)
    SELECT array_agg(x.id) INTO ids FROM x;
    IF ids IS NOT NULL THEN
        PERFORM claudemesh.close_presences(p_ns, ids, 4002, 'banned');
        PERFORM claudemesh.announce_left(p_ns, ids);
        PERFORM claudemesh.release_held(p_ns, ids);
    END IF;
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['member_banned'], ARRAY[p_actor],
        ARRAY['{"member_id":' || to_json(mb.id)::text || ',"pubkey":' || to_json(mb.pubkey)::text || '}'],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    code := '';
    name := mb.display_name;
    RETURN NEXT;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.unban(p_mesh text, p_caller_member text, p_actor text, p_target text)
RETURNS TABLE (code text, name text) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    mb claudemesh.member;
    owner_key text;
    by_owner boolean;
BEGIN
    -- The caller's rights are read under the mesh's lock (see ban).
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO mb FROM claudemesh.member m
    WHERE m.mesh_id = p_mesh AND m.revoked_at IS NOT NULL AND (m.display_name = p_target OR m.pubkey = t)
      AND NOT EXISTS (SELECT 1 FROM claudemesh.member l WHERE l.mesh_id = p_mesh AND l.pubkey = m.pubkey AND l.revoked_at IS NULL)
    ORDER BY m.pubkey = t DESC, m.revoked_at DESC LIMIT 1;
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
-- 00007's kick and unban, 00011's ban.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.kick(p_ns text, p_mesh text, p_caller_member text, p_caller_presence text, p_actor text,
    p_target text, p_stale_ms bigint, p_all boolean, p_skip_control boolean, p_code int, p_reason text)
RETURNS TABLE (code text, name text, skipped boolean) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    m_ids text[];
    m_names text[];
    m_skip boolean[];
    ids text[];
BEGIN
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    code := '';
    RETURN NEXT; -- the outcome row; the matches follow
    SELECT array_agg(x.id ORDER BY x.display_name, x.id), array_agg(x.display_name ORDER BY x.display_name, x.id),
           array_agg(p_skip_control AND x.role = 'control-plane' ORDER BY x.display_name, x.id)
    INTO m_ids, m_names, m_skip
    FROM claudemesh.presence x
    WHERE x.mesh_id = p_mesh AND x.ended_at IS NULL
      AND CASE
          WHEN p_all THEN x.id <> p_caller_presence
          WHEN p_stale_ms > 0 THEN x.id <> p_caller_presence AND x.grace_until IS NOT NULL
                                   AND x.last_seen_at < now() - make_interval(secs => p_stale_ms / 1000.0)
          WHEN p_target <> '' THEN x.display_name = p_target OR x.member_pubkey = t OR x.session_pubkey = t
                                   OR (length(t) >= 8 AND starts_with(x.member_pubkey, t))
          ELSE false END;
    IF m_ids IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(u.id) INTO ids FROM unnest(m_ids, m_skip) AS u(id, skip) WHERE NOT u.skip;
    IF ids IS NOT NULL THEN
        UPDATE claudemesh.presence x SET ended_at = now(), grace_until = NULL WHERE x.id = ANY(ids);
        PERFORM claudemesh.close_presences(p_ns, ids, p_code, p_reason);
        PERFORM claudemesh.announce_left(p_ns, ids);
        PERFORM claudemesh.release_held(p_ns, ids);
        PERFORM claudemesh.audit_append(array_agg(p_mesh), array_agg('peer_kicked'::text), array_agg(p_actor),
            array_agg('{"close_code":' || p_code::text || ',"presence_id":' || to_json(u.id)::text || '}'),
            array_agg((extract(epoch FROM clock_timestamp()) * 1000000)::bigint))
        FROM unnest(ids) AS u(id);
    END IF;
    RETURN QUERY SELECT 'match'::text, u.n, u.s FROM unnest(m_names, m_skip) WITH ORDINALITY AS u(n, s, o) ORDER BY u.o;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.ban(p_ns text, p_mesh text, p_caller_member text, p_actor text, p_target text)
RETURNS TABLE (code text, name text) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    mb claudemesh.member;
    ms claudemesh.mesh;
    n bigint;
    ids text[];
BEGIN
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    -- A key names one member; a display name or a key prefix must name exactly one.
    SELECT * INTO mb FROM claudemesh.member m WHERE m.mesh_id = p_mesh AND m.revoked_at IS NULL AND m.pubkey = t;
    IF NOT FOUND THEN
        SELECT count(*) INTO n FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.revoked_at IS NULL
          AND (m.display_name = p_target OR (length(t) >= 8 AND starts_with(m.pubkey, t)));
        IF n > 1 THEN
            code := 'ambiguous'; RETURN NEXT; RETURN;
        END IF;
        SELECT * INTO mb FROM claudemesh.member m
        WHERE m.mesh_id = p_mesh AND m.revoked_at IS NULL
          AND (m.display_name = p_target OR (length(t) >= 8 AND starts_with(m.pubkey, t)));
    END IF;
    IF NOT FOUND THEN
        code := 'not_found'; RETURN NEXT; RETURN;
    ELSIF mb.id = p_caller_member THEN
        code := 'self'; RETURN NEXT; RETURN;
    END IF;
    -- The owner's key can't be banned, and only the owner bans another admin: an admin can't
    -- lock the owner (or a peer admin) out of the mesh.
    SELECT * INTO ms FROM claudemesh.mesh WHERE id = p_mesh;
    IF mb.pubkey = ms.owner_pubkey OR (mb.role = 'admin' AND NOT EXISTS (
            SELECT 1 FROM claudemesh.member c WHERE c.id = p_caller_member AND c.pubkey = ms.owner_pubkey)) THEN
        code := 'protected'; RETURN NEXT; RETURN;
    END IF;
    -- Hellos of the mesh take this lock and re-check membership under it: none registers the
    -- member after this revocation commits.
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
    UPDATE claudemesh.member m SET revoked_at = now() WHERE m.id = mb.id;
    WITH x AS (
        UPDATE claudemesh.presence x SET ended_at = now(), grace_until = NULL
        WHERE x.mesh_id = p_mesh AND x.member_id = mb.id AND x.ended_at IS NULL RETURNING x.id)
    SELECT array_agg(x.id) INTO ids FROM x;
    IF ids IS NOT NULL THEN
        PERFORM claudemesh.close_presences(p_ns, ids, 4002, 'banned');
        PERFORM claudemesh.announce_left(p_ns, ids);
        PERFORM claudemesh.release_held(p_ns, ids);
    END IF;
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['member_banned'], ARRAY[p_actor],
        ARRAY['{"member_id":' || to_json(mb.id)::text || ',"pubkey":' || to_json(mb.pubkey)::text || '}'],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    code := '';
    name := mb.display_name;
    RETURN NEXT;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.unban(p_mesh text, p_caller_member text, p_actor text, p_target text)
RETURNS TABLE (code text, name text) LANGUAGE plpgsql AS $$
DECLARE
    t text := lower(p_target);
    mb claudemesh.member;
BEGIN
    IF NOT claudemesh.is_admin(p_mesh, p_caller_member) THEN
        code := 'forbidden'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO mb FROM claudemesh.member m
    WHERE m.mesh_id = p_mesh AND m.revoked_at IS NOT NULL AND (m.display_name = p_target OR m.pubkey = t)
      AND NOT EXISTS (SELECT 1 FROM claudemesh.member l WHERE l.mesh_id = p_mesh AND l.pubkey = m.pubkey AND l.revoked_at IS NULL)
    ORDER BY m.pubkey = t DESC, m.revoked_at DESC LIMIT 1;
    IF NOT FOUND THEN
        code := 'not_found'; RETURN NEXT; RETURN;
    END IF;
    UPDATE claudemesh.member m SET revoked_at = NULL WHERE m.id = mb.id;
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['member_unbanned'], ARRAY[p_actor],
        ARRAY['{"member_id":' || to_json(mb.id)::text || ',"pubkey":' || to_json(mb.pubkey)::text || '}'],
        ARRAY[(extract(epoch FROM clock_timestamp()) * 1000000)::bigint]);
    code := '';
    name := mb.display_name;
    RETURN NEXT;
END
$$;
-- +goose StatementEnd

ALTER TABLE claudemesh.member DROP COLUMN revoked_by;
