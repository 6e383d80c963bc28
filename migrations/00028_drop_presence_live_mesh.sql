-- +goose NO TRANSACTION
-- +goose Up
-- A direct send finds its recipient's session by (mesh_id, member_pubkey) or (mesh_id,
-- session_pubkey) (00016, 00018). Until presence is first analyzed (a fresh database; a small
-- table autovacuum has not reached yet), every partial index on live sessions looks about
-- empty, and the planner took presence_live_mesh (mesh_id, connected_at) instead: a tie on
-- cost, which it broke towards the index that matches one column. Each envelope then read
-- every live session of its mesh. pg_stat_statements over 30 s at 1,000 msgs/s (100 sessions
-- in one mesh): 30,581 walks of presence_live_mesh, none of presence_live_member_key, 66
-- pages per lookup, two thirds of all the pages a send read.
--
-- The index is dropped. Every index left that a statement filtering by mesh can use is led
-- by mesh_id and then names a member or a session (member key, session key, or member_id in
-- presence_live_session, which holds the same live rows), so a lookup of one member's
-- sessions probes that member whatever the statistics. Statements that read a whole mesh
-- (list_peers, the hello's capacity count, a kick) walk presence_live_session instead, the
-- same rows; list_peers sorts its few hundred rows by connected_at itself. A hello has one
-- index fewer to write.
--
-- Dropped concurrently: presence is written at hello rate. A replica running the previous
-- release plans its statements on the indexes left, which answer them the same way.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_mesh;
-- +goose StatementEnd

-- +goose Down
-- A build that stopped part way leaves an invalid index under the name: dropped first.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_mesh;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_mesh ON claudemesh.presence (mesh_id, connected_at)
    WHERE ended_at IS NULL;
-- +goose StatementEnd
