package protocol

import (
	"crypto/ed25519"
	"encoding/json"
	"strconv"
	"time"
)

// The messages claudemesh's newest CLI (1.37.0, upstream commit 213a6b3) adds to the April
// protocol: a launched session's session_hello, and the admin operations kick, disconnect,
// ban, unban and list_bans. docs/protocol.md lists them with the upstream behaviour each
// matches and where this broker differs.

// Message types of today's CLI.
const (
	TypeSessionHello = "session_hello"
	TypeKick         = "kick"
	TypeDisconnect   = "disconnect"
	TypeBan          = "ban"
	TypeUnban        = "unban"
	TypeListBans     = "list_bans"
	TypeSetStats     = "set_stats"

	TypeKickAck        = "kick_ack"
	TypeDisconnectAck  = "disconnect_ack"
	TypeBanAck         = "ban_ack"
	TypeUnbanAck       = "unban_ack"
	TypeListBansResult = "list_bans_result"
)

// Peer roles in peers_list (peerRole).
const (
	RoleSession      = "session"       // a launched session (session_hello)
	RoleControlPlane = "control-plane" // a member's own connection (plain hello): daemon, CLI
)

// Channels the CLI names its connections with (hello.channel).
const (
	ChannelDaemon  = "claudemesh-daemon"
	ChannelSession = "claudemesh-session"
)

// Session hello refusals (session_hello), besides the hello codes.
const (
	CodeBadSessionPubkey       = "bad_session_pubkey"
	CodeBadParentPubkey        = "bad_parent_pubkey"
	CodeAttestationMismatch    = "attestation_mismatch"
	CodeExpired                = "expired"
	CodeTTLTooLong             = "ttl_too_long"
	CodeParentMemberIDMismatch = "parent_member_id_mismatch"
	// CodeClientMessageIDConflict refuses a send repeating a client_message_id with another
	// request_fingerprint: a different message under the same idempotency key.
	CodeClientMessageIDConflict = "client_message_id_conflict"
	// Admin operation refusals.
	CodeForbidden = "forbidden"
	CodeInvalid   = "invalid"
)

// MaxAttestationTTL is the longest a parent attestation may run (upstream: 24 h).
const MaxAttestationTTL = 24 * time.Hour

// Attestation is a member's signed statement that a session key is one of its sessions, until
// ExpiresAt (ms since the epoch).
type Attestation struct {
	SessionPubkey      string `json:"sessionPubkey"`
	ParentMemberPubkey string `json:"parentMemberPubkey"`
	ExpiresAt          int64  `json:"expiresAt"`
	Signature          string `json:"signature"`
}

// AttestationSigningString is what the member key signs:
// claudemesh-session-attest|parentMemberPubkey|sessionPubkey|expiresAt.
func AttestationSigningString(parentPubkey, sessionPubkey string, expiresAt int64) string {
	return "claudemesh-session-attest|" + parentPubkey + "|" + sessionPubkey + "|" + strconv.FormatInt(expiresAt, 10)
}

// SessionHelloSigningString is what the session key signs:
// claudemesh-session-hello|meshId|parentMemberPubkey|sessionPubkey|timestamp.
func SessionHelloSigningString(meshID, parentPubkey, sessionPubkey string, timestamp int64) string {
	return "claudemesh-session-hello|" + meshID + "|" + parentPubkey + "|" + sessionPubkey + "|" + strconv.FormatInt(timestamp, 10)
}

// SignAttestation has the member key attest sessionPubkey until expires.
func SignAttestation(member ed25519.PrivateKey, sessionPubkey string, expires time.Time) Attestation {
	parent := PubkeyHex(member.Public().(ed25519.PublicKey))
	a := Attestation{SessionPubkey: sessionPubkey, ParentMemberPubkey: parent, ExpiresAt: expires.UnixMilli()}
	a.Signature = SignHex(member, AttestationSigningString(parent, sessionPubkey, a.ExpiresAt))
	return a
}

// SessionHello authenticates a launched session: its own key signs the hello, and its
// member's key attests the session key.
type SessionHello struct {
	MeshID             string      `json:"meshId"`
	ParentMemberID     string      `json:"parentMemberId,omitempty"`
	ParentMemberPubkey string      `json:"parentMemberPubkey"`
	SessionPubkey      string      `json:"sessionPubkey"`
	ParentAttestation  Attestation `json:"parentAttestation"`
	DisplayName        string      `json:"displayName,omitempty"`
	SessionID          string      `json:"sessionId"`
	PID                int         `json:"pid"`
	CWD                string      `json:"cwd"`
	Hostname           string      `json:"hostname,omitempty"`
	PeerType           string      `json:"peerType,omitempty"`
	Channel            string      `json:"channel,omitempty"`
	Model              string      `json:"model,omitempty"`
	Groups             []Group     `json:"groups,omitempty"`
	Role               string      `json:"role,omitempty"` // informational; not used
	Timestamp          int64       `json:"timestamp"`
	Signature          string      `json:"signature"`
	ProtocolVersion    int         `json:"protocolVersion,omitempty"`
	Capabilities       []string    `json:"capabilities,omitempty"`
	ReqID              string      `json:"_reqId,omitempty"`
}

// SignSessionHello fills the hello's timestamp and signature with the session key.
func SignSessionHello(session ed25519.PrivateKey, h *SessionHello, now time.Time) {
	h.Timestamp = now.UnixMilli()
	h.Signature = SignHex(session, SessionHelloSigningString(h.MeshID, h.ParentMemberPubkey, h.SessionPubkey, h.Timestamp))
}

// Kick closes sessions of the mesh: by Target (a display name, a member key or a prefix of
// one), those silent for Stale ms, or All but the caller's. A kick closes with 4001 and skips
// control-plane connections; a disconnect (Disconnect) closes with 1000 and skips none.
type Kick struct {
	Target     string `json:"target,omitempty"`
	Stale      int64  `json:"stale,omitempty"`
	All        bool   `json:"all,omitempty"`
	Disconnect bool   `json:"-"`
	ReqID      string `json:"_reqId,omitempty"`
}

// Ban revokes a member (found by display name, key or key prefix) and closes its sessions
// with 4002.
type Ban struct {
	Target string `json:"target"`
	Reason string `json:"reason,omitempty"`
	ReqID  string `json:"_reqId,omitempty"`
}

// Unban restores a revoked member (found by display name or key).
type Unban struct {
	Target string `json:"target"`
	ReqID  string `json:"_reqId,omitempty"`
}

// ListBans asks for the mesh's revoked members.
type ListBans struct {
	ReqID string `json:"_reqId,omitempty"`
}

func (m *SessionHello) Type() string           { return TypeSessionHello }
func (m *SessionHello) RequestID() string      { return m.ReqID }
func (m *SessionHello) SetRequestID(id string) { m.ReqID = id }

func (m *Kick) Type() string {
	if m.Disconnect {
		return TypeDisconnect
	}
	return TypeKick
}
func (m *Kick) RequestID() string      { return m.ReqID }
func (m *Kick) SetRequestID(id string) { m.ReqID = id }

func (m *Ban) Type() string           { return TypeBan }
func (m *Ban) RequestID() string      { return m.ReqID }
func (m *Ban) SetRequestID(id string) { m.ReqID = id }

func (m *Unban) Type() string           { return TypeUnban }
func (m *Unban) RequestID() string      { return m.ReqID }
func (m *Unban) SetRequestID(id string) { m.ReqID = id }

// SetStats is the CLI's report of its session's counters (messages, tool calls, uptime), sent
// every 60 s with no reply expected. Upstream shows them in peers_list; this broker takes the
// message and keeps nothing. Refusing it (unknown_message_type, with no _reqId to match) made
// the CLI hand that error to whichever of its other requests was waiting for a reply.
type SetStats struct {
	ReqID string `json:"_reqId,omitempty"`
}

func (m *SetStats) Type() string           { return TypeSetStats }
func (m *SetStats) RequestID() string      { return m.ReqID }
func (m *SetStats) SetRequestID(id string) { m.ReqID = id }

func (m SetStats) MarshalJSON() ([]byte, error) {
	type wire SetStats
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeSetStats, wire(m)})
}

func (m *ListBans) Type() string           { return TypeListBans }
func (m *ListBans) RequestID() string      { return m.ReqID }
func (m *ListBans) SetRequestID(id string) { m.ReqID = id }

func (m SessionHello) MarshalJSON() ([]byte, error) {
	type wire SessionHello
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeSessionHello, wire(m)})
}

func (m Kick) MarshalJSON() ([]byte, error) {
	type wire Kick
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{m.Type(), wire(m)})
}

func (m Ban) MarshalJSON() ([]byte, error) {
	type wire Ban
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeBan, wire(m)})
}

func (m Unban) MarshalJSON() ([]byte, error) {
	type wire Unban
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeUnban, wire(m)})
}

func (m ListBans) MarshalJSON() ([]byte, error) {
	type wire ListBans
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeListBans, wire(m)})
}

// KickAck answers kick (kick_ack) and disconnect (disconnect_ack): the display names of the
// sessions closed (Kicked and Affected, the same list, as upstream sends both) and, for a kick,
// those left alone because they are control-plane connections.
type KickAck struct {
	Kicked              []string `json:"kicked"`
	Affected            []string `json:"affected"`
	SkippedControlPlane []string `json:"skipped_control_plane,omitempty"`
	Disconnect          bool     `json:"-"`
	ReqID               string   `json:"_reqId,omitempty"`
}

// BanAck answers ban with the banned member's display name.
type BanAck struct {
	Banned string `json:"banned"`
	ReqID  string `json:"_reqId,omitempty"`
}

// UnbanAck answers unban with the restored member's display name.
type UnbanAck struct {
	Unbanned string `json:"unbanned"`
	ReqID    string `json:"_reqId,omitempty"`
}

// BannedMember is one revoked member in list_bans_result.
type BannedMember struct {
	Name      string `json:"name"`
	Pubkey    string `json:"pubkey"`
	RevokedAt string `json:"revokedAt"`
}

// ListBansResult answers list_bans.
type ListBansResult struct {
	Bans  []BannedMember `json:"bans"` // encoded as [] when empty
	ReqID string         `json:"_reqId,omitempty"`
}

func (m *KickAck) Type() string {
	if m.Disconnect {
		return TypeDisconnectAck
	}
	return TypeKickAck
}
func (m *KickAck) RequestID() string { return m.ReqID }

func (m *BanAck) Type() string      { return TypeBanAck }
func (m *BanAck) RequestID() string { return m.ReqID }

func (m *UnbanAck) Type() string      { return TypeUnbanAck }
func (m *UnbanAck) RequestID() string { return m.ReqID }

func (m *ListBansResult) Type() string      { return TypeListBansResult }
func (m *ListBansResult) RequestID() string { return m.ReqID }

func (m KickAck) MarshalJSON() ([]byte, error) {
	type wire KickAck
	if m.Kicked == nil {
		m.Kicked = []string{}
	}
	m.Affected = m.Kicked
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{m.Type(), wire(m)})
}

func (m BanAck) MarshalJSON() ([]byte, error) {
	type wire BanAck
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeBanAck, wire(m)})
}

func (m UnbanAck) MarshalJSON() ([]byte, error) {
	type wire UnbanAck
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeUnbanAck, wire(m)})
}

func (m ListBansResult) MarshalJSON() ([]byte, error) {
	type wire ListBansResult
	if m.Bans == nil {
		m.Bans = []BannedMember{}
	}
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeListBansResult, wire(m)})
}

// IsLowerHexKey reports whether s is a key exactly as session_hello needs it: 64 lowercase
// hex characters (upstream's first two checks; uppercase is refused there too).
func IsLowerHexKey(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9') && !('a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// VerifyAttestation checks the attestation's signature by its parent key.
func VerifyAttestation(a Attestation) bool {
	return VerifyHex(a.ParentMemberPubkey, AttestationSigningString(a.ParentMemberPubkey, a.SessionPubkey, a.ExpiresAt), a.Signature)
}

// VerifySessionHello checks the session hello's signature by its session key.
func VerifySessionHello(h *SessionHello) bool {
	return VerifyHex(h.SessionPubkey, SessionHelloSigningString(h.MeshID, h.ParentMemberPubkey, h.SessionPubkey, h.Timestamp), h.Signature)
}
