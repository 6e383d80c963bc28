-- +goose Up
-- A delivery-record plan that stays cheap whatever the statistics were when a connection
-- first planned it.
--
-- mark_delivered: the "taken" update (state = 'assigned') implied the predicate of the
-- partial indexes on held deliveries, and the cached plan intersected a full scan of one of
-- them with the id probe. Those indexes keep the entries of every delivery that was held
-- until vacuum reaches them (a state change is never a HOT update), so each call walked
-- thousands. The states are now parameters, which no partial-index predicate can be proven
-- from, and sequential scans are off (a plan made while the table was small would scan it
-- for the ids), so the ids' index is the only way in.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.mark_delivered(p_envelope_ids text[], p_member_ids text[], p_session_pubkeys text[],
    p_session_ids text[], p_written_ids bigint[], p_taken_ids bigint[])
RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS $fn$
DECLARE
    -- Parameters, not literals: see the header.
    st_open text[] := ARRAY['pending', 'assigned', 'pushed'];
    st_assigned text := 'assigned';
BEGIN
    WITH acked AS (
        -- Each ack is an index probe by envelope (the LATERAL kept a subquery by OFFSET 0, the ids
        -- matched by primary key): joined as a set instead, a plan cached before the table's first
        -- ANALYZE hashes the batch against a sequential scan of every delivery ever kept.
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
          AND d.state = ANY (st_open)
        RETURNING d.id
    ), written AS (
        UPDATE claudemesh.delivery d SET state = 'acked', acked_at = now()
        WHERE d.id = ANY(p_written_ids) AND d.state = ANY (st_open)
          AND d.id NOT IN (SELECT id FROM acked)
        RETURNING d.id
    )
    -- Assigned pushes written to sessions that ack: pushed now, so the catch-up leaves them alone.
    UPDATE claudemesh.delivery d SET state = 'pushed'
    WHERE d.id = ANY(p_taken_ids) AND d.state = st_assigned
      AND d.id NOT IN (SELECT id FROM acked) AND d.id NOT IN (SELECT id FROM written);
END
$fn$;
-- +goose StatementEnd

-- +goose Down
-- The bodies above stay: same signatures and results, and rolling back should not bring back
-- plans that walk whole indexes.
