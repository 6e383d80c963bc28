-- +goose Up
-- Which process holds a node id. Two replicas started with the same BROKER_NODE_ID shared one
-- node row: each one's reconcile ended the other's presences as sockets it did not hold,
-- silently, while both served. Each process now registers with a random instance of its own;
-- the heartbeat of one whose row another process has since registered finds a different
-- instance, and that replica stops with an error naming the cause. Replicas of the previous
-- release leave the column as it is and never look at it.
ALTER TABLE claudemesh.node ADD COLUMN instance text;

-- +goose Down
ALTER TABLE claudemesh.node DROP COLUMN instance;
