-- The single-statement operations of migrations 00005 and 00007: each is one round trip that commits.

-- name: HookStatus :many
SELECT coalesce(h.presence_id, '')::text AS presence_id, h.pending::boolean AS pending, h.replayed::boolean AS replayed
FROM claudemesh.hook_status(@member_pubkey::text, @session_id::text, @pid::int, @cwd::text,
    @status::text, @fresh_seconds::float8, @ns::text, @release_limit::int, @signature::text, @sig_expires::timestamptz) h;

-- name: SetStatus :many
-- A peer's own status change (manual), with the release of what it held.
SELECT id, node_id, status FROM claudemesh.apply_status(@id::text, @status::text, @source::text,
    @fresh_seconds::float8, @ns::text, @release_limit::int);

-- name: AppendAudit :exec
SELECT claudemesh.audit_append(@mesh_ids::text[], @event_types::text[], @actors::text[], @datas::text[], @ts_micros::bigint[]);

-- name: EndSessions :one
SELECT claudemesh.end_sessions(@node_id::text, @ns::text, @grace_ids::text[], @grace_epochs::bigint[],
    @grace_until::timestamptz, @end_ids::text[], @end_epochs::bigint[])::int AS ended;

-- name: SetStateOne :many
SELECT mesh_id, key, value, updated_by, updated_at FROM claudemesh.set_state(@ns::text, @mesh_id::text, @key::text,
    @value::jsonb, @updated_by::text, @max_keys::bigint, @max_bytes::bigint, @presence_id::text, @actor::text,
    @audit_data::text);

-- name: SendBatch :many
-- Idempotent by client_message_id: a retry's row (x) names the stored envelope. A row (f) counts
-- the recipients left out because what waits for them is at the bound (00046).
SELECT b.row_kind::text AS row_kind, b.idx::int AS idx, coalesce(b.queued, false)::boolean AS queued,
    coalesce(b.recipients, 0)::int AS recipients, coalesce(b.delivery_id, 0)::bigint AS delivery_id,
    coalesce(b.presence_id, '')::text AS presence_id, coalesce(b.assigned, false)::boolean AS assigned,
    coalesce(b.original, '')::text AS original, coalesce(b.fingerprint, '')::text AS fingerprint
FROM claudemesh.send_batch_capped(@node_id::text, @ns::text,
    @e_ids::text[], @e_mesh::text[], @e_sender::text[], @e_sender_pub::text[], @e_sender_member_pub::text[],
    @e_spec::text[], @e_kind::text[], @e_key::text[], @e_prio::text[], @e_nonce::text[], @e_cipher::text[],
    @e_client::text[], @e_created::timestamptz[], @e_expires::timestamptz[],
    @e_cmid::text[], @e_fp::text[], @e_sender_name::text[], @e_frame::text[]) b;

-- name: HelloBatch :many
-- Plain hellos (role control-plane) and session_hellos (role session), registered in one
-- statement; failure is set for one that failed with an error (code 'failed').
SELECT h.idx::int AS idx, h.code::text AS code, coalesce(h.presence_id, '')::text AS presence_id,
    coalesce(h.status, '')::text AS status, coalesce(h.epoch, 0)::bigint AS epoch,
    coalesce(h.old_node, '')::text AS old_node, coalesce(h.resumed, false)::boolean AS resumed,
    coalesce(h.display_name, '')::text AS display_name, coalesce(h.max_sessions, 0)::int AS max_sessions,
    coalesce(h.member_id, '')::text AS member_id, coalesce(h.failure, '')::text AS failure
FROM claudemesh.hello_batch(@node_id::text, @ns::text, @default_limit::int, @h_mesh::text[], @h_member_id::text[],
    @h_pubkey::text[], @h_session_id::text[], @h_session_pubkey::text[], @h_display_name::text[], @h_pid::int[],
    @h_cwd::text[], @h_groups::jsonb[], @h_caps::jsonb[], @h_signature::text[], @h_sig_expires::timestamptz[],
    @h_local_live::boolean[], @h_role::text[], @h_hostname::text[], @h_peer_type::text[], @h_channel::text[],
    @h_model::text[]) h;

-- name: HelloWaiting :many
-- The hellos of a batch (by position, from 1) whose member has deliveries waiting to be
-- claimed (migration 00039). store.Hellos sends it after the batch's COMMIT, in the same
-- flight and a transaction of its own, so it sees every send committed by then (see
-- handleHello for the one it cannot see).
SELECT w::int AS idx FROM claudemesh.hello_waiting(@h_mesh::text[], @h_pubkey::text[]) AS w;

-- name: Kick :many
SELECT k.code::text AS code, coalesce(k.name, '')::text AS name, coalesce(k.skipped, false)::boolean AS skipped
FROM claudemesh.kick(@ns::text, @mesh_id::text, @caller_member::text, @caller_presence::text, @actor::text,
    @target::text, @stale_ms::bigint, @all_sessions::boolean, @skip_control::boolean, @close_code::int,
    @close_reason::text) k;

-- name: Ban :one
SELECT b.code::text AS code, coalesce(b.name, '')::text AS name
FROM claudemesh.ban(@ns::text, @mesh_id::text, @caller_member::text, @actor::text, @target::text) b;

-- name: Unban :one
SELECT b.code::text AS code, coalesce(b.name, '')::text AS name
FROM claudemesh.unban(@mesh_id::text, @caller_member::text, @actor::text, @target::text) b;

-- name: ListBans :many
SELECT b.code::text AS code, coalesce(b.name, '')::text AS name, coalesce(b.pubkey, '')::text AS pubkey,
    coalesce(b.revoked_at, 'epoch')::timestamptz AS revoked_at
FROM claudemesh.list_bans(@mesh_id::text, @caller_member::text, @max_rows::int) b;

-- name: SweepBacklog :many
-- Adds the rows that began waiting since the last sweep to their members' estimates and counts
-- the members that may be at the bound; returns a row with no member when it ran, then the
-- members that reached the bound or fell below it (00046).
SELECT coalesce(b.member_id, '')::text AS member_id, coalesce(b.mesh_id, '')::text AS mesh_id,
    coalesce(b.waiting, 0)::int AS waiting, coalesce(b.at_bound, false)::boolean AS at_bound
FROM claudemesh.sweep_backlog(@max_waiting::int, @scan::int, @gap_seconds::float8) b;
