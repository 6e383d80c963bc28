package protocol

import "time"

// Message types sent by peers (client → broker).
const (
	TypeHello         = "hello"
	TypeSend          = "send"
	TypeClientAck     = "client_ack" // (ext)
	TypeListPeers     = "list_peers"
	TypeSetStatus     = "set_status"
	TypeSetSummary    = "set_summary"
	TypeJoinGroup     = "join_group"
	TypeLeaveGroup    = "leave_group"
	TypeSetState      = "set_state"
	TypeGetState      = "get_state"
	TypeListState     = "list_state"
	TypeMessageStatus = "message_status"
)

// Message types sent by the broker (broker → client).
const (
	TypeHelloAck            = "hello_ack"
	TypeAck                 = "ack"
	TypePush                = "push"
	TypePeersList           = "peers_list"
	TypeStateChange         = "state_change"
	TypeStateResult         = "state_result"
	TypeStateList           = "state_list"
	TypeMessageStatusResult = "message_status_result"
	TypeError               = "error"
)

// Priority is a send's urgency; it decides whether the recipient's status
// holds the message (see the priority gate in protocol.md).
type Priority string

// Priorities.
const (
	PriorityNow  Priority = "now"  // delivered in every status
	PriorityNext Priority = "next" // held while working or dnd
	PriorityLow  Priority = "low"  // held while working or dnd
)

// Valid reports whether p is one of the wire priorities.
func (p Priority) Valid() bool {
	return p == PriorityNow || p == PriorityNext || p == PriorityLow
}

// Status is a session's availability.
type Status string

// Statuses.
const (
	StatusIdle    Status = "idle"
	StatusWorking Status = "working"
	StatusDND     Status = "dnd"
)

// Valid reports whether s is one of the wire statuses.
func (s Status) Valid() bool {
	return s == StatusIdle || s == StatusWorking || s == StatusDND
}

// RecipientState is one recipient's delivery state in message_status_result.
type RecipientState string

// Recipient states.
const (
	RecipientDelivered    RecipientState = "delivered"
	RecipientHeld         RecipientState = "held"
	RecipientDisconnected RecipientState = "disconnected"
)

// Member roles carried by invites.
const (
	RoleAdmin  = "admin"
	RoleMember = "member"
)

// Capabilities a peer may list in hello (ext). Unknown ones are ignored.
const (
	// CapClientAck: pushes stay unacknowledged until client_ack and are
	// re-sent (same messageId) when the peer reconnects.
	CapClientAck = "client_ack"
	// CapSystemEvents: the peer receives system pushes (peer_joined, ...).
	CapSystemEvents = "system_events"
)

// System pushes (ext, capability system_events).
const (
	SubtypeSystem   = "system" // Push.Subtype of a broker-originated event
	SenderSystem    = "system" // Push.SenderPubkey of a system push
	EventPeerJoined = "peer_joined"
	EventPeerLeft   = "peer_left" // sent after the reconnect grace window
	EventPeerStatus = "peer_status"
)

// WebSocket close codes used by the broker.
const (
	// CloseSessionReplaced (1000, reason "session_replaced"): a newer hello
	// with the same member, mesh and sessionId took this session. The client
	// must not reconnect this socket.
	CloseSessionReplaced = 1000
	// CloseGoingAway (1001): the broker is going away without a drain;
	// reconnect.
	CloseGoingAway = 1001
	// CloseHelloRefused (1008, policy violation): the hello was refused; an
	// error frame with the reason precedes it. Fix credentials, don't retry.
	CloseHelloRefused = 1008
	// CloseTooLarge (1009): a frame exceeded MAX_MESSAGE_BYTES.
	CloseTooLarge = 1009
	// CloseTryAgainLater (1013, ext): a hello refused overloaded or
	// rate_limited, or a send batch whose outcome is unknown
	// (send_outcome_unknown); reconnect after a short backoff.
	CloseTryAgainLater = 1013
	// CloseDraining (1012, service restart): the replica is draining;
	// reconnect at once to any replica, the presence is kept in grace.
	CloseDraining = 1012
	// CloseKicked (4001): an admin kicked the session; the client exits.
	CloseKicked = 4001
	// CloseRevoked (4002): the member was revoked; the client exits.
	CloseRevoked = 4002
	// CloseSlowConsumer (4008, ext): the session's send queue overflowed;
	// reconnect, held and unacknowledged messages are kept.
	CloseSlowConsumer = 4008
)

// CloseReasonSessionReplaced is the close reason sent with
// CloseSessionReplaced.
const CloseReasonSessionReplaced = "session_replaced"

// Limits. Lengths are in bytes, measured after JSON unescaping. Frames are
// bounded by the transport (MAX_MESSAGE_BYTES), which also bounds the
// fields without their own limit (nonce, ciphertext, set_state value, and
// the hello keys and signature, whose length the broker reports as
// malformed rather than bad_request).
const (
	// DefaultMaxMessageBytes is the default MAX_MESSAGE_BYTES.
	DefaultMaxMessageBytes = 65536
	// MaxIDLen bounds ids: meshId, memberId, sessionId, messageId,
	// brokerMessageId(s), send id and _reqId.
	MaxIDLen = 256
	// MaxDisplayNameLen bounds displayName and /join display_name.
	MaxDisplayNameLen = 256
	// MaxCWDLen bounds cwd. Postgres indexes it (a session's and a waiting hook signal's),
	// and a btree entry holds at most 2,704 bytes, 2,684 of them a text that does not compress:
	// a longer cwd (PATH_MAX is 4096) failed its whole statement, a batch of other meshes'
	// hellos with it.
	MaxCWDLen = 2048
	// MaxSummaryLen bounds set_summary's summary.
	MaxSummaryLen = 8192
	// MaxTargetSpecLen bounds send's targetSpec (a key is 64, "@" + group
	// name at most 129).
	MaxTargetSpecLen = 256
	// MaxGroupNameLen bounds a group name; names are also non-empty and
	// contain no whitespace or control characters.
	MaxGroupNameLen = 128
	// MaxRoleLen bounds a group role.
	MaxRoleLen = 64
	// MaxStateKeyLen bounds a shared-state key.
	MaxStateKeyLen = 256
	// MaxGroups bounds hello's groups list.
	MaxGroups = 64
	// MaxCapabilities bounds hello's capabilities list; each entry is at
	// most MaxCapabilityLen.
	MaxCapabilities  = 32
	MaxCapabilityLen = 64
	// MaxAckIDs bounds client_ack's brokerMessageIds list.
	MaxAckIDs = 1024
	// MaxFields bounds the number of members of one JSON object, so that a
	// frame of many unknown fields costs no more than a few lookups.
	MaxFields = 128
	// MaxDepth bounds the nesting of JSON values (a set_state value, an
	// unknown field).
	MaxDepth = 128
	// MaxNumberExponent bounds the exponent of a number in a set_state value. Postgres stores
	// numbers as numeric, which writes every digit back (1e131000 is 131,001 bytes of text), so
	// a short frame could make it render hundreds of megabytes. A double spans 4.9e-324 to
	// 1.8e308, so no JSON encoder working from doubles (JavaScript, Go, Python) writes an
	// exponent beyond ±324; 400 leaves room for an unnormalized mantissa (0.001e310).
	MaxNumberExponent = 400
	// MaxHookTokenLen bounds /hook/set-status hook_token.
	MaxHookTokenLen = 256
	// MaxInviteTokenLen bounds an invite token or link.
	MaxInviteTokenLen = 8192
)

// HelloMaxSkew is how far a hello's timestamp may be from the broker clock.
const HelloMaxSkew = 60 * time.Second

// FormatTime formats t as the wire's RFC 3339 UTC timestamps (createdAt,
// connectedAt, updatedAt, deliveredAt), with milliseconds like JavaScript's
// Date.toISOString, which existing peers parse.
func FormatTime(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000Z07:00")
}
