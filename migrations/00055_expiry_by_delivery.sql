-- +goose NO TRANSACTION
-- +goose Up
-- What the expiry sweep looks for, open deliveries past their expiry, by an index of open
-- deliveries by expiry. The sweep went through the envelopes' expiry index and probed each
-- expired envelope's deliveries: every envelope expired in the last MESSAGE_TTL + 1 day was
-- probed again on every sweep, and the planner read the whole delivery table instead (650 ms
-- at 2 M deliveries, 1.3 s at 5 M, on every replica every 30 s). An open delivery is pushed or
-- acknowledged within seconds or expires, so the index holds little beyond what waits. A
-- delivery's expiry is its envelope's (the send writes both).
--
-- delivery churns (inserted assigned, then pushed and acknowledged, each a new row version
-- with new index entries, deleted a day past expiry): vacuumed every 1 % of the table, not
-- every 20 %, so the dead index entries that counting and claiming walk past stay few (the
-- pending gauge took 1.4-1.8 s over 2 M dead entries, 16 ms after a vacuum).
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_open_expires;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY delivery_open_expires ON claudemesh.delivery (expires_at)
    WHERE state IN ('pending', 'assigned', 'pushed');
-- +goose StatementEnd
-- +goose StatementBegin
ALTER TABLE claudemesh.delivery SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
ALTER TABLE claudemesh.delivery RESET (autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor);
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.delivery_open_expires;
-- +goose StatementEnd
