-- name: Notify :exec
-- The notification is sent when the surrounding transaction commits (or now, outside one).
SELECT pg_notify(@channel::text, @payload::text);

-- name: NotifyMany :exec
-- Every notification of a transaction in one round trip.
SELECT pg_notify(t.channel, t.payload)
FROM (SELECT unnest(@channels::text[]) AS channel, unnest(@payloads::text[]) AS payload) t;
