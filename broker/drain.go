package broker

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"time"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/protocol"
)

// drainPage is how many deliveries one claim takes per session; a session with more is
// claimed again in the next round. drainChunk bounds the sessions of one claim statement.
const (
	drainPage  = 256
	drainChunk = 512
)

// drainer claims and pushes pending deliveries for this node's sessions. Wake-ups mark
// sessions dirty; one goroutine claims for all dirty sessions in one statement per chunk and
// writes each session's pushes in id order, so per-recipient order holds and a burst of
// notifications costs a few queries, not one per session.
type drainer struct {
	s     *Server
	mu    sync.Mutex
	dirty map[*session]struct{}
	wake  chan struct{}
}

func newDrainer(s *Server) *drainer {
	return &drainer{s: s, dirty: map[*session]struct{}{}, wake: make(chan struct{}, 1)}
}

// kickDrain makes sure the session's pending deliveries are claimed and pushed. Until they
// are, new deliveries for it queue behind them (backlog) instead of being pushed directly.
func (s *Server) kickDrain(sess *session) {
	sess.mu.Lock()
	if sess.closed {
		sess.mu.Unlock()
		return
	}
	sess.backlog = true
	sess.kicks++
	sess.mu.Unlock()
	d := s.drainer
	d.mu.Lock()
	d.dirty[sess] = struct{}{}
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

func (d *drainer) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.wake:
		}
		for {
			d.mu.Lock()
			batch := make([]*session, 0, min(len(d.dirty), drainChunk))
			for sess := range d.dirty {
				if len(batch) == drainChunk {
					break
				}
				batch = append(batch, sess)
				delete(d.dirty, sess)
			}
			d.mu.Unlock()
			if len(batch) == 0 {
				break
			}
			d.drain(ctx, batch)
		}
	}
}

// claimFilter is the per-session half of a claim: which deliveries each session may take
// (its member, session key and id; held priorities only when idle). ClaimDeliveries and the
// poll's SessionsWithClaimable take the same arrays.
type claimFilter struct {
	presenceIDs, memberIDs, sessionPubkeys, sessionIDs []string
	includeHeld                                        []bool
}

func (f *claimFilter) add(sess *session, idle bool) {
	f.presenceIDs = append(f.presenceIDs, sess.presenceID)
	f.memberIDs = append(f.memberIDs, sess.memberID)
	f.sessionPubkeys = append(f.sessionPubkeys, sess.sessionPubkey)
	f.sessionIDs = append(f.sessionIDs, sess.sessionID)
	f.includeHeld = append(f.includeHeld, idle)
}

// drain claims for a batch of sessions and pushes what it got.
func (d *drainer) drain(ctx context.Context, batch []*session) {
	s := d.s
	var f claimFilter
	var clientAck []bool
	kicks := make([]uint64, len(batch))
	live := batch[:0]
	for _, sess := range batch {
		sess.mu.Lock()
		closed, idle, k := sess.closed, sess.status == protocol.StatusIdle, sess.kicks
		sess.mu.Unlock()
		if closed {
			continue
		}
		kicks[len(live)] = k
		live = append(live, sess)
		f.add(sess, idle)
		clientAck = append(clientAck, sess.clientAck)
	}
	if len(live) == 0 {
		return
	}
	p := db.ClaimDeliveriesParams{NodeID: s.nodeID, MaxPerSession: drainPage, PresenceIds: f.presenceIDs,
		MemberIds: f.memberIDs, SessionPubkeys: f.sessionPubkeys, SessionIds: f.sessionIDs,
		IncludeHeld: f.includeHeld, ClientAck: clientAck}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	rows, err := s.q.ClaimDeliveries(qctx, p)
	cancel()
	if err != nil {
		// The sessions keep their backlog flag: the next poll or wake-up retries.
		if ctx.Err() == nil {
			s.log.Warn("claim deliveries", "sessions", len(live), "err", err)
		}
		return
	}
	s.metrics.DrainClaims.Inc()
	slices.SortFunc(rows, func(a, b db.ClaimDeliveriesRow) int { return cmp.Compare(a.ID, b.ID) })
	byPresence := make(map[string][]db.ClaimDeliveriesRow, len(live))
	for _, r := range rows {
		if r.PushedPresence != nil {
			byPresence[*r.PushedPresence] = append(byPresence[*r.PushedPresence], r)
		}
	}
	var unwritten []int64
	for i, sess := range live {
		got := byPresence[sess.presenceID]
		for j, r := range got {
			b := encodePush(r.EnvelopeID, r.MeshID, r.SenderPubkey, r.SenderMemberPubkey, r.Priority, r.Nonce, r.Ciphertext, r.CreatedAt)
			if err := sess.ws.Write(b); err != nil {
				for _, rest := range got[j:] { // closed meanwhile: back to pending
					unwritten = append(unwritten, rest.ID)
				}
				break
			}
			s.metrics.Pushes.Inc()
		}
		sess.mu.Lock()
		caughtUp := len(got) < drainPage && sess.kicks == kicks[i]
		if caughtUp {
			sess.backlog = false
		}
		sess.mu.Unlock()
		if !caughtUp {
			s.kickDrain(sess) // more to claim, or kicked meanwhile
		}
	}
	s.releaseUnwritten(unwritten)
}

// releaseUnwritten returns claimed deliveries whose socket closed before the write to
// pending, and wakes the recipients' other local sessions (other replicas catch up on their
// poll). Rare: only a session closing during its own push.
func (s *Server) releaseUnwritten(ids []int64) {
	if len(ids) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(s.runCtx), opTimeout)
	defer cancel()
	rows, err := s.q.ReleaseDeliveries(ctx, ids)
	if err != nil {
		s.log.Warn("release unwritten pushes; they are re-sent when the recipient's replica is declared dead or it reconnects", "count", len(ids), "err", err)
		return
	}
	for _, r := range rows {
		for _, sess := range s.hub.memberSessions(r.RecipientMemberID) {
			s.kickDrain(sess)
		}
	}
}

// marker records client_acks in batches off the hot path: every ack that arrived while the
// previous flush was in flight goes into one statement.
type marker struct {
	s    *Server
	mu   sync.Mutex
	acks db.AckDeliveriesParams
	wake chan struct{}
}

func newMarker(s *Server) *marker { return &marker{s: s, wake: make(chan struct{}, 1)} }

// acked queues a session's client_ack of message ids.
func (m *marker) acked(sess *session, ids []string) {
	m.mu.Lock()
	for _, id := range ids {
		m.acks.EnvelopeIds = append(m.acks.EnvelopeIds, id)
		m.acks.MemberIds = append(m.acks.MemberIds, sess.memberID)
		m.acks.SessionPubkeys = append(m.acks.SessionPubkeys, sess.sessionPubkey)
		m.acks.SessionIds = append(m.acks.SessionIds, sess.sessionID)
	}
	m.mu.Unlock()
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

func (m *marker) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			m.flush(context.WithoutCancel(ctx)) // last acks on the way out
			return
		case <-m.wake:
			m.flush(ctx)
		}
	}
}

func (m *marker) flush(ctx context.Context) {
	m.mu.Lock()
	acks := m.acks
	m.acks = db.AckDeliveriesParams{}
	m.mu.Unlock()
	if len(acks.EnvelopeIds) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := m.s.q.AckDeliveries(ctx, acks); err != nil {
		// The rows stay "pushed"; the recipient's next connection gets them again: at least once.
		m.s.log.Warn("record client_acks", "count", len(acks.EnvelopeIds), "err", err)
	}
}
