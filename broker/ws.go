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
	m.HandleConnect(func(ms *melody.Session) { s.metrics.ConnActive.Inc(); s.metrics.ConnTotal.Inc() })
	m.HandleMessage(s.handleFrame)
	m.HandleMessageBinary(func(ms *melody.Session, _ []byte) {
		s.reply(ms, &protocol.Error{Code: protocol.CodeBadRequest, Message: "frames must be UTF-8 JSON text"})
	})
	m.HandleClose(func(ms *melody.Session, code int, _ string) error {
		if code == websocket.CloseNormalClosure {
			connOf(ms).end.Set(endNow)
		}
		return nil
	})
	m.HandleError(func(ms *melody.Session, err error) {
		switch {
		case errors.Is(err, melody.ErrMessageBufferFull):
			// The queue is full, so the close frame can't be queued behind it: write it as a
			// control frame (gorilla allows that concurrently with the write pump) and drop.
			s.metrics.SlowConsumers.Inc()
			connOf(ms).end.Set(endGrace)
			if c := ms.WebsocketConnection(); c != nil {
				_ = c.WriteControl(websocket.CloseMessage,
					websocket.FormatCloseMessage(protocol.CloseSlowConsumer, "slow_consumer"), time.Now().Add(time.Second))
			}
			_ = ms.Close()
		case errors.Is(err, websocket.ErrReadLimit):
			s.log.Info("frame too large; closing 1009", "limit", s.cfg.MaxMessageBytes)
		}
	})
	m.HandleDisconnect(func(ms *melody.Session) {
		s.metrics.ConnActive.Dec()
		c := connOf(ms)
		if c.s != nil {
			s.sessionClosed(c.s, c.end.Get())
		}
	})
	return m
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
	if err := s.melody.HandleRequestWithKeys(w, r, map[string]any{"c": &conn{}}); err != nil {
		s.metrics.ConnRejected.WithLabelValues("upgrade").Inc()
		s.log.Debug("websocket upgrade", "err", err)
	}
}

// reply writes one message to a socket. Encoding our own types can't fail.
func (s *Server) reply(ms *melody.Session, m protocol.ServerMessage) {
	b, err := protocol.Encode(m)
	if err != nil {
		s.log.Error("encode reply", "type", m.Type(), "err", err)
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
		s.log.Info("bad frame", "code", perr.Code, "err", perr.Message, "presence", presenceOf(c))
		s.reply(ms, perr)
		return
	}
	if hello, ok := msg.(*protocol.Hello); ok {
		if c.s != nil {
			s.reply(ms, &protocol.Error{Code: protocol.CodeBadRequest, Message: "hello: session already established", ReqID: hello.ReqID})
			return
		}
		s.handleHello(ms, c, hello)
		return
	}
	if c.s == nil {
		s.reply(ms, &protocol.Error{Code: protocol.CodeNoHello, Message: "send hello first", ReqID: msg.RequestID()})
		return
	}
	s.dispatch(ms, c.s, msg)
}

func presenceOf(c *conn) string {
	if c.s == nil {
		return ""
	}
	return c.s.presenceID
}
