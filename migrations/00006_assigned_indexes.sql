-- +goose NO TRANSACTION
-- +goose Up
-- Deliveries in the hands of a session or node are now "assigned" or "pushed": the indexes a
-- session end, a node takeover and the catch-up use cover both. Built concurrently, like 00002:
-- delivery is written at message rate and must stay writable while a rolling deploy migrates.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_held_presence;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY delivery_held_presence ON claudemesh.delivery (pushed_presence)
    WHERE state IN ('assigned', 'pushed');
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_held_node;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY delivery_held_node ON claudemesh.delivery (pushed_node)
    WHERE state IN ('assigned', 'pushed');
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_pushed_presence;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_pushed_node;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY IF NOT EXISTS delivery_pushed_presence ON claudemesh.delivery (pushed_presence) WHERE state = 'pushed';
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY IF NOT EXISTS delivery_pushed_node ON claudemesh.delivery (pushed_node) WHERE state = 'pushed';
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_held_presence;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_held_node;
-- +goose StatementEnd
