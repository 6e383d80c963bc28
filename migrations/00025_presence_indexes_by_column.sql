-- +goose NO TRANSACTION
-- +goose Up
-- Three indexes on live sessions are rebuilt with a second condition on their own column:
-- by cwd (hooks), by node (a replica's sessions) and by member key (sends to a key). The
-- column is NOT NULL, so each index holds the same rows as before; what changes is which
-- statements may walk it. Only a statement that compares the column proves "<column> IS NOT
-- NULL", so a hello's capacity count and presence lookup can no longer take the index by cwd
-- or by node, and the one by member key only through its mesh.
--
-- They did: until presence is first analyzed (a fresh database: the first seconds of a
-- connect storm, up to the first statistics refresh), every partial index on live sessions
-- looks about empty, and the planner walked the one by cwd for both statements, reading every
-- live session of the cluster: 0.6-0.8 ms a statement at 5,000 sessions, three a hello. Left
-- with indexes led by mesh, the worst plan reads the hello's own mesh.
--
-- Each index is built under a new name, then the old one is dropped and the new one renamed,
-- all concurrently: presence is written at hello rate, and a replica running the previous
-- release keeps an index for every statement it sends throughout.
--
-- A run that stopped part way is run again from the top (goose records the version at the
-- end). Where it stopped after dropping an old index (or leaving it invalid) but before the
-- rename, the new one is put in its place first, so the rebuild below never leaves a statement
-- without its index.
-- +goose StatementBegin
DO $$
DECLARE
    n text;
BEGIN
    FOREACH n IN ARRAY ARRAY['presence_live_cwd', 'presence_live_node', 'presence_live_member_key'] LOOP
        IF EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass('claudemesh.' || n || '_new') AND indisvalid)
           AND NOT EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass('claudemesh.' || n) AND indisvalid) THEN
            IF to_regclass('claudemesh.' || n) IS NOT NULL THEN
                EXECUTE format('ALTER INDEX claudemesh.%I RENAME TO %I', n, n || '_old');
            END IF;
            EXECUTE format('ALTER INDEX claudemesh.%I RENAME TO %I', n || '_new', n);
        END IF;
    END LOOP;
END
$$;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_cwd_old;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_node_old;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_member_key_old;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_cwd_new;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_cwd_new ON claudemesh.presence (cwd, connected_at)
    WHERE ended_at IS NULL AND cwd IS NOT NULL;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_cwd;
-- +goose StatementEnd
-- +goose StatementBegin
ALTER INDEX claudemesh.presence_live_cwd_new RENAME TO presence_live_cwd;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_node_new;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_node_new ON claudemesh.presence (node_id)
    WHERE ended_at IS NULL AND node_id IS NOT NULL;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_node;
-- +goose StatementEnd
-- +goose StatementBegin
ALTER INDEX claudemesh.presence_live_node_new RENAME TO presence_live_node;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_member_key_new;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_member_key_new ON claudemesh.presence (mesh_id, member_pubkey)
    WHERE ended_at IS NULL AND member_pubkey IS NOT NULL;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_member_key;
-- +goose StatementEnd
-- +goose StatementBegin
ALTER INDEX claudemesh.presence_live_member_key_new RENAME TO presence_live_member_key;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_cwd;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_cwd ON claudemesh.presence (cwd, connected_at) WHERE ended_at IS NULL;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_node;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_node ON claudemesh.presence (node_id) WHERE ended_at IS NULL;
-- +goose StatementEnd
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_member_key;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_member_key ON claudemesh.presence (mesh_id, member_pubkey) WHERE ended_at IS NULL;
-- +goose StatementEnd
