-- +goose Up
-- The one definition of which pending deliveries a session may take now: its member's, meant
-- for any of its sessions or for this one (by session key or id), unexpired, and of a held
-- priority only when it may be interrupted. The claim and the catch-up poll both call it; it
-- is a plain SQL expression, so Postgres inlines it and the indexes still apply.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.claimable(d claudemesh.delivery, member_id text, session_pubkey text,
                                     session_id text, include_held boolean)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT d.recipient_member_id = member_id AND d.state = 'pending'
       AND (d.recipient_session_pubkey IS NULL OR d.recipient_session_pubkey = session_pubkey)
       AND (d.recipient_session_id IS NULL OR d.recipient_session_id = session_id)
       AND d.expires_at > now()
       AND (include_held OR d.priority = 'now')
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION claudemesh.claimable(claudemesh.delivery, text, text, text, boolean);
