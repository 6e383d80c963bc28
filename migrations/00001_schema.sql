-- +goose Up
-- Everything lives in its own schema so the broker can share a database with other apps.
CREATE SCHEMA IF NOT EXISTS claudemesh;

CREATE TABLE claudemesh.mesh (
    id           text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    slug         text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name         text NOT NULL,
    -- Only the owner's public key: the private key and the mesh root key stay on the operator's machine.
    owner_pubkey text NOT NULL CHECK (owner_pubkey ~ '^[0-9a-f]{64}$'),
    -- 0 means the broker's MAX_CONNECTIONS_PER_MESH.
    max_peers    integer NOT NULL DEFAULT 0 CHECK (max_peers >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    archived_at  timestamptz
);

CREATE TABLE claudemesh.member (
    id           text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    mesh_id      text NOT NULL REFERENCES claudemesh.mesh (id),
    pubkey       text NOT NULL CHECK (pubkey ~ '^[0-9a-f]{64}$'),
    display_name text NOT NULL DEFAULT '',
    role         text NOT NULL DEFAULT 'member' CHECK (role IN ('admin', 'member')),
    invite_id    text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
-- One live member per key and mesh; a revoked row stays for the record (hello answers "revoked").
CREATE UNIQUE INDEX member_live_pubkey ON claudemesh.member (mesh_id, pubkey) WHERE revoked_at IS NULL;
CREATE INDEX member_pubkey ON claudemesh.member (mesh_id, pubkey);

CREATE TABLE claudemesh.invite (
    id          text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    mesh_id     text NOT NULL REFERENCES claudemesh.mesh (id),
    token       text NOT NULL UNIQUE,
    payload     jsonb NOT NULL,
    role        text NOT NULL DEFAULT 'member' CHECK (role IN ('admin', 'member')),
    max_uses    integer NOT NULL DEFAULT 1 CHECK (max_uses > 0),
    used_count  integer NOT NULL DEFAULT 0 CHECK (used_count >= 0 AND used_count <= max_uses),
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE claudemesh.node (
    id           text PRIMARY KEY,
    region       text NOT NULL DEFAULT '',
    address      text NOT NULL DEFAULT '',
    version      text NOT NULL DEFAULT '',
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    -- Set on clean exit; dead_at when another replica declared it gone after a missed heartbeat.
    stopped_at   timestamptz,
    dead_at      timestamptz
);
CREATE INDEX node_alive ON claudemesh.node (heartbeat_at) WHERE stopped_at IS NULL AND dead_at IS NULL;

-- A session key is bound to the first member that presents it, forever.
CREATE TABLE claudemesh.session_key (
    mesh_id       text NOT NULL REFERENCES claudemesh.mesh (id),
    session_pubkey text NOT NULL CHECK (session_pubkey ~ '^[0-9a-f]{64}$'),
    member_id     text NOT NULL REFERENCES claudemesh.member (id),
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mesh_id, session_pubkey)
);

CREATE TABLE claudemesh.presence (
    id             text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    mesh_id        text NOT NULL REFERENCES claudemesh.mesh (id),
    member_id      text NOT NULL REFERENCES claudemesh.member (id),
    member_pubkey  text NOT NULL,
    node_id        text NOT NULL REFERENCES claudemesh.node (id),
    session_id     text NOT NULL,
    session_pubkey text,
    display_name   text NOT NULL DEFAULT '',
    pid            integer NOT NULL DEFAULT 0,
    cwd            text NOT NULL DEFAULT '',
    status         text NOT NULL DEFAULT 'idle' CHECK (status IN ('idle', 'working', 'dnd')),
    status_source  text NOT NULL DEFAULT 'manual' CHECK (status_source IN ('hook', 'manual', 'inferred')),
    status_at      timestamptz NOT NULL DEFAULT now(),
    summary        text NOT NULL DEFAULT '',
    groups         jsonb NOT NULL DEFAULT '[]',
    capabilities   text[] NOT NULL DEFAULT '{}',
    connected_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now(),
    -- Set while the session is in its reconnect grace: the socket is gone, the presence stays listed.
    grace_until    timestamptz,
    ended_at       timestamptz,
    -- Bumped by every registration of the session: a late record of an old socket's close
    -- must not touch a presence a newer socket has taken over.
    epoch          bigint NOT NULL DEFAULT 1
);
-- A presence is "live" until ended_at is set (it may be in grace). One live presence per member session.
CREATE UNIQUE INDEX presence_live_session ON claudemesh.presence (mesh_id, member_id, session_id) WHERE ended_at IS NULL;
CREATE INDEX presence_live_mesh ON claudemesh.presence (mesh_id, connected_at) WHERE ended_at IS NULL;
CREATE INDEX presence_live_node ON claudemesh.presence (node_id) WHERE ended_at IS NULL;
CREATE INDEX presence_live_session_key ON claudemesh.presence (mesh_id, session_pubkey) WHERE ended_at IS NULL AND session_pubkey IS NOT NULL;
CREATE INDEX presence_live_cwd ON claudemesh.presence (cwd, connected_at) WHERE ended_at IS NULL;
CREATE INDEX presence_grace ON claudemesh.presence (grace_until) WHERE ended_at IS NULL AND grace_until IS NOT NULL;

-- The ciphertext is stored once; recipients get one delivery row each.
-- envelope, delivery and audit take rows at message rate and carry no foreign keys: each
-- would fire a trigger per row, and every message of a mesh would share-lock the same mesh
-- row (MultiXacts under concurrency). Meshes and members are never deleted (archived,
-- revoked), so the ids can't dangle; old envelopes and their deliveries are deleted together.
CREATE TABLE claudemesh.envelope (
    id                   text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    mesh_id              text NOT NULL,
    sender_member_id     text NOT NULL,
    sender_pubkey        text NOT NULL,
    sender_member_pubkey text NOT NULL,
    target_spec          text NOT NULL,
    priority             text NOT NULL CHECK (priority IN ('now', 'next', 'low')),
    nonce                text NOT NULL,
    ciphertext           text NOT NULL,
    client_id            text NOT NULL DEFAULT '',
    created_at           timestamptz NOT NULL DEFAULT now(),
    expires_at           timestamptz NOT NULL
);
CREATE INDEX envelope_expires ON claudemesh.envelope (expires_at);

CREATE TABLE claudemesh.delivery (
    -- Identity order is per-recipient push order.
    id                       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    envelope_id              text NOT NULL,
    mesh_id                  text NOT NULL,
    recipient_member_id      text NOT NULL,
    -- NULL: any session of the member may take it. Set: only that session (by key or by session id).
    recipient_session_pubkey text,
    recipient_session_id     text,
    priority                 text NOT NULL CHECK (priority IN ('now', 'next', 'low')),
    state                    text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'pushed', 'acked', 'expired')),
    pushed_node              text,
    -- The session it was pushed to: a disconnect releases exactly its unacked pushes.
    pushed_presence          text,
    pushed_at                timestamptz,
    acked_at                 timestamptz,
    expires_at               timestamptz NOT NULL,
    created_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_open_recipient ON claudemesh.delivery (recipient_member_id, id) WHERE state IN ('pending', 'pushed');
CREATE INDEX delivery_pushed_node ON claudemesh.delivery (pushed_node) WHERE state = 'pushed';
CREATE INDEX delivery_pushed_presence ON claudemesh.delivery (pushed_presence) WHERE state = 'pushed';
CREATE INDEX delivery_envelope ON claudemesh.delivery (envelope_id);

-- Hook signals that arrived before the session's hello (the first-turn race).
CREATE TABLE claudemesh.pending_status (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cwd         text NOT NULL,
    pid         integer,
    session_id  text,
    status      text NOT NULL CHECK (status IN ('idle', 'working')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX pending_status_cwd ON claudemesh.pending_status (cwd, created_at);

CREATE TABLE claudemesh.state (
    mesh_id    text NOT NULL REFERENCES claudemesh.mesh (id),
    key        text NOT NULL,
    value      jsonb NOT NULL,
    updated_by text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mesh_id, key)
);

-- Per-mesh hash chain. The head row is locked by every append, so appends from any number of
-- replicas serialize per mesh and the chain never forks.
CREATE TABLE claudemesh.audit_head (
    mesh_id text PRIMARY KEY REFERENCES claudemesh.mesh (id),
    seq     bigint NOT NULL,
    hash    text NOT NULL
);

CREATE TABLE claudemesh.audit (
    mesh_id    text NOT NULL,
    seq        bigint NOT NULL,
    event_type text NOT NULL,
    actor      text NOT NULL DEFAULT '',
    data       jsonb NOT NULL DEFAULT '{}',
    -- Microseconds since the epoch: the exact value the hash covers.
    ts_micros  bigint NOT NULL,
    prev_hash  text NOT NULL,
    hash       text NOT NULL,
    PRIMARY KEY (mesh_id, seq)
);

-- +goose Down
DROP SCHEMA claudemesh CASCADE;
