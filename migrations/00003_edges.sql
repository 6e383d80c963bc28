-- +goose Up
-- Signed requests seen within their skew window (hellos, signed hooks): a captured one
-- replayed on another socket or replica is refused. Rows outlive their window by a margin and
-- are swept.
CREATE TABLE claudemesh.seen_signature (
    signature  text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX seen_signature_expires ON claudemesh.seen_signature (expires_at);

-- A signed hook's signal waiting for its session's hello applies only to that member.
ALTER TABLE claudemesh.pending_status ADD COLUMN member_pubkey text;

-- Shared-state quotas add up what each entry costs; computing it once per write keeps the
-- quota check from re-serializing every value of the mesh.
ALTER TABLE claudemesh.state
    ADD COLUMN size integer GENERATED ALWAYS AS (octet_length(key) + octet_length(value::text)) STORED NOT NULL;

-- +goose Down
ALTER TABLE claudemesh.state DROP COLUMN size;
ALTER TABLE claudemesh.pending_status DROP COLUMN member_pubkey;
DROP TABLE claudemesh.seen_signature;
