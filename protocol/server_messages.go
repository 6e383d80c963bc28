package protocol

import (
	"encoding/json"
	"fmt"
)

// ServerMessage is a broker → client message. It is implemented by the
// pointer types below and by *Error.
type ServerMessage interface {
	// MarshalJSON writes the wire form, "type" included.
	json.Marshaler
	// Type is the wire type, e.g. "ack".
	Type() string
	// RequestID is the _reqId this message replies to, "" for unsolicited
	// messages (push, state_change).
	RequestID() string
}

// HelloAck accepts a hello. It is sent once the session is registered.
type HelloAck struct {
	PresenceID        string `json:"presenceId"`
	MemberDisplayName string `json:"memberDisplayName"`
	// Resumed (ext): a presence in its reconnect grace was taken over.
	Resumed bool   `json:"resumed,omitempty"`
	ReqID   string `json:"_reqId,omitempty"`
}

// Ack answers a send. Queued is true only once the envelope is durably
// stored; when false, Error holds the refusal code (CodeNoRecipient,
// CodeTooLarge, CodeRateLimited, CodeRecipientFull).
type Ack struct {
	ID        string `json:"id"` // the send's id, or ""
	MessageID string `json:"messageId"`
	Queued    bool   `json:"queued"`
	Error     string `json:"error,omitempty"`
	// Duplicate (ext): the send repeated a client_message_id; MessageID is the first's.
	Duplicate bool   `json:"duplicate,omitempty"`
	ReqID     string `json:"_reqId,omitempty"`
}

// Push delivers an envelope, or (ext) a system event when Subtype is
// SubtypeSystem.
type Push struct {
	MessageID string `json:"messageId"`
	MeshID    string `json:"meshId"`
	// SenderPubkey is the sender's session key if it has one, else its
	// member key; SenderSystem for system pushes.
	SenderPubkey       string   `json:"senderPubkey"`
	SenderMemberPubkey string   `json:"senderMemberPubkey,omitempty"` // (ext)
	Priority           Priority `json:"priority"`
	// Nonce and Ciphertext are opaque: never decode or log.
	Nonce      string `json:"nonce"`
	Ciphertext string `json:"ciphertext"`
	CreatedAt  string `json:"createdAt"` // RFC 3339 UTC, see FormatTime
	// System event fields (ext).
	Subtype   string          `json:"subtype,omitempty"`
	Event     string          `json:"event,omitempty"`
	EventData json.RawMessage `json:"eventData,omitempty"`
	// Today's CLI (ext): the sender's client_message_id and request_fingerprint echoed; the
	// sender's name and member id on multicasts.
	ClientMessageID    string `json:"client_message_id,omitempty"`
	RequestFingerprint string `json:"request_fingerprint,omitempty"`
	SenderName         string `json:"senderName,omitempty"`
	SenderMemberID     string `json:"senderMemberId,omitempty"`
}

// IsSystem reports whether p is a broker-originated system event.
func (p *Push) IsSystem() bool { return p.Subtype == SubtypeSystem }

// Peer is one live session in peers_list.
type Peer struct {
	// Pubkey is the session key if set, else the member key.
	Pubkey      string  `json:"pubkey"`
	DisplayName string  `json:"displayName"`
	Status      Status  `json:"status"`
	Summary     string  `json:"summary"`
	Groups      []Group `json:"groups"` // encoded as [] when empty
	SessionID   string  `json:"sessionId"`
	ConnectedAt string  `json:"connectedAt"`
	// Today's CLI (ext): the member's key, the connection's role (session or control-plane)
	// and what its hello said about it.
	MemberPubkey string `json:"memberPubkey,omitempty"`
	PeerRole     string `json:"peerRole,omitempty"`
	CWD          string `json:"cwd,omitempty"`
	Hostname     string `json:"hostname,omitempty"`
	PeerType     string `json:"peerType,omitempty"`
	Channel      string `json:"channel,omitempty"`
	Model        string `json:"model,omitempty"`
}

// PeersList answers list_peers: every live session of the mesh on every
// replica, the caller included, oldest first.
type PeersList struct {
	Peers []Peer `json:"peers"` // encoded as [] when empty
	ReqID string `json:"_reqId,omitempty"`
}

// StateChange tells the other sessions of the mesh that a key changed.
type StateChange struct {
	Key       string          `json:"key"`
	Value     json.RawMessage `json:"value"` // nil encodes as null
	UpdatedBy string          `json:"updatedBy"`
}

// StateResult answers get_state; a missing key has Value null and empty
// UpdatedBy and UpdatedAt.
type StateResult struct {
	Key       string          `json:"key"`
	Value     json.RawMessage `json:"value"`
	UpdatedBy string          `json:"updatedBy"`
	UpdatedAt string          `json:"updatedAt"`
	ReqID     string          `json:"_reqId,omitempty"`
}

// StateEntry is one key of state_list.
type StateEntry struct {
	Key       string          `json:"key"`
	Value     json.RawMessage `json:"value"`
	UpdatedBy string          `json:"updatedBy"`
	UpdatedAt string          `json:"updatedAt"`
}

// StateList answers list_state.
type StateList struct {
	Entries []StateEntry `json:"entries"` // encoded as [] when empty
	// Truncated (ext): entries beyond the mesh's quota were left out.
	Truncated bool   `json:"truncated,omitempty"`
	ReqID     string `json:"_reqId,omitempty"`
}

// RecipientStatus is one recipient of a sent message.
type RecipientStatus struct {
	Name   string         `json:"name"`
	Pubkey string         `json:"pubkey"`
	Status RecipientState `json:"status"`
}

// MessageStatusResult answers message_status from the real per-recipient
// delivery state.
type MessageStatusResult struct {
	MessageID  string `json:"messageId"`
	TargetSpec string `json:"targetSpec"`
	Delivered  bool   `json:"delivered"`
	// DeliveredAt is RFC 3339 UTC; "" is sent as null, as claudemesh does.
	DeliveredAt string            `json:"deliveredAt"`
	Recipients  []RecipientStatus `json:"recipients"` // encoded as [] when empty
	ReqID       string            `json:"_reqId,omitempty"`
}

// Type and RequestID implement ServerMessage.

func (m *HelloAck) Type() string                 { return TypeHelloAck }
func (m *HelloAck) RequestID() string            { return m.ReqID }
func (m *Ack) Type() string                      { return TypeAck }
func (m *Ack) RequestID() string                 { return m.ReqID }
func (m *Push) Type() string                     { return TypePush }
func (m *Push) RequestID() string                { return "" }
func (m *PeersList) Type() string                { return TypePeersList }
func (m *PeersList) RequestID() string           { return m.ReqID }
func (m *StateChange) Type() string              { return TypeStateChange }
func (m *StateChange) RequestID() string         { return "" }
func (m *StateResult) Type() string              { return TypeStateResult }
func (m *StateResult) RequestID() string         { return m.ReqID }
func (m *StateList) Type() string                { return TypeStateList }
func (m *StateList) RequestID() string           { return m.ReqID }
func (m *MessageStatusResult) Type() string      { return TypeMessageStatusResult }
func (m *MessageStatusResult) RequestID() string { return m.ReqID }

// MarshalJSON methods write the wire form with its "type" first.

func (m HelloAck) MarshalJSON() ([]byte, error) {
	type wire HelloAck
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeHelloAck, wire(m)})
}

func (m Ack) MarshalJSON() ([]byte, error) {
	type wire Ack
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeAck, wire(m)})
}

func (m PeersList) MarshalJSON() ([]byte, error) {
	// Existing peers call peers.map and peer.groups.map: never send null.
	if m.Peers == nil {
		m.Peers = []Peer{}
	}
	for i := range m.Peers {
		if m.Peers[i].Groups == nil {
			peers := make([]Peer, len(m.Peers))
			copy(peers, m.Peers)
			for j := range peers {
				if peers[j].Groups == nil {
					peers[j].Groups = []Group{}
				}
			}
			m.Peers = peers
			break
		}
	}
	type wire PeersList
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypePeersList, wire(m)})
}

func (m StateChange) MarshalJSON() ([]byte, error) {
	type wire StateChange
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeStateChange, wire(m)})
}

func (m StateResult) MarshalJSON() ([]byte, error) {
	type wire StateResult
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeStateResult, wire(m)})
}

func (m StateList) MarshalJSON() ([]byte, error) {
	if m.Entries == nil {
		m.Entries = []StateEntry{}
	}
	type wire StateList
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeStateList, wire(m)})
}

func (m MessageStatusResult) MarshalJSON() ([]byte, error) {
	if m.Recipients == nil {
		m.Recipients = []RecipientStatus{}
	}
	var deliveredAt *string
	if m.DeliveredAt != "" {
		deliveredAt = &m.DeliveredAt
	}
	type wire MessageStatusResult
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
		DeliveredAt *string `json:"deliveredAt"` // shadows wire.DeliveredAt
	}{TypeMessageStatusResult, wire(m), deliveredAt})
}

// Encode returns the wire form of a message (client or broker), with its
// "type". Calling the message's MarshalJSON directly saves the validation
// pass that json.Marshal makes over a Marshaler's output, which matters for
// pushes carrying up to 64 KiB of ciphertext.
func Encode(m json.Marshaler) ([]byte, error) {
	b, err := m.MarshalJSON()
	if err != nil {
		return nil, fmt.Errorf("encode: %w", err)
	}
	return b, nil
}

// DecodeServer decodes a broker → client frame. It is the client side's
// decoder and is lenient: unknown fields are ignored and no limits apply.
// An unknown type is returned as an error wrapping ErrUnknownType, so a
// client can skip messages of newer brokers. Pushes and acks, the frames a
// load generator receives most, skip encoding/json.
func DecodeServer(frame []byte) (ServerMessage, error) {
	var store [16]rawField
	fields, err := scanTop(string(frame), store[:0])
	if err != nil {
		return nil, fmt.Errorf("decode server frame: %w", err)
	}
	typ, e := fields.reqStr("type", 0)
	if e != nil {
		return nil, fmt.Errorf("decode server frame: %w", e)
	}
	var m ServerMessage
	switch typ {
	case TypePush:
		m, e = decodePush(fields)
	case TypeAck:
		m, e = decodeAck(fields)
	case TypeHelloAck:
		m = new(HelloAck)
	case TypePeersList:
		m = new(PeersList)
	case TypeStateChange:
		m = new(StateChange)
	case TypeStateResult:
		m = new(StateResult)
	case TypeStateList:
		m = new(StateList)
	case TypeMessageStatusResult:
		m = new(MessageStatusResult)
	case TypeError:
		m = new(Error)
	case TypeKickAck:
		m = new(KickAck)
	case TypeDisconnectAck:
		m = &KickAck{Disconnect: true}
	case TypeBanAck:
		m = new(BanAck)
	case TypeUnbanAck:
		m = new(UnbanAck)
	case TypeListBansResult:
		m = new(ListBansResult)
	default:
		return nil, fmt.Errorf("decode server frame: %w %q", ErrUnknownType, truncate(typ, 64))
	}
	if e != nil {
		return nil, fmt.Errorf("decode %s: %w", typ, e)
	}
	switch m.(type) {
	case *Push, *Ack:
		return m, nil
	}
	if err := json.Unmarshal(frame, m); err != nil {
		return nil, fmt.Errorf("decode %s: %w", typ, err)
	}
	return m, nil
}

func decodePush(o object) (*Push, *Error) {
	var m Push
	var e *Error
	for _, f := range []struct {
		name string
		dst  *string
	}{
		{"messageId", &m.MessageID}, {"meshId", &m.MeshID}, {"senderPubkey", &m.SenderPubkey},
		{"senderMemberPubkey", &m.SenderMemberPubkey}, {"nonce", &m.Nonce}, {"ciphertext", &m.Ciphertext},
		{"createdAt", &m.CreatedAt}, {"subtype", &m.Subtype}, {"event", &m.Event},
		{"client_message_id", &m.ClientMessageID}, {"request_fingerprint", &m.RequestFingerprint},
		{"senderName", &m.SenderName}, {"senderMemberId", &m.SenderMemberID},
	} {
		if *f.dst, e = o.optStr(f.name, 0); e != nil {
			return nil, e
		}
	}
	p, e := o.optStr("priority", 0)
	if e != nil {
		return nil, e
	}
	m.Priority = Priority(p)
	if f, e := o.present("eventData"); e != nil {
		return nil, e
	} else if f != nil {
		if m.EventData, e = o.rawJSON("eventData"); e != nil {
			return nil, e
		}
	}
	return &m, nil
}

func decodeAck(o object) (*Ack, *Error) {
	var m Ack
	var e *Error
	if m.ID, e = o.optStr("id", 0); e != nil {
		return nil, e
	}
	if m.MessageID, e = o.optStr("messageId", 0); e != nil {
		return nil, e
	}
	if m.Queued, e = o.optBool("queued"); e != nil {
		return nil, e
	}
	if m.Error, e = o.optStr("error", 0); e != nil {
		return nil, e
	}
	if m.Duplicate, e = o.optBool("duplicate"); e != nil {
		return nil, e
	}
	if m.ReqID, e = o.optStr("_reqId", 0); e != nil {
		return nil, e
	}
	return &m, nil
}
