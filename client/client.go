// Package client is a Go client for the claudemesh broker wire protocol. It
// dials /ws, sends the signed hello, correlates requests with replies by
// _reqId, and hands pushes, state changes and unsolicited errors to
// channels. The peer CLI, the tests and the load generator use it.
//
// It holds no server code and never reconnects: when the socket ends, Done
// is closed and CloseCode says why (see the protocol.Close* constants); the
// caller decides whether to dial again.
package client

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/claudemesh/broker/protocol"
)

// Defaults for zero Options fields.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultWriteTimeout     = 10 * time.Second
	// DefaultIdleTimeout: the broker pings every 30 s, so 90 s without any
	// frame or ping means the connection is dead (e.g. a dropped NAT entry).
	DefaultIdleTimeout = 90 * time.Second
	// DefaultReadLimit bounds one incoming frame. Pushes are below 64 KiB,
	// but peers_list and state_list grow with the mesh.
	DefaultReadLimit   = 8 << 20
	DefaultPushBuffer  = 256
	DefaultEventBuffer = 64
)

// closeWait bounds how long Close waits for the broker to answer the close
// frame before dropping the TCP connection.
const closeWait = time.Second

// ErrClosed is returned by calls on a client that Close has closed.
var ErrClosed = errors.New("client closed")

// Options configure Dial. Zero values mean the documented defaults.
type Options struct {
	// URL is the broker's WebSocket URL, e.g. ws://host:7900/ws.
	URL      string
	MeshID   string
	MemberID string
	// MemberKey is the member's ed25519 key; it signs the hello.
	MemberKey ed25519.PrivateKey
	// SessionKey is the optional per-session routing key (sessionPubkey).
	SessionKey  ed25519.PublicKey
	DisplayName string
	// SessionID identifies the session: a later hello with the same mesh,
	// member and SessionID replaces this one. Empty means a random id, so
	// that two clients never replace each other by accident.
	SessionID    string
	PID          int
	CWD          string
	Groups       []protocol.Group
	Capabilities []string
	// ProtocolVersion (ext) is sent when non-zero.
	ProtocolVersion int
	// Header is sent with the WebSocket handshake.
	Header http.Header
	// HandshakeTimeout bounds Dial: connect, upgrade and hello_ack.
	HandshakeTimeout time.Duration
	// WriteTimeout bounds one frame write when the context has no earlier
	// deadline (a blocked write cannot otherwise be interrupted).
	WriteTimeout time.Duration
	// IdleTimeout closes the connection when no frame or ping arrived for
	// that long. Negative disables it.
	IdleTimeout time.Duration
	// ReadLimit bounds one incoming frame; a larger one ends the connection.
	ReadLimit int64
	// PushBuffer is the capacity of Pushes; EventBuffer that of
	// StateChanges and Errors.
	PushBuffer  int
	EventBuffer int
	// Logger receives connection-level events (never message content).
	Logger *slog.Logger
	// Now is the clock for the hello timestamp; tests use it to forge skew.
	Now func() time.Time
	// PrepareHello, when set, may change the signed hello before it is
	// sent; tests use it to send malformed or badly signed hellos.
	PrepareHello func(*protocol.Hello)
	// Session, when set, makes Dial authenticate as a launched session
	// (session_hello, as today's claudemesh CLI does) instead of with the
	// member's own hello. MemberID, when set, is sent as parentMemberId.
	Session *SessionOptions
	// What the hello says about this connection (listed by list_peers):
	// hostname, peerType ("ai", "human"), channel (the CLI's
	// "claudemesh-daemon", "claudemesh-session"), model.
	Hostname, PeerType, Channel, Model string

	// netDial, when set, opens the TCP connection (tests wrap it to stall writes).
	netDial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// SessionOptions are a launched session's credentials: its own key, which
// signs the session_hello, and its member's attestation of that key.
type SessionOptions struct {
	// Key is the session's ed25519 key (its public half is the routing key
	// others see).
	Key ed25519.PrivateKey
	// Attestation, when nil, is signed with Options.MemberKey for
	// AttestationTTL (default 12 h, as the CLI; at most 24 h).
	Attestation    *protocol.Attestation
	AttestationTTL time.Duration
	// Role is sent as is (informational).
	Role string
	// PrepareHello, when set, may change the signed session_hello before it
	// is sent (tests).
	PrepareHello func(*protocol.SessionHello)
}

// DefaultAttestationTTL is how long an attestation Dial signs runs.
const DefaultAttestationTTL = 12 * time.Hour

func (o *Options) validate() error {
	if o.URL == "" {
		return errors.New("client options: URL is required")
	}
	if o.Session != nil {
		if len(o.Session.Key) != ed25519.PrivateKeySize {
			return errors.New("client options: Session.Key must be an ed25519 private key")
		}
		if o.Session.Attestation == nil && len(o.MemberKey) != ed25519.PrivateKeySize {
			return errors.New("client options: MemberKey must be an ed25519 private key to sign the session's attestation")
		}
		return nil
	}
	if len(o.MemberKey) != ed25519.PrivateKeySize {
		return errors.New("client options: MemberKey must be an ed25519 private key")
	}
	if len(o.SessionKey) != 0 && len(o.SessionKey) != ed25519.PublicKeySize {
		return errors.New("client options: SessionKey must be an ed25519 public key")
	}
	return nil
}

func (o *Options) setDefaults() {
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = DefaultWriteTimeout
	}
	if o.IdleTimeout == 0 {
		o.IdleTimeout = DefaultIdleTimeout
	}
	if o.ReadLimit <= 0 {
		o.ReadLimit = DefaultReadLimit
	}
	if o.PushBuffer <= 0 {
		o.PushBuffer = DefaultPushBuffer
	}
	if o.EventBuffer <= 0 {
		o.EventBuffer = DefaultEventBuffer
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.SessionID == "" {
		var b [16]byte
		_, _ = rand.Read(b[:])
		o.SessionID = hex.EncodeToString(b[:])
	}
}

// HelloError is Dial's error when the broker refused the hello or closed
// the socket before acknowledging it.
type HelloError struct {
	// Code is the broker's error code (protocol.CodeCapacity, ...), "" when
	// the socket closed without an error frame.
	Code    string
	Message string
	// CloseCode is the close frame's code (1008, or 4002 for revoked), 0 if
	// none arrived before the handshake deadline.
	CloseCode   int
	CloseReason string
}

func (e *HelloError) Error() string {
	if e.Code == "" {
		return fmt.Sprintf("hello refused: socket closed (%d %s)", e.CloseCode, e.CloseReason)
	}
	return fmt.Sprintf("hello refused: %s: %s (close %d)", e.Code, e.Message, e.CloseCode)
}

// Unwrap exposes the broker's error as a *protocol.Error.
func (e *HelloError) Unwrap() error {
	if e.Code == "" {
		return nil
	}
	return &protocol.Error{Code: e.Code, Message: e.Message}
}

// CloseError is Err's value when the broker closed the socket.
type CloseError struct {
	Code   int
	Reason string
}

func (e *CloseError) Error() string {
	return fmt.Sprintf("connection closed by broker: %d %s", e.Code, e.Reason)
}

// Client is one authenticated session. Its methods are safe for concurrent
// use.
type Client struct {
	conn         *websocket.Conn
	log          *slog.Logger
	writeTimeout time.Duration
	idleTimeout  time.Duration
	helloAck     protocol.HelloAck
	helloCh      chan helloResult // the read loop's answer to the hello, once

	// gorilla allows one concurrent writer; requests come from any goroutine.
	writeMu sync.Mutex

	nextID  atomic.Uint64
	mu      sync.Mutex
	pending map[string]chan protocol.ServerMessage // _reqId → reply

	pushes       chan protocol.Push
	stateChanges chan protocol.StateChange
	errs         chan *protocol.Error

	closeOnce  sync.Once
	closedByUs atomic.Bool
	// writeErr is the write that broke the connection (see writeFrame), for the read loop's
	// error.
	writeErr atomic.Pointer[error]
	ponging  atomic.Bool    // a pong is being written (onPing)
	pongs    sync.WaitGroup // that pong's goroutine, for Close
	closing  chan struct{}  // closed by Close: unblocks the read loop's channel sends
	done     chan struct{}  // closed when the read loop has exited

	// Written by the read loop before done is closed.
	closeCode   int
	closeReason string
	err         error
}

type helloResult struct {
	ack *protocol.HelloAck
	err *protocol.Error
}

// upgradeBodyMax bounds what of a refused upgrade's body an UpgradeError keeps.
const upgradeBodyMax = 256

// UpgradeError is a WebSocket upgrade the server answered with an HTTP status instead: a
// broker refusing for the moment (503 draining or full, 429), or a URL that is no broker's
// (404, 400, 401, 403), which no retry mends.
type UpgradeError struct {
	URL    string
	Status int
	Body   string // the start of the server's answer, made printable
	// Location is where a redirect points (a ws:// URL sent on to https://, say): not
	// followed, since the hello's signature would go wherever it says, but shown.
	Location string
	Err      error
}

// redirectTarget is where a redirect's Location points, resolved against the URL dialed: a
// relative one ("/v2/ws", as Go's http.Redirect writes a path) names no URL to use on its own.
func redirectTarget(dialed, location string) string {
	if location == "" {
		return ""
	}
	base, err := url.Parse(dialed)
	if err != nil {
		return location
	}
	ref, err := url.Parse(location)
	if err != nil {
		return location
	}
	return base.ResolveReference(ref).String()
}

func (e *UpgradeError) Error() string {
	msg := fmt.Sprintf("dial %s: HTTP %d", e.URL, e.Status)
	if e.Location != "" {
		msg += " (redirected to " + e.Location + ": use that URL)"
	}
	if e.Body != "" {
		msg += ": " + e.Body
	}
	return msg
}

func (e *UpgradeError) Unwrap() error { return e.Err }

// Retryable reports whether the status says to come back later: the server's own trouble
// (5xx), a timeout (408), too early (425) or too many requests (429).
func (e *UpgradeError) Retryable() bool {
	switch e.Status {
	case http.StatusRequestTimeout, http.StatusTooEarly, http.StatusTooManyRequests:
		return true
	}
	return e.Status >= 500
}

// writeBuffers are the connections' write buffers, each borrowed for one write.
var writeBuffers = &sync.Pool{}

// Dial connects, sends a signed hello and waits for hello_ack. A refused
// hello returns a *HelloError carrying the broker's error code and the
// close code.
func Dial(ctx context.Context, opts Options) (*Client, error) {
	if err := opts.validate(); err != nil {
		return nil, err
	}
	opts.setDefaults()
	ctx, cancel := context.WithTimeout(ctx, opts.HandshakeTimeout)
	defer cancel()

	// An idle connection holds a 1 KiB read buffer (a larger frame is read past it) and no
	// write buffer: each write borrows one from a pool shared by the process's connections.
	// gorilla's default is 4 KiB of each per connection, which a process holding thousands of
	// them (the load generator) paid for in memory and page faults.
	dialer := websocket.Dialer{Proxy: http.ProxyFromEnvironment, HandshakeTimeout: opts.HandshakeTimeout,
		NetDialContext: opts.netDial, ReadBufferSize: 1024, WriteBufferSize: 4096, WriteBufferPool: writeBuffers}
	conn, resp, err := dialer.DialContext(ctx, opts.URL, opts.Header)
	var body []byte
	if resp != nil && resp.Body != nil {
		if err != nil {
			// The server's reason (the broker says why it refused), shown, not trusted.
			body, _ = io.ReadAll(io.LimitReader(resp.Body, upgradeBodyMax))
		}
		_ = resp.Body.Close()
	}
	if err != nil {
		if resp != nil {
			return nil, &UpgradeError{URL: opts.URL, Status: resp.StatusCode,
				Body:     Printable(strings.TrimSpace(string(body)), false),
				Location: Printable(redirectTarget(opts.URL, resp.Header.Get("Location")), false), Err: err}
		}
		return nil, fmt.Errorf("dial %s: %w", opts.URL, err)
	}
	conn.SetReadLimit(opts.ReadLimit)

	c := &Client{
		conn:         conn,
		log:          opts.Logger.With("url", opts.URL, "session_id", opts.SessionID),
		writeTimeout: opts.WriteTimeout,
		idleTimeout:  opts.IdleTimeout,
		helloCh:      make(chan helloResult, 1),
		pending:      make(map[string]chan protocol.ServerMessage),
		pushes:       make(chan protocol.Push, opts.PushBuffer),
		stateChanges: make(chan protocol.StateChange, opts.EventBuffer),
		errs:         make(chan *protocol.Error, opts.EventBuffer),
		closing:      make(chan struct{}),
		done:         make(chan struct{}),
	}
	c.conn.SetPingHandler(c.onPing) // before the read loop: a read-side setter
	go c.readLoop()

	if err := c.write(ctx, buildHello(&opts)); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("send hello: %w", err)
	}
	select {
	case r := <-c.helloCh:
		return c.finishHello(ctx, r)
	case <-c.done:
		// The read loop answers helloCh before it exits: prefer its answer.
		select {
		case r := <-c.helloCh:
			return c.finishHello(ctx, r)
		default:
		}
		return nil, &HelloError{CloseCode: c.closeCode, CloseReason: c.closeReason}
	case <-ctx.Done():
		_ = c.Close()
		return nil, fmt.Errorf("hello: %w", ctx.Err())
	}
}

func (c *Client) finishHello(ctx context.Context, r helloResult) (*Client, error) {
	if r.ack != nil {
		c.helloAck = *r.ack
		c.log.Debug("hello acknowledged", "presence_id", r.ack.PresenceID, "resumed", r.ack.Resumed)
		return c, nil
	}
	// Refused: the broker closes right after the error; wait for the close
	// frame so the caller learns the close code (1008, or 4002 for revoked).
	select {
	case <-c.done:
	case <-ctx.Done():
	}
	_ = c.Close()
	return nil, &HelloError{Code: r.err.Code, Message: r.err.Message, CloseCode: c.closeCode, CloseReason: c.closeReason}
}

func buildHello(o *Options) protocol.ClientMessage {
	if o.Session != nil {
		return buildSessionHello(o)
	}
	h := &protocol.Hello{
		MeshID:          o.MeshID,
		MemberID:        o.MemberID,
		Pubkey:          protocol.PubkeyHex(o.MemberKey.Public().(ed25519.PublicKey)),
		DisplayName:     o.DisplayName,
		SessionID:       o.SessionID,
		PID:             o.PID,
		CWD:             o.CWD,
		Groups:          o.Groups,
		Timestamp:       o.Now().UnixMilli(),
		ProtocolVersion: o.ProtocolVersion,
		Capabilities:    o.Capabilities,
		Hostname:        o.Hostname,
		PeerType:        o.PeerType,
		Channel:         o.Channel,
		Model:           o.Model,
	}
	if len(o.SessionKey) > 0 {
		h.SessionPubkey = protocol.PubkeyHex(o.SessionKey)
	}
	// Signed over the pubkey string exactly as sent.
	h.Signature = protocol.SignHello(o.MemberKey, h.MeshID, h.MemberID, h.Pubkey, h.Timestamp)
	if o.PrepareHello != nil {
		o.PrepareHello(h)
	}
	return h
}

// buildSessionHello makes a launched session's hello: the attestation (signed
// now unless given) and the session key's signature.
func buildSessionHello(o *Options) *protocol.SessionHello {
	so := o.Session
	sessPub := protocol.PubkeyHex(so.Key.Public().(ed25519.PublicKey))
	att := so.Attestation
	if att == nil {
		ttl := so.AttestationTTL
		if ttl <= 0 {
			ttl = DefaultAttestationTTL
		}
		a := protocol.SignAttestation(o.MemberKey, sessPub, o.Now().Add(ttl))
		att = &a
	}
	h := &protocol.SessionHello{
		MeshID: o.MeshID, ParentMemberID: o.MemberID, ParentMemberPubkey: att.ParentMemberPubkey, SessionPubkey: sessPub,
		ParentAttestation: *att, DisplayName: o.DisplayName, SessionID: o.SessionID, PID: o.PID, CWD: o.CWD,
		Hostname: o.Hostname, PeerType: o.PeerType, Channel: o.Channel, Model: o.Model, Groups: o.Groups, Role: so.Role,
		ProtocolVersion: o.ProtocolVersion, Capabilities: o.Capabilities,
	}
	protocol.SignSessionHello(so.Key, h, o.Now())
	if so.PrepareHello != nil {
		so.PrepareHello(h)
	}
	return h
}

// HelloAck returns the broker's hello_ack.
func (c *Client) HelloAck() protocol.HelloAck { return c.helloAck }

// Pushes delivers pushes in arrival order. It is bounded (Options.PushBuffer)
// and nothing is ever dropped: when it is full the read loop waits for the
// consumer, so replies, state changes and pings wait too (back-pressure).
// A consumer that stops reading for longer than the broker's pong deadline
// (75 s) gets disconnected; read it, or close the client. It is closed when
// the connection ends.
func (c *Client) Pushes() <-chan protocol.Push { return c.pushes }

// StateChanges delivers state_change events, with the same back-pressure as
// Pushes. It is closed when the connection ends.
func (c *Client) StateChanges() <-chan protocol.StateChange { return c.stateChanges }

// Errors delivers error frames that answer no pending request: replies to
// SendRaw frames and to fire-and-forget messages (their ReqID says which).
// Same back-pressure as Pushes; closed when the connection ends.
func (c *Client) Errors() <-chan *protocol.Error { return c.errs }

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// CloseCode is the code of the broker's close frame once Done is closed
// (protocol.CloseDraining, ...): 1006 when the connection dropped without a
// close frame, 0 while open or when none was received.
func (c *Client) CloseCode() int {
	select {
	case <-c.done:
		return c.closeCode
	default:
		return 0
	}
}

// CloseReason is the reason text of the broker's close frame.
func (c *Client) CloseReason() string {
	select {
	case <-c.done:
		return c.closeReason
	default:
		return ""
	}
}

// Err is nil while the connection is open. Afterwards it is ErrClosed when
// Close ended it, a *CloseError when the broker closed it, or the read
// error.
func (c *Client) Err() error {
	select {
	case <-c.done:
		return c.err
	default:
		return nil
	}
}

// Close closes the connection with 1000 and waits for the read loop to end.
// It is safe to call more than once and concurrently.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.closedByUs.Store(true)
		close(c.closing)
		msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
		if err := c.conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(closeWait)); err == nil {
			// Give the broker a moment to echo the close (a clean close).
			select {
			case <-c.done:
			case <-time.After(closeWait):
			}
		}
		_ = c.conn.Close()
	})
	<-c.done
	c.pongs.Wait() // a pong's write ends with the connection
	return nil
}

// onPing answers from another goroutine: the read loop must not wait for the writer. A pong
// written here waited behind any write in progress, up to its timeout (a full socket, the
// broker not reading), and the read loop with it, so the broker's frames to a client that
// was only waiting to write piled up as for one that stopped reading. One pong at a time: a
// ping that comes while one is waiting adds nothing to it (either tells the broker the
// client is there).
func (c *Client) onPing(appData string) error {
	if c.idleTimeout > 0 {
		_ = c.conn.SetReadDeadline(time.Now().Add(c.idleTimeout))
	}
	if !c.ponging.CompareAndSwap(false, true) {
		return nil
	}
	data := []byte(appData)
	c.pongs.Add(1)
	go func() {
		defer c.pongs.Done()
		defer c.ponging.Store(false)
		err := c.conn.WriteControl(websocket.PongMessage, data, time.Now().Add(c.writeTimeout))
		var opErr *net.OpError
		switch {
		case err == nil, err == websocket.ErrCloseSent, c.closedByUs.Load():
		case errors.As(err, &opErr):
			// The socket failed under the pong, maybe partway through it: as for any write.
			c.brokenWrite(err)
		default:
			// It waited its timeout for the writer, busy with other frames: nothing written.
			c.log.Debug("pong not written", "err", err)
		}
	}()
	return nil
}

func (c *Client) readLoop() {
	defer func() {
		// Only this goroutine sends on these channels.
		close(c.pushes)
		close(c.stateChanges)
		close(c.errs)
		_ = c.conn.Close()
		close(c.done)
	}()
	helloDone := false
	for {
		if c.idleTimeout > 0 {
			_ = c.conn.SetReadDeadline(time.Now().Add(c.idleTimeout))
		}
		_, frame, err := c.conn.ReadMessage()
		if err != nil {
			c.setReadErr(err)
			return
		}
		m, err := protocol.DecodeServer(frame)
		if err != nil {
			// Newer brokers may send types this client does not know.
			c.log.Debug("broker frame skipped", "err", err, "bytes", len(frame))
			continue
		}
		if !helloDone {
			switch m := m.(type) {
			case *protocol.HelloAck:
				helloDone = true
				c.helloCh <- helloResult{ack: m}
				continue
			case *protocol.Error:
				helloDone = true
				c.helloCh <- helloResult{err: m}
				continue
			}
		}
		if !c.dispatch(m) {
			c.err = ErrClosed
			return
		}
	}
}

func (c *Client) setReadErr(err error) {
	var ce *websocket.CloseError
	if errors.As(err, &ce) {
		c.closeCode, c.closeReason = ce.Code, ce.Text
	} else if !c.closedByUs.Load() {
		// Dropped without a close frame: a reset as much as an EOF (gorilla reports only the
		// EOF as a 1006 CloseError).
		c.closeCode = websocket.CloseAbnormalClosure
	}
	switch {
	case c.closedByUs.Load():
		c.err = ErrClosed
	case ce != nil: // the broker's close (a kick, a revocation) wins over a write it broke
		c.err = &CloseError{Code: ce.Code, Reason: ce.Text}
	case c.writeErr.Load() != nil:
		c.err = fmt.Errorf("write: %w", *c.writeErr.Load())
	default:
		c.err = fmt.Errorf("read: %w", err)
	}
	c.log.Debug("connection ended", "close_code", c.closeCode, "err", err)
}

// dispatch routes one message; false means Close was called while waiting
// for a slow consumer.
func (c *Client) dispatch(m protocol.ServerMessage) bool {
	if id := m.RequestID(); id != "" {
		c.mu.Lock()
		ch, ok := c.pending[id]
		delete(c.pending, id)
		c.mu.Unlock()
		if ok {
			ch <- m // buffered 1, one reply per request
			return true
		}
	}
	switch m := m.(type) {
	case *protocol.Push:
		select {
		case c.pushes <- *m:
		case <-c.closing:
			return false
		}
	case *protocol.StateChange:
		select {
		case c.stateChanges <- *m:
		case <-c.closing:
			return false
		}
	case *protocol.Error:
		select {
		case c.errs <- m:
		case <-c.closing:
			return false
		}
	default:
		// A late reply to a request whose context ended.
		c.log.Debug("unmatched reply dropped", "type", m.Type(), "req_id", m.RequestID())
	}
	return true
}

func (c *Client) newReqID() string {
	return "r" + strconv.FormatUint(c.nextID.Add(1), 10)
}

// connErr is the error for calls made after the connection ended.
func (c *Client) connErr() error {
	if err := c.Err(); err != nil {
		return err
	}
	return ErrClosed
}

// write encodes m and writes it as one text frame.
func (c *Client) write(ctx context.Context, m protocol.ClientMessage) error {
	b, err := protocol.Encode(m)
	if err != nil {
		return err
	}
	if err := c.writeFrame(ctx, b); err != nil {
		return fmt.Errorf("write %s: %w", m.Type(), err)
	}
	return nil
}

func (c *Client) writeFrame(ctx context.Context, frame []byte) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	// After the lock: a context that ended while another write held it fails here, and never
	// as a write cut short, which would end the connection for everyone.
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case <-c.done:
		return c.connErr()
	default:
	}
	deadline := time.Now().Add(c.writeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = c.conn.SetWriteDeadline(deadline)
	if err := c.conn.WriteMessage(websocket.TextMessage, frame); err != nil {
		c.brokenWrite(err)
		return err
	}
	return nil
}

// brokenWrite ends the connection after a failed write. The write (its deadline passed: the
// broker stopped reading, under its back-pressure or over a dead link) may have left part of
// a frame on the wire, and gorilla/websocket fails every write after it. Ending the connection
// makes Done fire and the caller reconnect, rather than every later request failing at once
// on a connection that still looks alive.
func (c *Client) brokenWrite(err error) {
	c.writeErr.CompareAndSwap(nil, &err)
	conn := c.conn.UnderlyingConn()
	if tc, ok := conn.(*tls.Conn); ok {
		// Not tls.Conn.Close: it would first try to write a close_notify into the full
		// socket, for up to 5 s, with the write lock held.
		conn = tc.NetConn()
	}
	_ = conn.Close()
}

// Request sends m with a fresh _reqId (set on m) and waits for the reply
// that echoes it. An error reply is returned as a *protocol.Error.
func (c *Client) Request(ctx context.Context, m protocol.ClientMessage) (protocol.ServerMessage, error) {
	id := c.newReqID()
	m.SetRequestID(id)
	ch := make(chan protocol.ServerMessage, 1)
	c.mu.Lock()
	c.pending[id] = ch
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}
	if err := c.write(ctx, m); err != nil {
		forget()
		return nil, err
	}
	var r protocol.ServerMessage
	select {
	case r = <-ch:
	case <-ctx.Done():
		forget()
		return nil, fmt.Errorf("%s: %w", m.Type(), ctx.Err())
	case <-c.done:
		forget()
		select {
		case r = <-ch: // answered just before the end
		default:
			return nil, fmt.Errorf("%s: %w", m.Type(), c.connErr())
		}
	}
	if e, ok := r.(*protocol.Error); ok {
		return nil, e
	}
	return r, nil
}

// requestAs is Request expecting a reply of type T.
func requestAs[T protocol.ServerMessage](ctx context.Context, c *Client, m protocol.ClientMessage) (T, error) {
	var zero T
	r, err := c.Request(ctx, m)
	if err != nil {
		return zero, err
	}
	t, ok := r.(T)
	if !ok {
		return zero, fmt.Errorf("%s: unexpected reply %q", m.Type(), r.Type())
	}
	return t, nil
}

// Notify sends a message that has no reply (set_status, ...) and returns
// once the frame is written. It gets a _reqId too, so that an error reply
// arriving on Errors can be matched to it.
func (c *Client) Notify(ctx context.Context, m protocol.ClientMessage) error {
	m.SetRequestID(c.newReqID())
	return c.write(ctx, m)
}

// SendRaw writes frame as one text frame, as is; tests use it for malformed
// frames. Replies arrive on Errors (see NextError) unless they echo the
// _reqId of a pending request.
func (c *Client) SendRaw(ctx context.Context, frame []byte) error {
	if err := c.writeFrame(ctx, frame); err != nil {
		return fmt.Errorf("write raw frame: %w", err)
	}
	return nil
}

// NextError waits for the next error on Errors.
func (c *Client) NextError(ctx context.Context) (*protocol.Error, error) {
	select {
	case e, ok := <-c.errs:
		if !ok {
			return nil, c.connErr()
		}
		return e, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Send sends an envelope and waits for its ack, which comes once the broker
// has stored it. A refusal (ack queued:false) returns the ack and a
// *protocol.Error whose Code is the ack's error (protocol.CodeNoRecipient,
// ...). nonce and ciphertext are opaque here too: never logged.
func (c *Client) Send(ctx context.Context, target string, priority protocol.Priority, nonce, ciphertext, id string) (protocol.Ack, error) {
	return c.SendMessage(ctx, &protocol.Send{TargetSpec: target, Priority: priority, Nonce: nonce, Ciphertext: ciphertext, ID: id})
}

// SendMessage is Send with every field of the send, such as
// ClientMessageID: a send repeating one the member used before (a retry) is
// acked with the first message's id (Ack.Duplicate) and delivered once.
func (c *Client) SendMessage(ctx context.Context, m *protocol.Send) (protocol.Ack, error) {
	ack, err := requestAs[*protocol.Ack](ctx, c, m)
	if err != nil {
		return protocol.Ack{}, err
	}
	if !ack.Queued {
		code := ack.Error
		if code == "" {
			code = "not_queued"
		}
		return *ack, &protocol.Error{Code: code, Message: "send not queued", ID: ack.ID, ReqID: ack.ReqID}
	}
	return *ack, nil
}

// ListPeers returns every live session of the mesh, the caller included.
func (c *Client) ListPeers(ctx context.Context) ([]protocol.Peer, error) {
	r, err := requestAs[*protocol.PeersList](ctx, c, &protocol.ListPeers{})
	if err != nil {
		return nil, err
	}
	return r.Peers, nil
}

// SetStatus sets this session's status (fire-and-forget).
func (c *Client) SetStatus(ctx context.Context, status protocol.Status) error {
	return c.Notify(ctx, &protocol.SetStatus{Status: status})
}

// SetSummary sets this session's summary (fire-and-forget).
func (c *Client) SetSummary(ctx context.Context, summary string) error {
	return c.Notify(ctx, &protocol.SetSummary{Summary: summary})
}

// JoinGroup joins a group; role may be "" (fire-and-forget).
func (c *Client) JoinGroup(ctx context.Context, name, role string) error {
	return c.Notify(ctx, &protocol.JoinGroup{Name: name, Role: role})
}

// LeaveGroup leaves a group (fire-and-forget).
func (c *Client) LeaveGroup(ctx context.Context, name string) error {
	return c.Notify(ctx, &protocol.LeaveGroup{Name: name})
}

// SetState sets a mesh-wide key to value, marshalled to JSON (a
// json.RawMessage is sent as is). Fire-and-forget; the other sessions get a
// state_change.
func (c *Client) SetState(ctx context.Context, key string, value any) error {
	raw, err := json.Marshal(value)
	if err != nil {
		return fmt.Errorf("set_state %s: %w", key, err)
	}
	return c.Notify(ctx, &protocol.SetState{Key: key, Value: raw})
}

// GetState reads one key; a missing key has Value null.
func (c *Client) GetState(ctx context.Context, key string) (protocol.StateResult, error) {
	r, err := requestAs[*protocol.StateResult](ctx, c, &protocol.GetState{Key: key})
	if err != nil {
		return protocol.StateResult{}, err
	}
	return *r, nil
}

// ListState reads every key of the mesh.
func (c *Client) ListState(ctx context.Context) ([]protocol.StateEntry, error) {
	r, err := requestAs[*protocol.StateList](ctx, c, &protocol.ListState{})
	if err != nil {
		return nil, err
	}
	return r.Entries, nil
}

// MessageStatus reads a sent message's delivery state; an unknown id is a
// *protocol.Error with Code protocol.CodeNotFound.
func (c *Client) MessageStatus(ctx context.Context, messageID string) (protocol.MessageStatusResult, error) {
	r, err := requestAs[*protocol.MessageStatusResult](ctx, c, &protocol.MessageStatus{MessageID: messageID})
	if err != nil {
		return protocol.MessageStatusResult{}, err
	}
	return *r, nil
}

// AckPush acknowledges one push as today's CLI does: its messageId and its
// client_message_id (or messageId when it has none). A connection that acks
// once is treated as acking from then on: its unacked pushes come again
// after a reconnect.
func (c *Client) AckPush(ctx context.Context, p protocol.Push) error {
	cmid := p.ClientMessageID
	if cmid == "" {
		cmid = p.MessageID
	}
	return c.Notify(ctx, &protocol.ClientAck{BrokerMessageID: p.MessageID, ClientMessageID: cmid})
}

// Kick closes sessions of the mesh (admins only): by target (display name,
// member or session key, or a member-key prefix of at least 8 characters),
// stale (in their grace longer than that), or all but this one. A kick
// closes with 4001 and leaves control-plane connections alone; with
// m.Disconnect it closes with 1000 and skips none.
func (c *Client) Kick(ctx context.Context, m protocol.Kick) (protocol.KickAck, error) {
	r, err := requestAs[*protocol.KickAck](ctx, c, &m)
	if err != nil {
		return protocol.KickAck{}, err
	}
	return *r, nil
}

// Ban revokes the member matched by target (display name, key, or key
// prefix) and closes its sessions with 4002; it returns the member's name.
func (c *Client) Ban(ctx context.Context, target string) (string, error) {
	r, err := requestAs[*protocol.BanAck](ctx, c, &protocol.Ban{Target: target})
	if err != nil {
		return "", err
	}
	return r.Banned, nil
}

// Unban restores a banned member (by display name or key).
func (c *Client) Unban(ctx context.Context, target string) (string, error) {
	r, err := requestAs[*protocol.UnbanAck](ctx, c, &protocol.Unban{Target: target})
	if err != nil {
		return "", err
	}
	return r.Unbanned, nil
}

// ListBans lists the mesh's banned members.
func (c *Client) ListBans(ctx context.Context) ([]protocol.BannedMember, error) {
	r, err := requestAs[*protocol.ListBansResult](ctx, c, &protocol.ListBans{})
	if err != nil {
		return nil, err
	}
	return r.Bans, nil
}

// AckMessages acknowledges pushes by messageId (client_ack; needs the
// client_ack capability). Fire-and-forget; more than protocol.MaxAckIDs ids
// are split over several frames.
func (c *Client) AckMessages(ctx context.Context, ids ...string) error {
	for len(ids) > 0 {
		n := min(len(ids), protocol.MaxAckIDs)
		m := &protocol.ClientAck{}
		if n == 1 {
			m.BrokerMessageID = ids[0]
		} else {
			m.BrokerMessageIDs = ids[:n]
		}
		if err := c.Notify(ctx, m); err != nil {
			return err
		}
		ids = ids[n:]
	}
	return nil
}
