-- +goose NO TRANSACTION
-- +goose Up
-- The probes of migration 00050 (is a session stuck behind its push window: rows assigned to
-- it more than 5 s ago?) and its count of such rows read an index of assigned rows only, by
-- session and age. The index they had, by session over assigned and pushed rows, made a probe
-- walk every row pushed to the session and not acked: a recipient that never acks, at the
-- bound, made every send to it walk its whole backlog inside the group commit.
-- Assigned rows are transient (pushed or acked within milliseconds), so the index stays small;
-- it costs one entry per delivery assigned at once. Built concurrently, a failed build dropped
-- first (as 00048).
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_assigned_presence_age;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY delivery_assigned_presence_age ON claudemesh.delivery (pushed_presence, pushed_at)
    WHERE state = 'assigned';
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_assigned_presence_age;
-- +goose StatementEnd
