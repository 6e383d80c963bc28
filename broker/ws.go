package broker

import (
	"bufio"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/olahol/melody"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// WebSocket liveness per protocol.md: ping every 30 s, drop a socket silent for 75 s.
const (
	pingPeriod = 30 * time.Second
	pongWait   = 75 * time.Second
	writeWait  = 10 * time.Second
	// socketQueue bounds each socket's outgoing frames (melody's buffer, allocated whole at
	// the upgrade: every idle session pays 40 bytes a slot); the push window and the spill
	// (session.go) keep it from overflowing.
	socketQueue = 32
)

// peers serves the WebSocket protocol: the upgrade, the handshake and every frame of an
// established session. It decides nothing durable itself: the store, the committer and the
// services behind it do.
type peers struct {
	cfg       Config
	nodeID    string
	store     *store.Store
	hub       *hub
	gate      *gate
	registrar *registrar
	signals   signals
	committer *committer
	pusher    *pusher
	recorder  *recorder
	ender     *ender
	metrics   *Metrics
	log       *slog.Logger
	refusals  *sampledLog // refusals a client can cause at will
	// hellos limits each session's verified hellos on this replica (HELLO_RATE_LIMIT_PER_SESSION_PER_MIN).
	hellos *hookLimiter
	// memberHellos limits each member's, whatever the session ids (HELLO_RATE_LIMIT_PER_MEMBER_PER_MIN).
	memberHellos *hookLimiter
	draining     *atomic.Bool
	melody       *melody.Melody
	linger       *lingerer
}

func (p *peers) newMelody() *melody.Melody {
	m := melody.New()
	m.Config.MaxMessageSize = int64(p.cfg.MaxMessageBytes)
	// The guard pings every session from one ticker (hub.ping); melody's own per-socket ping
	// ticker is pushed out of the way.
	m.Config.PingPeriod = 24 * time.Hour
	m.Config.PongWait = pongWait
	if p.cfg.pongWait > 0 {
		m.Config.PongWait = p.cfg.pongWait
	}
	m.Config.WriteWait = writeWait
	m.Config.MessageBufferSize = socketQueue
	m.Upgrader.CheckOrigin = p.checkOrigin
	// An idle session holds a 1 KiB read buffer (a larger frame is read past it, straight into
	// the message) and no write buffer: each write takes one from the pool. net/http's own
	// 4 KiB pair is let go at the upgrade (slimHijack).
	m.Upgrader.ReadBufferSize = 1024
	m.Upgrader.WriteBufferSize = 4096
	m.Upgrader.WriteBufferPool = &sync.Pool{}
	m.HandleConnect(func(ms *melody.Session) {
		// melody keeps the upgrade request for the socket's life, and so does net/http (the
		// handler runs as long as the socket); it is read (client address, origin) before the
		// upgrade and never after. Emptied in place, not replaced: its headers, request line and
		// Host (up to maxHeaderBytes) would stay with every socket, a hello or not.
		r := ms.Request
		r.Header, r.Host, r.RequestURI, r.URL, r.Form, r.PostForm, r.Trailer = nil, "", "", &url.URL{}, nil, nil, nil
		p.metrics.ConnActive.Inc()
		p.metrics.ConnTotal.Inc()
		p.gate.attach(connOf(ms), ms)
	})
	m.HandleMessage(p.handleFrame)
	m.HandleMessageBinary(func(ms *melody.Session, _ []byte) {
		p.reply(ms, &protocol.Error{Code: protocol.CodeBadRequest, Message: "frames must be UTF-8 JSON text"})
	})
	m.HandleSentMessage(p.frameWritten)
	m.HandleClose(func(ms *melody.Session, code int, _ string) error {
		if code == websocket.CloseNormalClosure {
			connOf(ms).end.Set(endNow)
		}
		// A handler of our own replaces gorilla's, which answers the peer's close frame as RFC
		// 6455 requires: answer it here, as a control frame (not behind a full send queue),
		// with its code (1005 means none was sent, and may not go on the wire).
		if code == websocket.CloseNoStatusReceived {
			code = websocket.CloseNormalClosure
		}
		if wc := ms.WebsocketConnection(); wc != nil {
			_ = wc.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(code, ""), time.Now().Add(time.Second))
		}
		return nil
	})
	m.HandleError(func(ms *melody.Session, err error) {
		switch {
		case errors.Is(err, melody.ErrMessageBufferFull):
			// Reported from inside the write, which may hold the session's push order.
			p.closeSlowConsumerLater(ms, "send queue full")
		case errors.Is(err, websocket.ErrReadLimit):
			// Any client can send one, a socket without a hello too: sampled.
			p.refusals.Info("frame too large; closing 1009", "limit", p.cfg.MaxMessageBytes, "presence", presenceOf(connOf(ms)))
		}
	})
	m.HandleDisconnect(func(ms *melody.Session) {
		p.metrics.ConnActive.Dec()
		c := connOf(ms)
		p.gate.release(c)
		if sess := c.session(); sess != nil {
			p.sessionClosed(sess, c.end.Get())
		}
	})
	return m
}

// frameWritten runs on a socket's write pump after each text frame: a push written to a
// session that does not ack is delivered now, and its window slot is free again.
func (p *peers) frameWritten(ms *melody.Session, frame []byte) {
	sess := connOf(ms).session()
	if sess == nil {
		return
	}
	d, push, wake, next := sess.written(frame)
	if next != nil {
		_ = ms.Write(next) // a spilled frame, in the slot this one freed
		sess.spillWritten()
	}
	if !push {
		return
	}
	p.metrics.Pushes.Inc()
	switch {
	case !sess.clientAck.Load():
		if wc := ms.WebsocketConnection(); wc != nil {
			whenWritten(wc.UnderlyingConn(), d.id, p.recorder.wrote)
		} else {
			p.recorder.wrote(d.id)
		}
	case d.assigned:
		p.recorder.took(d.id, sess.epoch)
	}
	if wake {
		p.pusher.request(sess)
	}
}

// closeSlowConsumer closes a socket that cannot keep up with 4008. Its queue may be full, so
// the close frame can't be queued behind it: it is written as a control frame (gorilla allows
// that beside the write pump) and the connection dropped. Whatever was claimed for it and not
// written goes back to pending when the session ends.
func (p *peers) closeSlowConsumer(ms *melody.Session, why string) {
	c := connOf(ms)
	if !c.slowClosed.CompareAndSwap(false, true) {
		return // melody reports each further dropped frame; one close is enough
	}
	p.metrics.SlowConsumers.Inc()
	// A client that stops reading causes it at will (counted in slow_consumer_closes_total): sampled.
	p.refusals.Info("slow consumer; closing 4008", "presence", presenceOf(c), "why", why)
	c.end.Set(endGrace)
	if wc := ms.WebsocketConnection(); wc != nil {
		_ = wc.WriteControl(websocket.CloseMessage,
			websocket.FormatCloseMessage(protocol.CloseSlowConsumer, "slow_consumer"), time.Now().Add(time.Second))
		// Not ms.Close: it would queue behind the full buffer and report it full again.
		_ = wc.Close()
	}
}

// closeSlowConsumerLater closes with 4008 without waiting for the close frame's write (up to a
// second): for callers that push to other sessions too (the bus listener, a commit lane, the
// guard) or hold a session's push order.
func (p *peers) closeSlowConsumerLater(ms *melody.Session, why string) {
	if connOf(ms).slowClosed.Load() {
		return // closing already; melody reports each further dropped frame
	}
	go p.closeSlowConsumer(ms, why)
}

func connOf(ms *melody.Session) *conn {
	v, _ := ms.Get("c")
	c, _ := v.(*conn)
	if c == nil {
		c = &conn{}
	}
	return c
}

// checkOrigin accepts peers without an Origin (CLI and MCP clients), same-host browsers and
// the configured origins, so a random web page can't open a session with a user's cookies.
func (p *peers) checkOrigin(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	if slices.Contains(p.cfg.AllowedOrigins, "*") || slices.Contains(p.cfg.AllowedOrigins, origin) {
		return true
	}
	u, err := url.Parse(origin)
	return err == nil && strings.EqualFold(u.Host, r.Host)
}

// handleWS serves GET /ws. What it trusts: nothing. A socket is counted from before its
// upgrade until its hello succeeds (per replica and per client address), refused before the
// upgrade when either count is full, and closed when its hello is late.
func (p *peers) handleWS(w http.ResponseWriter, r *http.Request) {
	if p.draining.Load() {
		p.metrics.ConnRejected.WithLabelValues("draining").Inc()
		http.Error(w, "draining: reconnect to another replica", http.StatusServiceUnavailable)
		return
	}
	c := &conn{source: clientSource(r, p.cfg.TrustedProxyHeader)}
	if reason := p.gate.admit(c); reason != "" {
		// Refused before the upgrade: a status line, no goroutine, no socket kept.
		p.metrics.ConnRejected.WithLabelValues(reason).Inc()
		p.refusals.Info("websocket refused: too many sockets without hello", "reason", reason, "source", c.source)
		w.Header().Set("Retry-After", "1")
		http.Error(w, "too many unauthenticated connections; retry shortly", http.StatusServiceUnavailable)
		return
	}
	if err := p.melody.HandleRequestWithKeys(slimHijack{w, p.linger}, r, map[string]any{"c": c}); err != nil {
		p.gate.release(c)
		p.metrics.ConnRejected.WithLabelValues("upgrade").Inc()
		p.log.Debug("websocket upgrade", "err", err)
	}
}

// closeHelloLate closes the sockets that did not complete a hello in time.
func (p *peers) closeHelloLate(now time.Time) {
	for _, c := range p.gate.expired(now) {
		p.metrics.ConnRejected.WithLabelValues("hello_timeout").Inc()
		closeWith(c.ms, protocol.CloseHelloRefused, "hello_timeout")
	}
}

// reply writes one message to a socket; once the socket has a session it counts against the
// session's reply window. Encoding our own types can't fail.
// reply queues m on the socket and returns its size in bytes.
func (p *peers) reply(ms *melody.Session, m protocol.ServerMessage) int {
	b, err := protocol.Encode(m)
	if err != nil {
		p.log.Error("encode reply", "type", m.Type(), "err", err)
		return 0
	}
	if sess := connOf(ms).session(); sess != nil {
		sess.send(b, false)
		return len(b)
	}
	_ = ms.Write(b)
	return len(b)
}

// closeWith closes a socket with a protocol close code after the frames already queued.
func closeWith(ms *melody.Session, code int, reason string) {
	if ms != nil {
		_ = ms.CloseWithMsg(melody.FormatCloseMessage(code, reason))
	}
}

// handleFrame runs on the socket's read goroutine, one frame at a time, so a frame sent right
// after hello is processed after the hello completes.
func (p *peers) handleFrame(ms *melody.Session, frame []byte) {
	c := connOf(ms)
	msg, err := protocol.DecodeClient(frame)
	if err != nil {
		var perr *protocol.Error
		if !errors.As(err, &perr) {
			perr = &protocol.Error{Code: protocol.CodeBadRequest, Message: err.Error()}
		}
		if c.session() == nil {
			// Before hello, any message but a hello is answered no_hello (the protocol's
			// order), whatever else is wrong with it; a broken hello is told what.
			if typ := protocol.FrameType(frame); typ != "" && typ != protocol.TypeHello && typ != protocol.TypeSessionHello {
				perr = &protocol.Error{Code: protocol.CodeNoHello, Message: "send hello first", ReqID: perr.ReqID}
			}
		}
		p.metrics.BadFrames.WithLabelValues(perr.Code).Inc()
		p.refusals.Info("bad frame", "code", perr.Code, "err", perr.Message, "presence", presenceOf(c))
		p.reply(ms, perr)
		return
	}
	sess := c.session()
	switch msg.(type) {
	case *protocol.Hello, *protocol.SessionHello:
		if sess != nil {
			p.reply(ms, &protocol.Error{Code: protocol.CodeBadRequest, Message: msg.Type() + ": session already established",
				ReqID: msg.RequestID()})
			return
		}
		p.handleHello(ms, c, msg)
		return
	}
	if sess == nil {
		p.reply(ms, &protocol.Error{Code: protocol.CodeNoHello, Message: "send hello first", ReqID: msg.RequestID()})
		return
	}
	if c.removed.Load() {
		return // kicked, banned or revoked: nothing more it sends is done, its sends stored least of all
	}
	// Back-pressure: a peer that does not read its replies is not read either.
	if !sess.awaitReplyRoom(p.cfg.StallTimeout) {
		if !sess.isClosed() {
			p.closeSlowConsumer(ms, "replies not read")
		}
		return
	}
	p.dispatch(ms, sess, msg)
}

// slimHijack is the ResponseWriter of a WebSocket upgrade. net/http keeps the 4 KiB reader and
// writer it serves a connection with for as long as the handler runs, and melody's read loop
// runs in the handler, so every idle session would hold them unused besides the socket's own
// buffers. Once the connection is taken over they are swapped, in place, for minimal ones:
// 8 KiB less per session. A session's connection closes with a linger (linger.go).
type slimHijack struct {
	http.ResponseWriter
	linger *lingerer
}

func (w slimHijack) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return conn, brw, err
	}
	conn = w.linger.wrap(conn)
	if brw.Reader.Buffered() > 0 || brw.Writer.Buffered() > 0 {
		return conn, brw, nil // bytes in flight stay where they are (the upgrade refuses those)
	}
	*brw.Reader = *bufio.NewReaderSize(conn, 16)
	*brw.Writer = *bufio.NewWriterSize(conn, 16)
	return conn, brw, nil
}

func presenceOf(c *conn) string {
	if sess := c.session(); sess != nil {
		return sess.presenceID
	}
	return ""
}

// sessionClosed runs when a socket is gone: keep the presence in grace, end it, or leave it to
// the replica that took it over. The database side is batched by the ender, so a thousand
// sockets closing at once cost a few transactions, not a thousand.
func (p *peers) sessionClosed(sess *session, mode endMode) {
	sess.markClosed()
	if !p.hub.remove(sess) {
		return // replaced on this node by a newer socket of the same presence
	}
	if mode == endReplaced {
		return
	}
	if mode == endGrace && p.cfg.Grace() == 0 {
		mode = endNow
	}
	p.ender.end(presenceEnd{ref: store.PresenceRef{ID: sess.presenceID, Epoch: sess.epoch}, mode: mode})
}
