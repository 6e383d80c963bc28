package broker

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// claimPage is how many deliveries one claim takes per session at most (its push window caps
// it further); claimChunk bounds the sessions of one claim statement.
const (
	claimPage  = 256
	claimChunk = 512
)

// claimRetry is how soon a session that a claim skipped (another transaction held its row: a
// takeover, a change of status) is claimed for again; the wait grows with how long the row has
// been held, to claimRetryMax. A takeover has committed by then, and the claim finds the
// session gone; a change of status has left the row. A row held for claimHeldLogged is logged:
// that is not a takeover but a transaction left open.
const (
	claimRetry      = 50 * time.Millisecond
	claimRetryMax   = 1600 * time.Millisecond
	claimHeldLogged = 5 * time.Second
)

// errSessionRowHeld is what the log says of a session whose row has been held claimHeldLogged.
var errSessionRowHeld = errors.New("a session's row has been held by another transaction for seconds; its deliveries wait")

// pusher claims pending deliveries for this node's sessions and pushes them. A wake-up marks a
// session dirty; one goroutine claims for all dirty sessions in one statement per chunk and
// writes each session's pushes in id order, so per-recipient order holds and a burst of
// notifications costs a few statements, not one per session. A session whose push window is
// full is parked until its frames are written (session.written wakes it), and the guard closes
// those whose peer stopped reading.
type pusher struct {
	service
	store   *store.Store
	nodeID  string
	log     *slog.Logger
	metrics *Metrics
	// local finds a session of this node by presence, for a push or a claim, numbering the
	// lookup first (hub.wakes).
	local func(presenceID string) *session
	// giveBack returns deliveries that could not be pushed to pending (release; tests fake it).
	giveBack func(ids []int64)

	mu     sync.Mutex
	dirty  map[*session]struct{}
	parked map[*session]struct{}
	wake   chan struct{}
}

func newPusher(st *store.Store, nodeID string, log *slog.Logger, m *Metrics, h *hub) *pusher {
	p := &pusher{store: st, nodeID: nodeID, log: log, metrics: m, local: h.wakeSession,
		dirty: map[*session]struct{}{}, parked: map[*session]struct{}{}, wake: make(chan struct{}, 1)}
	p.giveBack = func(ids []int64) { p.release(ids, true) }
	return p
}

// request makes sure the session's pending deliveries are claimed and pushed. Until they are,
// new deliveries for it queue behind them (its backlog) instead of being pushed directly.
func (p *pusher) request(sess *session) {
	if !sess.requestPush() {
		return
	}
	p.mu.Lock()
	p.dirty[sess] = struct{}{}
	delete(p.parked, sess)
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// Start runs the claim loop until Stop.
func (p *pusher) Start(ctx context.Context) error {
	return p.start(ctx, func(ctx context.Context) {
		for {
			select {
			case <-ctx.Done():
				return
			case <-p.wake:
			}
			for batch := p.takeDirty(); len(batch) > 0; batch = p.takeDirty() {
				p.claimAndPush(ctx, batch)
			}
		}
	})
}

func (p *pusher) takeDirty() []*session {
	p.mu.Lock()
	defer p.mu.Unlock()
	batch := make([]*session, 0, min(len(p.dirty), claimChunk))
	for sess := range p.dirty {
		if len(batch) == claimChunk {
			break
		}
		batch = append(batch, sess)
		delete(p.dirty, sess)
	}
	return batch
}

func (p *pusher) park(sess *session) {
	p.mu.Lock()
	p.parked[sess] = struct{}{}
	p.mu.Unlock()
}

// stalled returns the parked sessions whose window has been full without a write for wait,
// and forgets the ones no longer parked.
func (p *pusher) stalled(now time.Time, wait time.Duration) []*session {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []*session
	for sess := range p.parked {
		parked, stalled := sess.stalled(now, wait)
		if !parked || stalled {
			delete(p.parked, sess)
		}
		if stalled {
			out = append(out, sess)
		}
	}
	return out
}

// claimAndPush claims for a batch of sessions, each at most the free part of its push window,
// and pushes what it got.
func (p *pusher) claimAndPush(ctx context.Context, batch []*session) {
	var claims []store.ClaimFor
	var requests []uint64
	live := batch[:0]
	for _, sess := range batch {
		limit, idle, k, ok := sess.claimStart(claimPage)
		switch {
		case !ok:
			continue
		case limit == 0:
			p.park(sess)
			continue
		}
		requests = append(requests, k)
		live = append(live, sess)
		retake, all := sess.claimAssigned()
		claims = append(claims, store.ClaimFor{PresenceID: sess.presenceID, Epoch: sess.epoch, MemberID: sess.memberID,
			SessionPubkey: sess.sessionPubkey, SessionID: sess.sessionID, IncludeHeld: idle, Limit: limit,
			Retake: retake, TakeAssigned: all})
	}
	if len(live) == 0 {
		return
	}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	rows, skipped, err := p.store.Claim(qctx, p.nodeID, claims)
	cancel()
	if err != nil {
		// The sessions keep their backlog: the next poll or wake-up retries.
		for i, sess := range live {
			sess.claimFailed(claims[i].Limit)
		}
		if ctx.Err() == nil {
			p.metrics.backgroundError(p.log, "claim", err, "sessions", len(live), "retry", "next poll")
		}
		return
	}
	p.metrics.Claims.Inc()
	slices.SortFunc(rows, func(a, b store.Claimed) int { return cmp.Compare(a.ID, b.ID) })
	byPresence := make(map[string][]store.Claimed, len(live))
	for _, r := range rows {
		byPresence[r.PresenceID] = append(byPresence[r.PresenceID], r)
	}
	// A presence's rows go to its newest socket in the batch: an older one, replaced on this
	// replica and still closing, was claimed for at its own epoch and took nothing.
	newest := make(map[string]*session, len(live))
	for _, sess := range live {
		if cur := newest[sess.presenceID]; cur == nil || sess.epoch > cur.epoch {
			newest[sess.presenceID] = sess
		}
	}
	now := time.Now()
	held := make(map[string]bool, len(skipped))
	for _, id := range skipped {
		held[id] = true
	}
	var retry map[time.Duration][]*session
	var unwritten []int64
	for i, sess := range live {
		if held[sess.presenceID] && newest[sess.presenceID] == sess {
			// Skipped: nothing was taken for it. Claimed for again shortly.
			p.metrics.ClaimSkips.Inc()
			arm, wait, heldFor := sess.claimSkipped(claims[i].Limit, now)
			if heldFor >= claimHeldLogged {
				p.metrics.backgroundError(p.log, "session_row_held", errSessionRowHeld, "presence", sess.presenceID,
					"held", heldFor.Round(time.Second))
			}
			if arm {
				if retry == nil {
					retry = map[time.Duration][]*session{}
				}
				retry[wait] = append(retry[wait], sess)
			}
			continue
		}
		var got []store.Claimed
		if newest[sess.presenceID] == sess {
			got = byPresence[sess.presenceID]
		}
		unwritten = append(unwritten, pushClaimed(sess, got)...)
		switch sess.claimDone(len(got), claims[i].Limit, requests[i]) {
		case claimAgain:
			p.request(sess)
		case claimParked:
			p.park(sess)
		}
	}
	p.release(unwritten, false)
	for wait, sessions := range retry {
		time.AfterFunc(wait, func() {
			for _, sess := range sessions {
				sess.retryFired()
				p.request(sess)
			}
		})
	}
}

// pushClaimed pushes what a claim took for sess, in id order, and returns the ones whose socket
// closed meanwhile (back to pending). An assigned one its notification already pushed (the claim
// took it before its record was written: all assigned ones were asked for) is not pushed again.
func pushClaimed(sess *session, got []store.Claimed) (unwritten []int64) {
	for _, r := range got {
		if r.FromAssigned {
			if sess.pushedFromNotification(r.ID) {
				sess.unreserve()
				continue
			}
			sess.pushedClaimed(r.ID)
		}
		if !sess.push(pushFrame(&r.Push), r.ID, true, false) {
			unwritten = append(unwritten, r.ID)
		}
	}
	return unwritten
}

// release returns to pending claimed deliveries whose socket closed before the write, or
// (onlyAssigned) assigned ones whose session is gone; the statement wakes every replica, this
// one included, for the recipients' sessions. Rare: a session closing during its push.
func (p *pusher) release(ids []int64, onlyAssigned bool) {
	if len(ids) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if _, err := p.store.Release(ctx, p.nodeID, ids, onlyAssigned); err != nil {
		p.metrics.backgroundError(p.log, "release_unwritten", err, "count", len(ids),
			"then", "re-sent when the recipient's replica is declared dead or the recipient reconnects")
	}
}

// assigned is a delivery a commit assigned to a session of this node, with its push frame.
type assigned struct {
	presenceID string
	id         int64
	priority   protocol.Priority
	frame      []byte
}

// pushAssigned pushes deliveries a commit (this replica's or another's) assigned to sessions of
// this node: each goes into a slot of its session's push window at once. One that can't (the
// window full, a backlog to keep order behind) stays assigned, with every later one of its
// session, and that session's next claim takes them, in order with what is pending: nothing
// is written back, and no row is moved while a claim might be taking its neighbours (a claim
// skips locked rows, so a row being released could be overtaken). One whose session is gone
// goes back to pending for the member's other sessions.
func (p *pusher) pushAssigned(items []assigned) {
	var back []int64
	var failed map[string]*session // presence → its session, nil when gone
	for _, a := range items {
		sess := p.local(a.presenceID)
		stale := false
		if sess != nil {
			_, behind := failed[a.presenceID]
			ok, claimed, st := sess.reserveAssigned(a.id, a.priority, behind)
			if claimed {
				continue // a claim took it first (its notification came late): already pushed
			}
			if ok && sess.push(a.frame, a.id, true, true) {
				continue
			}
			stale = st
		}
		if failed == nil {
			failed = map[string]*session{}
		}
		failed[a.presenceID] = sess
		switch {
		case sess == nil || sess.isClosed():
			back = append(back, a.id)
		case stale:
			// The status change that let it be assigned released older deliveries too, which
			// its notification brings later: the claim takes them first (see statusLate).
			sess.lateStatus()
		default:
			sess.toRetake(a.id)
		}
	}
	if len(back) > 0 {
		p.giveBack(back)
	}
	for _, sess := range failed {
		if sess != nil && !sess.isClosed() {
			p.request(sess)
		}
	}
}
