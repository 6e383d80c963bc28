package main

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/client/e2e"
	"github.com/claudemesh/broker/protocol"
)

// requestTimeout bounds one request/reply of the one-shot commands.
const requestTimeout = 15 * time.Second

// wsURL turns a broker URL into its WebSocket endpoint: http(s) becomes ws(s), and a URL
// without a path gets /ws.
func wsURL(broker string) (string, error) {
	u, err := parseBrokerURL(broker)
	if err != nil {
		return "", err
	}
	switch u.Scheme {
	case "http":
		u.Scheme = "ws"
	case "https":
		u.Scheme = "wss"
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = protocol.PathWS
	}
	return u.String(), nil
}

// httpBaseURL turns a broker URL into the base of its HTTP endpoints: ws(s) becomes
// http(s) and a trailing /ws is removed.
func httpBaseURL(broker string) (string, error) {
	u, err := parseBrokerURL(broker)
	if err != nil {
		return "", err
	}
	switch u.Scheme {
	case "ws":
		u.Scheme = "http"
	case "wss":
		u.Scheme = "https"
	}
	u.Path = strings.TrimSuffix(strings.TrimSuffix(u.Path, "/"), protocol.PathWS)
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawQuery, u.Fragment = "", ""
	return u.String(), nil
}

func parseBrokerURL(s string) (*url.URL, error) {
	u, err := url.Parse(strings.TrimSpace(s))
	if err != nil {
		return nil, fmt.Errorf("broker URL %q: %w", s, err)
	}
	switch u.Scheme {
	case "ws", "wss", "http", "https":
	default:
		return nil, fmt.Errorf("broker URL %q: want ws://, wss://, http:// or https://", s)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("broker URL %q: no host", s)
	}
	return u, nil
}

// session is one authenticated connection of a command, with what it needs to encrypt.
type session struct {
	cl        *client.Client
	mesh      *MeshEntry
	id        *Identity
	keys      *e2e.Keyring
	sessionID string
	url       string
}

// dialOpts are the hello fields that differ between commands.
type dialOpts struct {
	pid     int
	cwd     string
	groups  []protocol.Group
	events  bool // ask for system events (peer_joined, ...)
	buffers int  // push/event buffer; 0: the client's default
}

// peerSetup loads the identity and the mesh a command talks to, and builds its keyring.
func (a *app) peerSetup() (*Identity, *MeshEntry, *e2e.Keyring, error) {
	id, err := a.loadIdentity()
	if err != nil {
		return nil, nil, nil, err
	}
	mesh, err := a.selectMesh()
	if err != nil {
		return nil, nil, nil, err
	}
	var root *e2e.RootKey
	if mesh.MeshRootKey != "" {
		if root, err = e2e.ParseRootKey(mesh.MeshRootKey); err != nil {
			a.log.Warn("the mesh root key is unusable: group messages cannot be encrypted or read", "mesh", mesh.Slug)
		}
	}
	return id, mesh, e2e.NewKeyring(id.PrivateKey(), root), nil
}

// ensureSessionID fixes the session id for the whole process (one per process unless
// --session-id), so that a reconnect resumes the same presence.
func (a *app) ensureSessionID() string {
	if a.sessionID == "" {
		a.sessionID = "meshctl-" + uuid.NewString()
	}
	return a.sessionID
}

// meshWSURL is the WebSocket URL of the mesh's broker, or of --broker.
func (a *app) meshWSURL(mesh *MeshEntry) (string, error) {
	if a.brokerURL != "" {
		return wsURL(a.brokerURL)
	}
	return wsURL(mesh.BrokerURL)
}

// dial connects to the mesh's broker (or --broker) with client_ack on.
func (a *app) dial(ctx context.Context, id *Identity, mesh *MeshEntry, keys *e2e.Keyring, o dialOpts) (*session, error) {
	u, err := a.meshWSURL(mesh)
	if err != nil {
		return nil, err
	}
	if o.pid == 0 {
		o.pid = os.Getpid()
	}
	if o.cwd == "" {
		o.cwd, _ = os.Getwd()
	}
	name := mesh.DisplayName
	if name == "" {
		name = id.DisplayName
	}
	caps := []string{protocol.CapClientAck}
	if o.events {
		caps = append(caps, protocol.CapSystemEvents)
	}
	sid := a.ensureSessionID()
	cl, err := client.Dial(ctx, client.Options{
		URL: u, MeshID: mesh.MeshID, MemberID: mesh.MemberID, MemberKey: id.PrivateKey(),
		DisplayName: name, SessionID: sid, PID: o.pid, CWD: o.cwd, Groups: o.groups,
		Capabilities: caps, ProtocolVersion: 1, Logger: a.log,
		PushBuffer: o.buffers, EventBuffer: o.buffers,
	})
	if err != nil {
		return nil, err
	}
	a.log.Debug("connected", "url", u, "mesh", mesh.Slug, "session_id", sid, "presence_id", cl.HelloAck().PresenceID)
	return &session{cl: cl, mesh: mesh, id: id, keys: keys, sessionID: sid, url: u}, nil
}

// oneShot connects for a single command and discards whatever the broker pushes meanwhile
// (left unacknowledged, so it is not counted as delivered), so that a reply never waits
// behind a full push buffer.
func (a *app) oneShot(ctx context.Context, f func(ctx context.Context, s *session) error) error {
	id, mesh, keys, err := a.peerSetup()
	if err != nil {
		return err
	}
	s, err := a.dial(ctx, id, mesh, keys, dialOpts{buffers: 16})
	if err != nil {
		return err
	}
	defer s.cl.Close()
	go discardEvents(s.cl)
	return f(ctx, s)
}

func discardEvents(cl *client.Client) {
	pushes, changes, errs := cl.Pushes(), cl.StateChanges(), cl.Errors()
	for pushes != nil || changes != nil || errs != nil {
		select {
		case _, ok := <-pushes:
			if !ok {
				pushes = nil
			}
		case _, ok := <-changes:
			if !ok {
				changes = nil
			}
		case _, ok := <-errs:
			if !ok {
				errs = nil
			}
		}
	}
}

// peerNames maps public keys (session or member) to display names.
type peerNames struct {
	mu sync.Mutex
	m  map[string]string
}

func newPeerNames() *peerNames { return &peerNames{m: make(map[string]string)} }

// maxPeerNames bounds the table: listen learns a key from every peer event for as long as it
// runs (a new session key per session, or a broker sending endless events). Far more than a
// mesh has live; a name dropped is looked up again (list_peers) when its sender next writes.
const maxPeerNames = 4096

func (n *peerNames) set(pub, name string) {
	if pub == "" || name == "" {
		return
	}
	k := strings.ToLower(pub)
	n.mu.Lock()
	if _, ok := n.m[k]; !ok && len(n.m) >= maxPeerNames {
		clear(n.m)
	}
	n.m[k] = name
	n.mu.Unlock()
}

func (n *peerNames) setPeers(peers []protocol.Peer) {
	for _, p := range peers {
		n.set(p.Pubkey, p.DisplayName)
	}
}

// lookup returns the name of the first key it knows.
func (n *peerNames) lookup(keys ...string) (string, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, k := range keys {
		if name, ok := n.m[strings.ToLower(k)]; ok {
			return name, true
		}
	}
	return "", false
}

// shortKey abbreviates a public key for display.
func shortKey(k string) string {
	if len(k) > 12 {
		return k[:12] + "…"
	}
	return k
}

// sanitize makes a peer's text (a message, a state value) safe for a terminal, its lines kept;
// field does the same for a name, a key or a table cell, on one line.
func sanitize(s string) string { return client.Printable(s, true) }

func field(s string) string { return client.Printable(s, false) }
