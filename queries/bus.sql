-- name: Notify :exec
-- The notification is sent when the surrounding transaction commits (or now, outside one).
SELECT pg_notify(@channel::text, @payload::text);
