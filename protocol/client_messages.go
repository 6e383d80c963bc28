package protocol

import (
	"encoding/json"
	"slices"
)

// ClientMessage is a decoded client → broker message. It is implemented by
// the pointer types below (*Hello, *Send, ...); switch on the concrete type.
type ClientMessage interface {
	// MarshalJSON writes the wire form, "type" included.
	json.Marshaler
	// Type is the wire type, e.g. "send".
	Type() string
	// RequestID is the message's _reqId, "" when absent.
	RequestID() string
	// SetRequestID sets _reqId; clients use it to correlate replies.
	SetRequestID(id string)
}

// Group is a group membership: a name and an optional free-form role.
type Group struct {
	Name string `json:"name"`
	Role string `json:"role,omitempty"`
}

// Hello authenticates a session; it must be the first message.
type Hello struct {
	MeshID   string `json:"meshId"`
	MemberID string `json:"memberId"`
	// Pubkey is the member's ed25519 key as sent (hex, any case). The
	// signature covers this exact string: normalise only after verifying.
	Pubkey string `json:"pubkey"`
	// SessionPubkey is the optional per-session routing key ("" = none).
	SessionPubkey string  `json:"sessionPubkey,omitempty"`
	DisplayName   string  `json:"displayName,omitempty"`
	SessionID     string  `json:"sessionId"`
	PID           int     `json:"pid"`
	CWD           string  `json:"cwd"`
	Groups        []Group `json:"groups,omitempty"`
	// Timestamp is ms since the Unix epoch, signed as decimal.
	Timestamp int64 `json:"timestamp"`
	// Signature is hex ed25519 over HelloSigningString, as sent.
	Signature       string   `json:"signature"`
	ProtocolVersion int      `json:"protocolVersion,omitempty"` // (ext)
	Capabilities    []string `json:"capabilities,omitempty"`    // (ext)
	// What today's CLI says about the connection (ext, stored and listed by list_peers).
	Hostname string `json:"hostname,omitempty"`
	PeerType string `json:"peerType,omitempty"`
	Channel  string `json:"channel,omitempty"`
	Model    string `json:"model,omitempty"`
	ReqID    string `json:"_reqId,omitempty"`
}

// HasCapability reports whether the hello lists capability c.
func (m *Hello) HasCapability(c string) bool { return slices.Contains(m.Capabilities, c) }

// Verify reports whether the hello's signature verifies against its own
// pubkey over the canonical string. It does not check the timestamp.
func (m *Hello) Verify() bool {
	return VerifyHello(m.MeshID, m.MemberID, m.Pubkey, m.Timestamp, m.Signature)
}

// Send is an end-to-end encrypted envelope for a target.
type Send struct {
	TargetSpec string   `json:"targetSpec"`
	Priority   Priority `json:"priority"`
	// Nonce and Ciphertext are opaque to the broker: never decode or log.
	Nonce      string `json:"nonce"`
	Ciphertext string `json:"ciphertext"`
	// ID is the client's correlation id, echoed in the ack ("" when absent).
	ID string `json:"id,omitempty"`
	// ClientMessageID (ext, today's CLI) makes the send idempotent: a repeat by the same
	// member within the message TTL is acked with the first messageId and stored once. It is
	// echoed in the pushes, with RequestFingerprint.
	ClientMessageID    string `json:"client_message_id,omitempty"`
	RequestFingerprint string `json:"request_fingerprint,omitempty"`
	ReqID              string `json:"_reqId,omitempty"`
}

// ClientAck (ext) acknowledges pushes by messageId. Peers send either one id
// or a list; use IDs to get them all.
type ClientAck struct {
	BrokerMessageID  string   `json:"brokerMessageId,omitempty"`
	BrokerMessageIDs []string `json:"brokerMessageIds,omitempty"`
	// ClientMessageID is what today's CLI sends beside brokerMessageId (the push's
	// client_message_id); an ack carrying only it acknowledges nothing here.
	ClientMessageID string `json:"clientMessageId,omitempty"`
	ReqID           string `json:"_reqId,omitempty"`
}

// IDs returns every acknowledged id, the single one first.
func (m *ClientAck) IDs() []string {
	if m.BrokerMessageID == "" {
		return m.BrokerMessageIDs
	}
	return append([]string{m.BrokerMessageID}, m.BrokerMessageIDs...)
}

// ListPeers asks for peers_list.
type ListPeers struct {
	ReqID string `json:"_reqId,omitempty"`
}

// SetStatus is a manual status change.
type SetStatus struct {
	Status Status `json:"status"`
	ReqID  string `json:"_reqId,omitempty"`
}

// SetSummary sets the session's human-readable summary ("" clears it).
type SetSummary struct {
	Summary string `json:"summary"`
	ReqID   string `json:"_reqId,omitempty"`
}

// JoinGroup joins a group with an optional role.
type JoinGroup struct {
	Name  string `json:"name"`
	Role  string `json:"role,omitempty"`
	ReqID string `json:"_reqId,omitempty"`
}

// LeaveGroup leaves a group.
type LeaveGroup struct {
	Name  string `json:"name"`
	ReqID string `json:"_reqId,omitempty"`
}

// SetState sets a mesh-wide key to any JSON value (compacted; "null" is a
// value too).
type SetState struct {
	Key   string          `json:"key"`
	Value json.RawMessage `json:"value"`
	ReqID string          `json:"_reqId,omitempty"`
}

// GetState asks for one key (state_result).
type GetState struct {
	Key   string `json:"key"`
	ReqID string `json:"_reqId,omitempty"`
}

// ListState asks for every key (state_list).
type ListState struct {
	ReqID string `json:"_reqId,omitempty"`
}

// MessageStatus asks for a sent message's delivery state.
type MessageStatus struct {
	MessageID string `json:"messageId"`
	ReqID     string `json:"_reqId,omitempty"`
}

// Type, RequestID and SetRequestID implement ClientMessage.

func (m *Hello) Type() string           { return TypeHello }
func (m *Hello) RequestID() string      { return m.ReqID }
func (m *Hello) SetRequestID(id string) { m.ReqID = id }

func (m *Send) Type() string           { return TypeSend }
func (m *Send) RequestID() string      { return m.ReqID }
func (m *Send) SetRequestID(id string) { m.ReqID = id }

func (m *ClientAck) Type() string           { return TypeClientAck }
func (m *ClientAck) RequestID() string      { return m.ReqID }
func (m *ClientAck) SetRequestID(id string) { m.ReqID = id }

func (m *ListPeers) Type() string           { return TypeListPeers }
func (m *ListPeers) RequestID() string      { return m.ReqID }
func (m *ListPeers) SetRequestID(id string) { m.ReqID = id }

func (m *SetStatus) Type() string           { return TypeSetStatus }
func (m *SetStatus) RequestID() string      { return m.ReqID }
func (m *SetStatus) SetRequestID(id string) { m.ReqID = id }

func (m *SetSummary) Type() string           { return TypeSetSummary }
func (m *SetSummary) RequestID() string      { return m.ReqID }
func (m *SetSummary) SetRequestID(id string) { m.ReqID = id }

func (m *JoinGroup) Type() string           { return TypeJoinGroup }
func (m *JoinGroup) RequestID() string      { return m.ReqID }
func (m *JoinGroup) SetRequestID(id string) { m.ReqID = id }

func (m *LeaveGroup) Type() string           { return TypeLeaveGroup }
func (m *LeaveGroup) RequestID() string      { return m.ReqID }
func (m *LeaveGroup) SetRequestID(id string) { m.ReqID = id }

func (m *SetState) Type() string           { return TypeSetState }
func (m *SetState) RequestID() string      { return m.ReqID }
func (m *SetState) SetRequestID(id string) { m.ReqID = id }

func (m *GetState) Type() string           { return TypeGetState }
func (m *GetState) RequestID() string      { return m.ReqID }
func (m *GetState) SetRequestID(id string) { m.ReqID = id }

func (m *ListState) Type() string           { return TypeListState }
func (m *ListState) RequestID() string      { return m.ReqID }
func (m *ListState) SetRequestID(id string) { m.ReqID = id }

func (m *MessageStatus) Type() string           { return TypeMessageStatus }
func (m *MessageStatus) RequestID() string      { return m.ReqID }
func (m *MessageStatus) SetRequestID(id string) { m.ReqID = id }

// MarshalJSON methods write the wire form with its "type" first. Each
// embeds a method-less copy of the struct so encoding/json does not recurse.

func (m Hello) MarshalJSON() ([]byte, error) {
	type wire Hello
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeHello, wire(m)})
}

func (m ClientAck) MarshalJSON() ([]byte, error) {
	type wire ClientAck
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeClientAck, wire(m)})
}

func (m ListPeers) MarshalJSON() ([]byte, error) {
	type wire ListPeers
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeListPeers, wire(m)})
}

func (m SetStatus) MarshalJSON() ([]byte, error) {
	type wire SetStatus
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeSetStatus, wire(m)})
}

func (m SetSummary) MarshalJSON() ([]byte, error) {
	type wire SetSummary
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeSetSummary, wire(m)})
}

func (m JoinGroup) MarshalJSON() ([]byte, error) {
	type wire JoinGroup
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeJoinGroup, wire(m)})
}

func (m LeaveGroup) MarshalJSON() ([]byte, error) {
	type wire LeaveGroup
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeLeaveGroup, wire(m)})
}

func (m SetState) MarshalJSON() ([]byte, error) {
	type wire SetState
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeSetState, wire(m)})
}

func (m GetState) MarshalJSON() ([]byte, error) {
	type wire GetState
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeGetState, wire(m)})
}

func (m ListState) MarshalJSON() ([]byte, error) {
	type wire ListState
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeListState, wire(m)})
}

func (m MessageStatus) MarshalJSON() ([]byte, error) {
	type wire MessageStatus
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeMessageStatus, wire(m)})
}
