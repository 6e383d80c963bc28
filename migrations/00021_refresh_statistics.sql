-- +goose Up
-- Statistics the planner can trust while tables grow fast. Every connection caches the plans of
-- the functions it runs, made from the statistics of the moment, until an ANALYZE of the table
-- invalidates them. On a fresh database, or after a quiet spell, those statistics say the live
-- sessions are none: every partial index on presence looks empty, and a full walk of one costs
-- no more than a probe of another. auto_explain showed the hello's capacity count and its
-- reattach lookup walking every live session of the cluster through the cwd index, three walks
-- per hello (2.8 ms of its 4.1 at 10,000 sessions). Autovacuum analyzes a table once a tenth of
-- it has changed, but looks once a minute: a reconnect storm or a first morning is over by
-- then. The replicas ask every few seconds, one at a time, and analyze a table whose live rows
-- grew to p_growth times what its last ANALYZE counted, and to at least p_min_rows (small
-- tables, where a walk is cheap anyway, are left to autovacuum). Growth, not changes: status
-- flips and reconnects update rows all day, and each ANALYZE makes every connection plan its
-- statements again. A table locked by another maintenance command (CREATE INDEX CONCURRENTLY,
-- a VACUUM) is skipped rather than waited for: waiting inside this transaction would deadlock
-- with a concurrent index build, which waits for this transaction to end. Tables the role does
-- not own are skipped too, and left to autovacuum.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.refresh_statistics(p_tables text[], p_min_rows bigint, p_growth float8)
RETURNS text[] LANGUAGE plpgsql AS $fn$
DECLARE
    done text[] := '{}';
    t record;
BEGIN
    -- One replica at a time; the others find nothing stale after it.
    IF NOT pg_try_advisory_xact_lock(hashtextextended('claudemesh.refresh_statistics', 0)) THEN
        RETURN done;
    END IF;
    FOR t IN
        SELECT c.oid::regclass AS rel, c.relname::text AS name
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_stat_user_tables s ON s.relid = c.oid
        WHERE c.relnamespace = 'claudemesh'::regnamespace AND c.relname = ANY (p_tables)
          AND pg_has_role(c.relowner, 'USAGE')
          AND s.n_live_tup >= greatest(p_min_rows, p_growth * greatest(c.reltuples, 0))
        ORDER BY c.relname
    LOOP
        BEGIN
            -- ANALYZE's own lock, taken without waiting; kept to the end of this transaction.
            EXECUTE format('LOCK TABLE %s IN SHARE UPDATE EXCLUSIVE MODE NOWAIT', t.rel);
        EXCEPTION WHEN lock_not_available THEN
            CONTINUE;
        END;
        EXECUTE format('ANALYZE %s', t.rel);
        done := done || t.name;
    END LOOP;
    RETURN done;
END
$fn$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION claudemesh.refresh_statistics(text[], bigint, float8);
