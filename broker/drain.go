package broker

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"time"

	"github.com/claudemesh/broker/db"
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
	// parked: sessions whose push window is full; written frames wake them (session.written),
	// and the guard closes those whose peer stopped reading.
	parked map[*session]struct{}
	wake   chan struct{}
}

func newDrainer(s *Server) *drainer {
	return &drainer{s: s, dirty: map[*session]struct{}{}, parked: map[*session]struct{}{}, wake: make(chan struct{}, 1)}
}

func (d *drainer) park(sess *session) {
	d.mu.Lock()
	d.parked[sess] = struct{}{}
	d.mu.Unlock()
}

// stalled returns the parked sessions whose window has been full without a write for wait,
// and forgets closed ones.
func (d *drainer) stalled(now time.Time, wait time.Duration) []*session {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []*session
	for sess := range d.parked {
		parked, stalled := sess.stalled(now, wait)
		if !parked || stalled {
			delete(d.parked, sess)
		}
		if stalled {
			out = append(out, sess)
		}
	}
	return out
}

// kickDrain makes sure the session's pending deliveries are claimed and pushed. Until they
// are, new deliveries for it queue behind them (backlog) instead of being pushed directly.
func (s *Server) kickDrain(sess *session) {
	if !sess.kick() {
		return
	}
	d := s.drainer
	d.mu.Lock()
	d.dirty[sess] = struct{}{}
	delete(d.parked, sess)
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

// drain claims for a batch of sessions, each at most the free part of its push window, and
// pushes what it got. A session whose window is full is parked until frames are written.
func (d *drainer) drain(ctx context.Context, batch []*session) {
	s := d.s
	var f claimFilter
	var limits []int32
	kicks := make([]uint64, 0, len(batch))
	live := batch[:0]
	for _, sess := range batch {
		limit, idle, k, ok := sess.drainStart(drainPage)
		switch {
		case !ok:
			continue
		case limit == 0:
			d.park(sess)
			continue
		}
		kicks = append(kicks, k)
		live = append(live, sess)
		f.add(sess, idle)
		limits = append(limits, int32(limit))
	}
	if len(live) == 0 {
		return
	}
	p := db.ClaimDeliveriesParams{NodeID: s.nodeID, PresenceIds: f.presenceIDs, MemberIds: f.memberIDs,
		SessionPubkeys: f.sessionPubkeys, SessionIds: f.sessionIDs, IncludeHeld: f.includeHeld, Limits: limits}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	rows, err := s.q.ClaimDeliveries(qctx, p)
	cancel()
	if err != nil {
		// The sessions keep their backlog flag: the next poll or wake-up retries.
		for i, sess := range live {
			sess.drainFailed(int(limits[i]))
		}
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
		for _, r := range got {
			b := encodePush(r.EnvelopeID, r.MeshID, r.SenderPubkey, r.SenderMemberPubkey, r.Priority, r.Nonce, r.Ciphertext, r.CreatedAt)
			if !sess.push(b, r.ID, true) {
				unwritten = append(unwritten, r.ID) // closed meanwhile: back to pending
			}
		}
		if sess.drainDone(len(got), int(limits[i]), kicks[i]) {
			s.kickDrain(sess) // more to claim, or kicked meanwhile
		} else if !sess.isClosed() && sess.isParked() {
			d.park(sess)
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

// marker records finished deliveries in batches off the hot path: client_acks, and pushes
// written to sessions that don't ack. Everything that arrived while the previous flush was in
// flight goes into one statement.
type marker struct {
	s    *Server
	mu   sync.Mutex
	done db.MarkDeliveredParams
	wake chan struct{}
}

func newMarker(s *Server) *marker { return &marker{s: s, wake: make(chan struct{}, 1)} }

// acked queues a session's client_ack of message ids.
func (m *marker) acked(sess *session, ids []string) {
	m.mu.Lock()
	for _, id := range ids {
		m.done.EnvelopeIds = append(m.done.EnvelopeIds, id)
		m.done.MemberIds = append(m.done.MemberIds, sess.memberID)
		m.done.SessionPubkeys = append(m.done.SessionPubkeys, sess.sessionPubkey)
		m.done.SessionIds = append(m.done.SessionIds, sess.sessionID)
	}
	m.mu.Unlock()
	m.poke()
}

// written queues a delivery whose push was written to a session that does not ack.
func (m *marker) written(id int64) {
	m.mu.Lock()
	m.done.WrittenIds = append(m.done.WrittenIds, id)
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
			m.flush(context.WithoutCancel(ctx)) // the last ones on the way out
			return
		case <-m.wake:
			m.flush(ctx)
		}
	}
}

func (m *marker) flush(ctx context.Context) {
	m.mu.Lock()
	done := m.done
	m.done = db.MarkDeliveredParams{}
	m.mu.Unlock()
	n := len(done.EnvelopeIds) + len(done.WrittenIds)
	if n == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := m.s.q.MarkDelivered(ctx, done); err != nil {
		// The rows stay "pushed": they go back to pending when the session ends and reach
		// the recipient again: at least once.
		m.s.log.Warn("record finished deliveries", "count", n, "err", err)
	}
}
