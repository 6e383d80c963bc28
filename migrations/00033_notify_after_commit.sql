-- +goose Up
-- A send's notifications can leave after the commit that stored its rows, not inside it.
--
-- Postgres lets one transaction that notifies commit at a time: it takes a lock on the
-- database's notification queue before it writes its commit record and releases it only once
-- the record is flushed to disk. Every send notifies, so each send's commit waited for every
-- other notifying commit's flush in turn, and concurrent commits could not share a flush. At
-- 1,000 msgs/s across replicas (2 cores), sends were found waiting on that lock ("Lock:
-- object") or on the WAL flush in most samples of pg_stat_activity; with the disk's flush made
-- 2 ms slower (a network volume's), send→push p50 was 15-17 ms.
--
-- A caller that runs a statement in an explicit transaction may set claudemesh.defer_notify
-- for it (set_config(..., true)). notify_lines then keeps its payloads in the session's
-- claudemesh.deferred (a session setting: what an aborted transaction or subtransaction added
-- rolls back with it), and flush_notes, run by the caller right after COMMIT in the same
-- flight, sends them from a transaction of its own. That transaction holds the lock for
-- microseconds: it writes nothing but its commit record and does not wait for the flush (a
-- notification is not durable anyway: a listener that reconnects catches up from the tables).
-- The rows' commits share flushes (group commit) instead of taking turns.
--
-- A listener still hears of rows only once they are committed. Callers that set nothing
-- notify as before, inside their transaction. The replicas ask only for send batches, and
-- only with NOTIFY_AFTER_COMMIT: on a local disk the second transaction costs more than it
-- saves.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.notify_lines(p_channel text, p_lines text[]) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    buf text := '';
    l text;
    n int := 0;
    -- A payload is JSON lines: neither separator below can occur in one, nor in a channel.
    defer boolean := coalesce(current_setting('claudemesh.defer_notify', true), '') = 'on';
    kept text := '';
BEGIN
    IF p_lines IS NULL THEN
        RETURN 0;
    END IF;
    FOREACH l IN ARRAY p_lines LOOP
        IF buf <> '' AND octet_length(buf) + 1 + octet_length(l) > 7600 THEN
            IF defer THEN
                kept := kept || p_channel || E'\x1f' || buf || E'\x1e';
            ELSE
                PERFORM pg_notify(p_channel, buf);
            END IF;
            n := n + 1;
            buf := '';
        END IF;
        buf := CASE WHEN buf = '' THEN l ELSE buf || E'\n' || l END;
    END LOOP;
    IF buf <> '' THEN
        IF defer THEN
            kept := kept || p_channel || E'\x1f' || buf || E'\x1e';
        ELSE
            PERFORM pg_notify(p_channel, buf);
        END IF;
        n := n + 1;
    END IF;
    IF kept <> '' THEN
        PERFORM set_config('claudemesh.deferred', coalesce(current_setting('claudemesh.deferred', true), '') || kept, false);
    END IF;
    RETURN n;
END
$$;
-- +goose StatementEnd

-- Sends what notify_lines kept, in this statement's own transaction, committed without waiting
-- for the WAL flush. Returns how many payloads it sent; nothing kept, nothing written.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.flush_notes() RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    kept text := coalesce(current_setting('claudemesh.deferred', true), '');
    p text;
    cut int;
    n int := 0;
BEGIN
    IF kept = '' THEN
        RETURN 0;
    END IF;
    PERFORM set_config('claudemesh.deferred', '', false);
    PERFORM set_config('synchronous_commit', 'off', true);
    FOREACH p IN ARRAY string_to_array(rtrim(kept, E'\x1e'), E'\x1e') LOOP
        cut := strpos(p, E'\x1f');
        PERFORM pg_notify(left(p, cut - 1), substr(p, cut + 1));
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP FUNCTION IF EXISTS claudemesh.flush_notes();
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION claudemesh.notify_lines(p_channel text, p_lines text[]) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    buf text := '';
    l text;
    n int := 0;
BEGIN
    IF p_lines IS NULL THEN
        RETURN 0;
    END IF;
    FOREACH l IN ARRAY p_lines LOOP
        IF buf <> '' AND octet_length(buf) + 1 + octet_length(l) > 7600 THEN
            PERFORM pg_notify(p_channel, buf);
            n := n + 1;
            buf := '';
        END IF;
        buf := CASE WHEN buf = '' THEN l ELSE buf || E'\n' || l END;
    END LOOP;
    IF buf <> '' THEN
        PERFORM pg_notify(p_channel, buf);
        n := n + 1;
    END IF;
    RETURN n;
END
$$;
-- +goose StatementEnd
