-- +goose NO TRANSACTION
-- +goose Up
-- A send's client_message_id is unique per sender member and mesh while its envelope is kept:
-- a retry racing the first attempt on another replica fails on this index and is then folded
-- into the stored envelope. Built concurrently, like 00006: envelope is written at message
-- rate and must stay writable while a rolling deploy migrates.
-- A build that failed half-way left an invalid index behind: dropped first.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.envelope_client_message;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE UNIQUE INDEX CONCURRENTLY envelope_client_message
    ON claudemesh.envelope (mesh_id, sender_member_id, client_message_id) WHERE client_message_id <> '';
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.envelope_client_message;
-- +goose StatementEnd
