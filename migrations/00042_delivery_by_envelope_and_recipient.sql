-- +goose NO TRANSACTION
-- +goose Up
-- A client_ack names an envelope; its record finds the recipient's delivery through
-- delivery_envelope, by envelope alone. For a broadcast that index holds one entry per
-- recipient (and per dead row version), so each ack read every delivery of its envelope to keep
-- one: in a broadcast-heavy saturation run, 317 index entries and 123 heap pages an ack,
-- 0.44 ms of Postgres each, and mark_delivered the second costliest statement. With the
-- recipient in the key an ack reads its own row. The index stays one index: the lookups by
-- envelope alone (expiry, the catch-up of a broadcast) use its first column. Built before the
-- old one is dropped, concurrently, as 00037 (a failed build's invalid index is dropped first).
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_envelope_recipient;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY delivery_envelope_recipient ON claudemesh.delivery (envelope_id, recipient_member_id);
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_envelope;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_envelope;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY delivery_envelope ON claudemesh.delivery (envelope_id);
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_envelope_recipient;
-- +goose StatementEnd
