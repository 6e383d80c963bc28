-- +goose NO TRANSACTION
-- +goose Up
-- The index of live sessions by (mesh_id, member_pubkey) is dropped: no statement needs it. A
-- send to a member key resolves the member first and looks its sessions up by mesh, member key
-- and member_id (00016, 00030), which presence_live_session (mesh_id, member_id, session_id)
-- answers with a probe of the same sessions: a member's key and its id name the same member. A
-- hook finds its session by sessionId (presence_live_session_id), or by pid and cwd, or cwd
-- (presence_live_cwd); a hello's count and a kick read their mesh. Every hello wrote an entry
-- into it (one of six, or seven with a session key), and since
-- 00028 it was the only other index a send's member lookup could be planned on, a tie the
-- planner breaks either way while presence has no statistics.
--
-- Dropped concurrently: presence is written at hello rate. A replica of the previous release
-- plans its sends on presence_live_session, which answers them the same way.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_member_key;
-- +goose StatementEnd

-- +goose Down
-- A build that stopped part way leaves an invalid index under the name: dropped first. The
-- definition is 00025's.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_member_key;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_member_key ON claudemesh.presence (mesh_id, member_pubkey)
    WHERE ended_at IS NULL AND member_pubkey IS NOT NULL;
-- +goose StatementEnd
