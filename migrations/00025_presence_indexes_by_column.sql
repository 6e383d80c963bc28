-- +goose NO TRANSACTION
-- +goose Up
-- Three indexes on live sessions are rebuilt with a second condition on their own column:
-- by cwd (hooks), by node (a replica's sessions) and by member key (sends to a key). The
-- column is NOT NULL, so each index holds the same rows as before; what changes is which
-- statements may walk it. A query proves "<column> IS NOT NULL" only by comparing that
-- column, so a hello's capacity count or presence lookup (by mesh, member and session) can no
-- longer take one of these indexes whole.
--
-- It did: until presence is first analyzed (a fresh database: the first seconds of a
-- connect storm, up to the first statistics refresh), every partial index on live sessions
-- looks empty, and the planner walked the smallest one, by cwd, for both statements, reading
-- every live session of the cluster. At 5,000 live sessions that was 0.6-0.8 ms a statement,
-- three times a hello. With only presence_live_mesh and presence_live_session left to walk,
-- the worst plan reads the hello's own mesh.
--
-- Each index is built under a new name, then the old one is dropped and the new one renamed,
-- all concurrently: presence is written at hello rate, and a replica running the previous
-- release keeps an index for every statement it sends throughout.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_cwd_new;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_cwd_new ON claudemesh.presence (cwd, connected_at)
    WHERE ended_at IS NULL AND cwd IS NOT NULL;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_cwd;
-- +goose StatementEnd
-- +goose StatementBegin
ALTER INDEX claudemesh.presence_live_cwd_new RENAME TO presence_live_cwd;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_node_new;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_node_new ON claudemesh.presence (node_id)
    WHERE ended_at IS NULL AND node_id IS NOT NULL;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_node;
-- +goose StatementEnd
-- +goose StatementBegin
ALTER INDEX claudemesh.presence_live_node_new RENAME TO presence_live_node;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_member_key_new;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_member_key_new ON claudemesh.presence (mesh_id, member_pubkey)
    WHERE ended_at IS NULL AND member_pubkey IS NOT NULL;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_member_key;
-- +goose StatementEnd
-- +goose StatementBegin
ALTER INDEX claudemesh.presence_live_member_key_new RENAME TO presence_live_member_key;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_cwd;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_cwd ON claudemesh.presence (cwd, connected_at) WHERE ended_at IS NULL;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_node;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_node ON claudemesh.presence (node_id) WHERE ended_at IS NULL;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_member_key;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_member_key ON claudemesh.presence (mesh_id, member_pubkey) WHERE ended_at IS NULL;
-- +goose StatementEnd
