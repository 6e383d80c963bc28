-- +goose NO TRANSACTION
-- +goose Up
-- System events a replica did not hear are caught up. A replica's LISTEN connection that
-- dropped, or its notification queue that overflowed, lost the peer_joined, peer_left and
-- peer_status notices sent meanwhile: its sessions with system_events kept a peer list that
-- showed peers that had left, and stale statuses, until they called list_peers. Now the replica
-- reads, for the meshes of its sessions, the presences that connected, ended or changed status
-- since shortly before the gap, and tells its sessions as the notices would have.
--  - presence.status_changed_at: when the status last changed (null: never since the hello),
--    set by a trigger on every statement that changes it, whichever release runs it. Not
--    status_at, which a hook refreshes without a change. Not indexed: a change of status stays a
--    HOT update; the catch-up reads a mesh's live presences (at most MAX_CONNECTIONS_PER_MESH).
--  - presence (mesh_id, ended_at) for ended rows: a mesh's presences ended since a time, by
--    index (presence_ended is by time only, for the prune). Built concurrently, like 00023:
--    presence is written at hello rate.
--  - presence_changes_since: what a replica catching up reads.
-- +goose StatementBegin
ALTER TABLE claudemesh.presence ADD COLUMN IF NOT EXISTS status_changed_at timestamptz;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.presence_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The clock, not the transaction's start: closer to the commit the catch-up's margin covers.
    NEW.status_changed_at := clock_timestamp();
    RETURN NEW;
END
$$;
-- +goose StatementEnd
-- +goose StatementBegin
DROP TRIGGER IF EXISTS presence_status_changed ON claudemesh.presence;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE TRIGGER presence_status_changed BEFORE UPDATE OF status ON claudemesh.presence
FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION claudemesh.presence_status_changed();
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_ended_mesh;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_ended_mesh ON claudemesh.presence (mesh_id, ended_at) WHERE ended_at IS NOT NULL;
-- +goose StatementEnd

-- +goose StatementBegin
-- The presences of these meshes that connected, changed status or ended at or after p_since:
-- for each mesh its newest p_per_mesh by the time of their latest such change, oldest first (a
-- replica asks for one more than it sends, to know it left some out). ended: the presence has
-- ended (its peer_left, at is ended_at), else it is live (its peer_joined if connected_at is at
-- or after p_since, else its peer_status). Ended ones by index; live ones from the mesh's live
-- presences (bounded by MAX_CONNECTIONS_PER_MESH and the grace window).
CREATE OR REPLACE FUNCTION claudemesh.presence_changes_since(p_meshes text[], p_since timestamptz, p_per_mesh int)
RETURNS TABLE (mesh_id text, presence_id text, member_id text, pubkey text, display_name text, status text,
    connected_at timestamptz, ended boolean, at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT m.mesh_id, c.id, c.member_id, c.pubkey, c.display_name, c.status, c.connected_at, c.ended, c.at
    FROM unnest(p_meshes) AS m(mesh_id)
    CROSS JOIN LATERAL (
        SELECT u.* FROM (
            (SELECT p.id, p.member_id, coalesce(nullif(p.session_pubkey, ''), p.member_pubkey) AS pubkey,
                p.display_name, p.status, p.connected_at, false AS ended,
                greatest(p.connected_at, p.status_changed_at) AS at
             FROM claudemesh.presence p
             WHERE p.mesh_id = m.mesh_id AND p.ended_at IS NULL
               AND (p.connected_at >= p_since OR p.status_changed_at >= p_since)
             ORDER BY greatest(p.connected_at, p.status_changed_at) DESC LIMIT p_per_mesh)
            UNION ALL
            (SELECT p.id, p.member_id, coalesce(nullif(p.session_pubkey, ''), p.member_pubkey),
                p.display_name, p.status, p.connected_at, true, p.ended_at
             FROM claudemesh.presence p
             WHERE p.mesh_id = m.mesh_id AND p.ended_at >= p_since
             ORDER BY p.ended_at DESC LIMIT p_per_mesh)
        ) u ORDER BY u.at DESC LIMIT p_per_mesh
    ) c
    ORDER BY m.mesh_id, c.at
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP FUNCTION IF EXISTS claudemesh.presence_changes_since;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_ended_mesh;
-- +goose StatementEnd
-- +goose StatementBegin
DROP TRIGGER IF EXISTS presence_status_changed ON claudemesh.presence;
-- +goose StatementEnd
-- +goose StatementBegin
DROP FUNCTION IF EXISTS claudemesh.presence_status_changed;
-- +goose StatementEnd
-- +goose StatementBegin
ALTER TABLE claudemesh.presence DROP COLUMN IF EXISTS status_changed_at;
-- +goose StatementEnd
