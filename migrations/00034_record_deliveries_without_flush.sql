-- +goose Up
-- Recording deliveries does not wait for the WAL flush. What mark_delivered writes (a client's
-- acks, pushes written to sockets, assigned pushes taken) only moves deliveries forward; if
-- Postgres crashed before the write reached disk, they would be open again and pushed again
-- with the same messageId at the session's next connection: the at-least-once the protocol
-- promises (a client drops a messageId it has seen). Nothing acknowledged to a sender depends
-- on it. Each replica records every 60 ms or so, and each such commit waited in the queue for
-- the WAL flush beside the sends, whose acks do depend on it: at 1,000 msgs/s across
-- replicas on 2 cores, MarkDelivered was found waiting on the WAL in about 1 sample in 7.
-- The setting lasts to the end of the transaction (set_config local): the store runs
-- mark_delivered as a transaction of its own.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.mark_delivered(p_envelope_ids text[], p_member_ids text[], p_session_pubkeys text[],
    p_session_ids text[], p_written_ids bigint[], p_taken_ids bigint[])
RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS $fn$
DECLARE
    -- Parameters, not literals: see 00013.
    st_open text[] := ARRAY['pending', 'assigned', 'pushed'];
    st_assigned text := 'assigned';
BEGIN
    -- Not waiting for the WAL flush: see above.
    PERFORM set_config('synchronous_commit', 'off', true);
    IF cardinality(p_envelope_ids) > 0 THEN
        -- Each ack is an index probe by envelope (see 00012 and 00013).
        UPDATE claudemesh.delivery d SET state = 'acked', acked_at = now()
        WHERE d.id = ANY (ARRAY(
            SELECT o.id
            FROM (SELECT unnest(p_envelope_ids) AS envelope_id, unnest(p_member_ids) AS member_id,
                         unnest(p_session_pubkeys) AS session_pubkey, unnest(p_session_ids) AS session_id) a
            CROSS JOIN LATERAL (
                SELECT o.id FROM claudemesh.delivery o
                WHERE o.envelope_id = a.envelope_id AND o.recipient_member_id = a.member_id
                  AND o.state = ANY (st_open)
                  AND (o.recipient_session_pubkey IS NULL OR o.recipient_session_pubkey = a.session_pubkey)
                  AND (o.recipient_session_id IS NULL OR o.recipient_session_id = a.session_id)
                OFFSET 0) o))
          AND d.state = ANY (st_open);
    END IF;
    IF cardinality(p_written_ids) > 0 THEN
        UPDATE claudemesh.delivery d SET state = 'acked', acked_at = now()
        WHERE d.id = ANY (p_written_ids) AND d.state = ANY (st_open);
    END IF;
    IF cardinality(p_taken_ids) > 0 THEN
        -- Assigned pushes written to sessions that ack: pushed now, so the catch-up leaves them
        -- alone. One acked above is no longer assigned.
        UPDATE claudemesh.delivery d SET state = 'pushed'
        WHERE d.id = ANY (p_taken_ids) AND d.state = st_assigned;
    END IF;
END
$fn$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.mark_delivered(p_envelope_ids text[], p_member_ids text[], p_session_pubkeys text[],
    p_session_ids text[], p_written_ids bigint[], p_taken_ids bigint[])
RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS $fn$
DECLARE
    -- Parameters, not literals: see 00013.
    st_open text[] := ARRAY['pending', 'assigned', 'pushed'];
    st_assigned text := 'assigned';
BEGIN
    IF cardinality(p_envelope_ids) > 0 THEN
        -- Each ack is an index probe by envelope (see 00012 and 00013).
        UPDATE claudemesh.delivery d SET state = 'acked', acked_at = now()
        WHERE d.id = ANY (ARRAY(
            SELECT o.id
            FROM (SELECT unnest(p_envelope_ids) AS envelope_id, unnest(p_member_ids) AS member_id,
                         unnest(p_session_pubkeys) AS session_pubkey, unnest(p_session_ids) AS session_id) a
            CROSS JOIN LATERAL (
                SELECT o.id FROM claudemesh.delivery o
                WHERE o.envelope_id = a.envelope_id AND o.recipient_member_id = a.member_id
                  AND o.state = ANY (st_open)
                  AND (o.recipient_session_pubkey IS NULL OR o.recipient_session_pubkey = a.session_pubkey)
                  AND (o.recipient_session_id IS NULL OR o.recipient_session_id = a.session_id)
                OFFSET 0) o))
          AND d.state = ANY (st_open);
    END IF;
    IF cardinality(p_written_ids) > 0 THEN
        UPDATE claudemesh.delivery d SET state = 'acked', acked_at = now()
        WHERE d.id = ANY (p_written_ids) AND d.state = ANY (st_open);
    END IF;
    IF cardinality(p_taken_ids) > 0 THEN
        -- Assigned pushes written to sessions that ack: pushed now, so the catch-up leaves them
        -- alone. One acked above is no longer assigned.
        UPDATE claudemesh.delivery d SET state = 'pushed'
        WHERE d.id = ANY (p_taken_ids) AND d.state = st_assigned;
    END IF;
END
$fn$;
-- +goose StatementEnd
