-- +goose NO TRANSACTION
-- +goose Up
-- Ended presences are deleted an hour after they end (the sweeper): every hello of a new
-- session adds a row, and they were kept forever, so a client reconnecting in a loop grew the
-- table without bound. Who connected when stays in the audit log (peer_connected,
-- peer_disconnected). This index finds them without reading the live ones; its predicate is
-- never implied by a query for live sessions, so no plan for those can walk it. Built
-- concurrently, like 00002: presence is written at hello rate.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_ended;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_ended ON claudemesh.presence (ended_at) WHERE ended_at IS NOT NULL;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_ended;
-- +goose StatementEnd
