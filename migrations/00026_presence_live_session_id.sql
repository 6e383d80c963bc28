-- +goose NO TRANSACTION
-- +goose Up
-- A hook names its session by sessionId (and its member key), with no mesh: claudemesh.hook_status
-- found it by reading every presence row, live or ended (2.5 ms at 6,400 rows), on every hook.
-- This index finds it directly. Its second condition, like 00025's, keeps a statement that does
-- not compare session_id (a hello's capacity count) from walking it. Built concurrently: presence
-- is written at hello rate.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_session_id;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_session_id ON claudemesh.presence (session_id, member_pubkey)
    WHERE ended_at IS NULL AND session_id IS NOT NULL;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_session_id;
-- +goose StatementEnd
