package broker

import (
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/olahol/melody"

	"github.com/claudemesh/broker/protocol"
)

// WebSocket liveness per protocol.md: ping every 30 s, drop a socket silent for 75 s.
const (
	pingPeriod = 30 * time.Second
	pongWait   = 75 * time.Second
	writeWait  = 10 * time.Second
	// sendQueue bounds each session's outgoing frames; overflow closes it with 4008. Every
	// session pays for its slots (32 bytes each) even when idle: BENCHMARKS.md.
	sendQueue = 256
)

func (s *Server) newMelody() *melody.Melody {
	m := melody.New()
	m.Config.MaxMessageSize = int64(s.cfg.MaxMessageBytes)
	m.Config.PingPeriod = pingPeriod
	m.Config.PongWait = pongWait
	m.Config.WriteWait = writeWait
	m.Config.MessageBufferSize = sendQueue
	m.Upgrader.CheckOrigin = s.checkOrigin
	m.Upgrader.ReadBufferSize = 4096
	m.Upgrader.WriteBufferSize = 4096
	// Idle sessions hold no write buffer: one is taken from the pool for each write.
	m.Upgrader.WriteBufferPool = &sync.Pool{}
	m.HandleConnect(func(ms *melody.Session) {
		s.metrics.ConnActive.Inc()
		s.metrics.ConnTotal.Inc()
		s.gate.attach(connOf(ms), ms)
	})
	m.HandleMessage(s.handleFrame)
	m.HandleMessageBinary(func(ms *melody.Session, _ []byte) {
		s.reply(ms, &protocol.Error{Code: protocol.CodeBadRequest, Message: "frames must be UTF-8 JSON text"})
	})
	m.HandleSentMessage(s.frameWritten)
	m.HandleClose(func(ms *melody.Session, code int, _ string) error {
		if code == websocket.CloseNormalClosure {
			connOf(ms).end.Set(endNow)
		}
		return nil
	})
	m.HandleError(func(ms *melody.Session, err error) {
		switch {
		case errors.Is(err, melody.ErrMessageBufferFull):
			s.closeSlowConsumer(ms, "send queue full")
		case errors.Is(err, websocket.ErrReadLimit):
			s.log.Info("frame too large; closing 1009", "limit", s.cfg.MaxMessageBytes)
		}
	})
	m.HandleDisconnect(func(ms *melody.Session) {
		s.metrics.ConnActive.Dec()
		c := connOf(ms)
		s.gate.release(c)
		if sess := c.session(); sess != nil {
			s.sessionClosed(sess, c.end.Get())
		}
	})
	return m
}

// frameWritten runs on a socket's write pump after each text frame: a push written to a
// session that does not ack is delivered now, and its window slot is free again.
func (s *Server) frameWritten(ms *melody.Session, frame []byte) {
	sess := connOf(ms).session()
	if sess == nil {
		return
	}
	id, push, wake := sess.written(frame)
	if !push {
		return
	}
	s.metrics.Pushes.Inc()
	if !sess.clientAck {
		s.marker.written(id)
	}
	if wake {
		s.kickDrain(sess)
	}
}

// closeSlowConsumer closes a socket that cannot keep up with 4008. Its queue is full, so the
// close frame can't be queued behind it: it is written as a control frame (gorilla allows
// that beside the write pump) and the connection dropped. Whatever was claimed for it and not
// written goes back to pending when the session ends.
func (s *Server) closeSlowConsumer(ms *melody.Session, why string) {
	c := connOf(ms)
	if !c.slowClosed.CompareAndSwap(false, true) {
		return // melody reports each further dropped frame; one close is enough
	}
	s.metrics.SlowConsumers.Inc()
	s.log.Info("slow consumer; closing 4008", "presence", presenceOf(c), "why", why)
	c.end.Set(endGrace)
	if wc := ms.WebsocketConnection(); wc != nil {
		_ = wc.WriteControl(websocket.CloseMessage,
			websocket.FormatCloseMessage(protocol.CloseSlowConsumer, "slow_consumer"), time.Now().Add(time.Second))
		// Not ms.Close: it would queue behind the full buffer and report it full again.
		_ = wc.Close()
	}
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
func (s *Server) checkOrigin(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	if slices.Contains(s.cfg.AllowedOrigins, "*") || slices.Contains(s.cfg.AllowedOrigins, origin) {
		return true
	}
	u, err := url.Parse(origin)
	return err == nil && strings.EqualFold(u.Host, r.Host)
}

func (s *Server) handleWS(w http.ResponseWriter, r *http.Request) {
	if s.draining.Load() {
		s.metrics.ConnRejected.WithLabelValues("draining").Inc()
		http.Error(w, "draining: reconnect to another replica", http.StatusServiceUnavailable)
		return
	}
	c := &conn{source: clientSource(r, s.cfg.TrustedProxyHeader)}
	if reason := s.gate.admit(c); reason != "" {
		// Refused before the upgrade: a status line, no goroutine, no socket kept.
		s.metrics.ConnRejected.WithLabelValues(reason).Inc()
		s.refusals.Info("websocket refused: too many sockets without hello", "reason", reason, "source", c.source)
		w.Header().Set("Retry-After", "1")
		http.Error(w, "too many unauthenticated connections; retry shortly", http.StatusServiceUnavailable)
		return
	}
	if err := s.melody.HandleRequestWithKeys(w, r, map[string]any{"c": c}); err != nil {
		s.gate.release(c)
		s.metrics.ConnRejected.WithLabelValues("upgrade").Inc()
		s.log.Debug("websocket upgrade", "err", err)
	}
}

// closeHelloLate closes the sockets that did not complete a hello in time.
func (s *Server) closeHelloLate(now time.Time) {
	for _, c := range s.gate.expired(now) {
		s.metrics.ConnRejected.WithLabelValues("hello_timeout").Inc()
		closeWith(c.ms, protocol.CloseHelloRefused, "hello_timeout")
	}
}

// reply writes one message to a socket; once the socket has a session it counts against the
// session's reply window. Encoding our own types can't fail.
func (s *Server) reply(ms *melody.Session, m protocol.ServerMessage) {
	b, err := protocol.Encode(m)
	if err != nil {
		s.log.Error("encode reply", "type", m.Type(), "err", err)
		return
	}
	if sess := connOf(ms).session(); sess != nil {
		sess.send(b, false)
		return
	}
	_ = ms.Write(b)
}

// closeWith closes a socket with a protocol close code after the frames already queued.
func closeWith(ms *melody.Session, code int, reason string) {
	_ = ms.CloseWithMsg(melody.FormatCloseMessage(code, reason))
}

// handleFrame runs on the socket's read goroutine, one frame at a time, so a frame sent right
// after hello is processed after the hello completes.
func (s *Server) handleFrame(ms *melody.Session, frame []byte) {
	c := connOf(ms)
	msg, err := protocol.DecodeClient(frame)
	if err != nil {
		var perr *protocol.Error
		if !errors.As(err, &perr) {
			perr = &protocol.Error{Code: protocol.CodeBadRequest, Message: err.Error()}
		}
		s.metrics.BadFrames.WithLabelValues(perr.Code).Inc()
		s.refusals.Info("bad frame", "code", perr.Code, "err", perr.Message, "presence", presenceOf(c))
		s.reply(ms, perr)
		return
	}
	sess := c.session()
	if hello, ok := msg.(*protocol.Hello); ok {
		if sess != nil {
			s.reply(ms, &protocol.Error{Code: protocol.CodeBadRequest, Message: "hello: session already established", ReqID: hello.ReqID})
			return
		}
		s.handleHello(ms, c, hello)
		return
	}
	if sess == nil {
		s.reply(ms, &protocol.Error{Code: protocol.CodeNoHello, Message: "send hello first", ReqID: msg.RequestID()})
		return
	}
	// Back-pressure: a peer that does not read its replies is not read either.
	if !sess.awaitReplyRoom(s.cfg.StallTimeout) {
		if !sess.isClosed() {
			s.closeSlowConsumer(ms, "replies not read")
		}
		return
	}
	s.dispatch(ms, sess, msg)
}

func presenceOf(c *conn) string {
	if sess := c.session(); sess != nil {
		return sess.presenceID
	}
	return ""
}
