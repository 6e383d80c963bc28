-- +goose Up
-- An operator's revocation (`broker member revoke`) ends the member's sessions as a ban does:
-- the live ones close (4002 revoked) on whichever replica holds them, and those in their
-- reconnect grace, or on a replica that died, leave the peer list at once (peer_left) instead of
-- staying listed, counted against the mesh's capacity and queued for, until their grace ran
-- out. Called in the revocation's transaction, which holds the mesh's hello lock: no hello of
-- the member registers after it. A new function: the previous release's replicas never call it.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.end_member_sessions(p_ns text, p_mesh text, p_member text, p_code int, p_reason text)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    ids text[];
BEGIN
    WITH x AS (
        UPDATE claudemesh.presence x SET ended_at = now(), grace_until = NULL
        WHERE x.mesh_id = p_mesh AND x.member_id = p_member AND x.ended_at IS NULL RETURNING x.id)
    SELECT array_agg(x.id) INTO ids FROM x;
    IF ids IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM claudemesh.close_presences(p_ns, ids, p_code, p_reason);
    PERFORM claudemesh.announce_left(p_ns, ids);
    PERFORM claudemesh.release_held(p_ns, ids);
    RETURN cardinality(ids);
END
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION claudemesh.end_member_sessions;
