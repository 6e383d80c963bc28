package broker

import (
	"sync"

	"github.com/olahol/melody"

	"github.com/claudemesh/broker/protocol"
)

type groupEntry struct {
	Name string `json:"name"`
	Role string `json:"role,omitempty"`
}

// session is one authenticated WebSocket on this replica. Identity fields are set once at
// hello; the rest is guarded by mu.
type session struct {
	ws *melody.Session

	presenceID    string
	meshID        string
	memberID      string
	memberPubkey  string
	sessionPubkey string // "" when the peer has no session key
	sessionID     string
	clientAck     bool
	systemEvents  bool
	epoch         int64 // the presence registration this socket owns

	mu          sync.Mutex
	displayName string
	status      protocol.Status
	groups      []groupEntry
	// backlog: pending deliveries may exist for this session, so new ones must queue behind
	// them (through the drain) instead of being pushed directly: per-recipient order.
	backlog bool
	kicks   uint64 // drain requests so far; a drain that saw fewer must run again
	closed  bool
}

// routingKey is the pubkey others see and target: the session key if any, else the member key.
func (s *session) routingKey() string {
	if s.sessionPubkey != "" {
		return s.sessionPubkey
	}
	return s.memberPubkey
}

func (s *session) groupNames() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, len(s.groups))
	for i, g := range s.groups {
		out[i] = g.Name
	}
	return out
}

func (s *session) setStatus(st protocol.Status) {
	s.mu.Lock()
	s.status = st
	s.mu.Unlock()
}

func (s *session) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *session) name() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.displayName
}

// endMode says what a closing socket does to its presence.
type endMode int

const (
	endGrace    endMode = iota // non-clean close: keep the presence listed for the grace window
	endNow                     // clean close, revoke or kick: the peer is gone
	endReplaced                // another socket took the presence over: leave it alone
)

// conn is what a melody session carries. It is touched only by that socket's read goroutine
// (melody runs message and disconnect handlers there), except end, which closers set first.
type conn struct {
	s   *session // nil until hello succeeded
	end atomicEnd
}

type atomicEnd struct {
	mu  sync.Mutex
	set bool
	v   endMode
}

// Set records the first reason a socket is closing; later ones don't override it.
func (a *atomicEnd) Set(v endMode) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.set {
		a.set, a.v = true, v
	}
}

func (a *atomicEnd) Get() endMode {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.v
}
