package broker

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/protocol"
)

// drainPage is how many deliveries one claim takes; a session with more loops.
const drainPage = 256

// kickDrain makes sure the session's pending deliveries are claimed and pushed in id order.
// At most one drain runs per session; a kick during a drain makes it loop once more.
func (s *Server) kickDrain(sess *session) {
	sess.mu.Lock()
	sess.backlog = true
	if sess.draining {
		sess.kicked = true
		sess.mu.Unlock()
		return
	}
	if sess.closed {
		sess.mu.Unlock()
		return
	}
	sess.draining = true
	sess.mu.Unlock()
	s.bg.Go(func() { s.drain(sess) })
}

func (s *Server) drain(sess *session) {
	for {
		sess.mu.Lock()
		sess.kicked = false
		idle := sess.status == protocol.StatusIdle
		closed := sess.closed
		sess.mu.Unlock()
		n := 0
		var err error
		if !closed {
			n, err = s.drainOnce(sess, idle)
		}
		sess.mu.Lock()
		if closed || (err == nil && n < drainPage && !sess.kicked) {
			// Caught up. A failed claim keeps the backlog flag: the poll retries it.
			sess.backlog = false
			sess.draining = false
			sess.mu.Unlock()
			return
		}
		if err != nil && !sess.kicked {
			sess.draining = false
			sess.mu.Unlock()
			return
		}
		sess.mu.Unlock()
	}
}

// drainOnce claims up to drainPage deliveries and writes them to the socket in order.
func (s *Server) drainOnce(sess *session, includeHeld bool) (int, error) {
	ctx, cancel := context.WithTimeout(s.runCtx, 5*time.Second)
	defer cancel()
	rows, err := s.q.ClaimDeliveries(ctx, db.ClaimDeliveriesParams{
		MemberID: sess.memberID, SessionPubkey: sess.sessionPubkey, SessionID: sess.sessionID,
		IncludeHeld: includeHeld, MaxRows: drainPage, NodeID: s.nodeID, PresenceID: sess.presenceID,
	})
	if err != nil {
		if s.runCtx.Err() == nil {
			s.log.Warn("claim deliveries", "presence", sess.presenceID, "err", err)
		}
		return 0, err
	}
	slices.SortFunc(rows, func(a, b db.ClaimDeliveriesRow) int { return int(a.ID - b.ID) })
	var delivered []int64
	for _, r := range rows {
		b := encodePush(r.EnvelopeID, r.MeshID, r.SenderPubkey, r.SenderMemberPubkey, r.Priority, r.Nonce, r.Ciphertext, r.CreatedAt)
		if err := sess.ws.Write(b); err != nil {
			break // closed: what was claimed is released with the session
		}
		s.metrics.Pushes.Inc()
		if !sess.clientAck {
			delivered = append(delivered, r.ID)
		}
	}
	s.marker.delivered(delivered)
	return len(rows), nil
}

// marker records delivery outcomes in batches off the hot path: pushes without client_ack
// (delivered on write) and client_acks.
type marker struct {
	s    *Server
	mu   sync.Mutex
	ids  []int64
	acks []db.AckDeliveriesParams
	wake chan struct{}
}

func newMarker(s *Server) *marker { return &marker{s: s, wake: make(chan struct{}, 1)} }

func (m *marker) delivered(ids []int64) {
	if len(ids) == 0 {
		return
	}
	m.mu.Lock()
	m.ids = append(m.ids, ids...)
	m.mu.Unlock()
	m.poke()
}

func (m *marker) acked(p db.AckDeliveriesParams) {
	m.mu.Lock()
	m.acks = append(m.acks, p)
	m.mu.Unlock()
	m.poke()
}

func (m *marker) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

func (m *marker) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			m.flush(context.WithoutCancel(ctx)) // last writes on the way out
			return
		case <-m.wake:
			m.flush(ctx)
		}
	}
}

func (m *marker) flush(ctx context.Context) {
	m.mu.Lock()
	ids, acks := m.ids, m.acks
	m.ids, m.acks = nil, nil
	m.mu.Unlock()
	if len(ids) == 0 && len(acks) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	q := m.s.q
	if len(ids) > 0 {
		if err := q.MarkDelivered(ctx, ids); err != nil {
			// The rows stay "pushed"; a reconnect or takeover re-sends them: at least once.
			m.s.log.Warn("mark delivered", "count", len(ids), "err", err)
		}
	}
	for _, a := range acks {
		if err := q.AckDeliveries(ctx, a); err != nil {
			m.s.log.Warn("client_ack", "count", len(a.EnvelopeIds), "err", err)
		}
	}
}
