package store

import (
	"encoding/json"
	"time"
)

// DeliveryState is where one recipient's copy of a message is.
type DeliveryState string

// Delivery states. A delivery is pending until claimed for a session (pushed); it is done
// (acked) once the client acked it, or, for a client that does not ack, once it was written to
// the socket. Pushed deliveries whose session ends go back to pending. Expired ones are never
// pushed.
const (
	DeliveryPending DeliveryState = "pending"
	DeliveryPushed  DeliveryState = "pushed"
	DeliveryAcked   DeliveryState = "acked"
	DeliveryExpired DeliveryState = "expired"
)

// Group is a session's membership of a group.
type Group struct {
	Name string `json:"name"`
	Role string `json:"role,omitempty"`
}

// Presence is one live session (possibly in its reconnect grace), as stored.
type Presence struct {
	ID, MeshID, MemberID, MemberPubkey, NodeID, SessionID string
	SessionPubkey                                         string // "" when none
	DisplayName, CWD, Status, StatusSource, Summary       string
	PID                                                   int
	Groups                                                []Group
	ConnectedAt                                           time.Time
	InGrace                                               bool
	// Role is control-plane (a plain hello) or session (session_hello); the rest is what the
	// hello said about its connection.
	Role, Hostname, PeerType, Channel, Model string
}

// RoutingKey is the key others see: the session key if any, else the member key.
func (p *Presence) RoutingKey() string {
	if p.SessionPubkey != "" {
		return p.SessionPubkey
	}
	return p.MemberPubkey
}

// StatusChange is a presence whose status just changed: its node is told, its mesh gets a
// peer_status event.
type StatusChange struct {
	ID, MeshID, MemberID, MemberPubkey, SessionPubkey, DisplayName, NodeID, Status string
}

// RoutingKey is the changed session's key (session key if any, else member key).
func (c *StatusChange) RoutingKey() string {
	if c.SessionPubkey != "" {
		return c.SessionPubkey
	}
	return c.MemberPubkey
}

// EndedPresence is a presence that just ended (its peer_left event and audit entry follow).
type EndedPresence struct {
	ID, MeshID, MemberID, MemberPubkey, SessionPubkey, DisplayName string
}

// RoutingKey is the ended session's key.
func (e *EndedPresence) RoutingKey() string {
	if e.SessionPubkey != "" {
		return e.SessionPubkey
	}
	return e.MemberPubkey
}

// Claimed is a delivery claimed for a session, with what its push carries.
type Claimed struct {
	ID           int64
	PresenceID   string
	FromAssigned bool // it had been assigned to the session (its notification may still come)
	Push
}

// Push is what a push frame carries: the envelope and its sender.
type Push struct {
	EnvelopeID, MeshID, SenderPubkey, SenderMemberPubkey string
	Priority, Nonce, Ciphertext                          string
	CreatedAt                                            time.Time
	SenderMemberID, SenderName                           string
	ClientMessageID, RequestFingerprint                  string
}

// StateEntry is one shared-state key of a mesh.
type StateEntry struct {
	Key       string
	Value     json.RawMessage
	UpdatedBy string
	UpdatedAt time.Time
	Size      int // bytes of key and value as stored, what the quota counts
}

// RecipientStatus is one recipient of a sent message, for message_status.
type RecipientStatus struct {
	State         DeliveryState
	PushedAt      *time.Time
	AckedAt       *time.Time
	DisplayName   string
	MemberPubkey  string
	SessionPubkey string
	Online        bool
}

// DeadNode is a node another replica declared dead.
type DeadNode struct {
	ID          string
	HeartbeatAt time.Time
}
