-- name: Notify :exec
-- The notification is sent when the surrounding transaction commits (or now, outside one).
SELECT pg_notify(@channel::text, @payload::text);

-- name: NotifyMany :exec
-- Every notification of a transaction in one round trip.
SELECT pg_notify(t.channel, t.payload)
FROM (SELECT unnest(@channels::text[]) AS channel, unnest(@payloads::text[]) AS payload) t;

-- name: NotifyPing :exec
-- The bus's liveness ping to its own channel, carrying the database's clock (microseconds): a
-- replica that hears it has heard every notification committed before it.
SELECT pg_notify(@channel::text,
    json_build_object('k', 'p', 'n', @node_id::text, 'i', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)::text);
