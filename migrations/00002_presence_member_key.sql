-- +goose NO TRANSACTION
-- +goose Up
-- Send planning finds a direct recipient's live sessions by (mesh, member pubkey) instead of
-- reading every live presence of the mesh. Built concurrently: presence is written by every
-- hello and must stay writable while a rolling deploy migrates.
-- An interrupted concurrent build leaves an INVALID index behind and the version unrecorded;
-- dropping first makes the retry build it properly instead of skipping it.
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_member_key;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE INDEX CONCURRENTLY presence_live_member_key
    ON claudemesh.presence (mesh_id, member_pubkey) WHERE ended_at IS NULL;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP INDEX CONCURRENTLY IF EXISTS claudemesh.presence_live_member_key;
-- +goose StatementEnd
