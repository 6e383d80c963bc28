-- +goose Up
-- `broker member revoke` in one statement. It took the mesh's hello lock (claudemesh.hello:
-- the lock a hello holds around its membership check) and then, still holding it, ran the
-- revocation, the end of the member's sessions and the audit entry as statements of their own
-- from the operator's machine: every hello of the mesh waited for those round trips, past a
-- second failing `overloaded`, and a CLI stopped between them held the lock until its
-- connection died. Now the lock is held for the statement's server time, as a ban's is.
-- Only the CLI of this release calls it (after `migrate up`); the previous one's path works
-- unchanged.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.revoke_member(p_ns text, p_mesh text, p_pubkey text)
RETURNS SETOF claudemesh.member LANGUAGE plpgsql AS $$
DECLARE
    mb claudemesh.member;
BEGIN
    -- Hellos of the mesh take this lock and re-check membership under it: none registers the
    -- member after this revocation commits.
    PERFORM pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || p_mesh, 0));
    -- The operator's revocation: no admin's unban undoes it (00052).
    UPDATE claudemesh.member SET revoked_at = now(), revoked_by = 'operator'
    WHERE mesh_id = p_mesh AND pubkey = p_pubkey AND revoked_at IS NULL
    RETURNING * INTO mb;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Its presences end, those in their grace (or on a replica that died) too, as a ban's do:
    -- each live one's replica is told to close it (4002 revoked).
    PERFORM claudemesh.end_member_sessions(p_ns, p_mesh, mb.id, 4002, 'revoked');
    -- Canonical JSON (keys sorted, no spaces), as broker/audit encodes it.
    PERFORM claudemesh.audit_append(ARRAY[p_mesh], ARRAY['member_revoked'], ARRAY['operator'],
        ARRAY['{"member_id":' || to_json(mb.id)::text || ',"pubkey":' || to_json(mb.pubkey)::text || '}'],
        ARRAY[(extract(epoch FROM mb.revoked_at) * 1000000)::bigint]);
    RETURN NEXT mb;
END
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION claudemesh.revoke_member;
