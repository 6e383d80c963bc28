-- +goose NO TRANSACTION
-- +goose Up
-- The catch-up poll looks for its node's assigned pushes older than AssignedStale. Through
-- delivery_held_node (by node alone) it read every held delivery of the cluster, live or
-- dead, to find none: 18-108 ms a poll at saturation, three replicas polling every 3 s. With
-- the age in the key it reads only the node's entries older than that (assigned, or pushed and
-- waiting for an ack). The node takeover (pushed_at before the node's death) uses the same
-- prefix. Built before the old one is dropped, concurrently
-- (00006): delivery must stay writable while a rolling deploy migrates. A build that failed
-- half-way leaves an invalid index behind: dropped first, so a re-run builds it again instead
-- of taking the invalid one for done and dropping the only valid one.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_held_node_age;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY delivery_held_node_age ON claudemesh.delivery (pushed_node, pushed_at)
    WHERE state IN ('assigned', 'pushed');
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_held_node;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_held_node;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY delivery_held_node ON claudemesh.delivery (pushed_node)
    WHERE state IN ('assigned', 'pushed');
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_held_node_age;
-- +goose StatementEnd
