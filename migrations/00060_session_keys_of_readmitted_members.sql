-- +goose Up
-- Session keys bound to a revoked member row whose key is a live member again (a key banned or
-- revoked and then enrolled anew, by an invite before /join refused revoked keys, or by
-- `broker member add`) go to the live row, as `member add` now hands them over: left on the
-- revoked row they made the readmitted member's hellos presenting them session_key_taken, and
-- sends to them no_recipient, for good. The same member key proved them.
UPDATE claudemesh.session_key k SET member_id = live.id
FROM claudemesh.member r
JOIN claudemesh.member live ON live.mesh_id = r.mesh_id AND live.pubkey = r.pubkey AND live.revoked_at IS NULL
WHERE k.member_id = r.id AND k.mesh_id = r.mesh_id AND r.revoked_at IS NOT NULL AND live.id <> r.id;

-- +goose Down
-- Nothing to undo: which revoked row each key was bound to is not kept, and the live row is
-- the one that proved it.
SELECT 1;
