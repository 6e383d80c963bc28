package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// pollInterval is the slow catch-up: a lost notification delays a delivery by at most this.
const pollInterval = 3 * time.Second

func peerEventData(presenceID, pubkey, displayName, status string) json.RawMessage {
	b, _ := json.Marshal(map[string]string{"presenceId": presenceID, "pubkey": pubkey, "displayName": displayName, "status": status})
	return b
}

// addEvent queues a system event for every replica (each pushes it to its own sessions).
func (s *Server) addEvent(o *pgbus.Outbox, meshID, aboutMember, event string, data json.RawMessage) {
	o.Add(s.bus.ClusterChannel(), pgbus.Message{Kind: pgbus.KindEvent, Mesh: meshID, Member: aboutMember, Key: event, Data: data})
}

// runBus applies bus messages and resyncs after (re)connects, overflows and on a slow poll.
func (s *Server) runBus(ctx context.Context) {
	poll := time.NewTicker(pollInterval)
	defer poll.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case m := <-s.bus.Messages():
			s.metrics.BusReceived.Inc()
			s.applyBusMessage(ctx, m)
		case <-s.bus.Resync():
			s.resync(ctx)
		case <-poll.C:
			s.resync(ctx)
		}
	}
}

func (s *Server) applyBusMessage(ctx context.Context, m pgbus.Message) {
	switch m.Kind {
	case pgbus.KindDeliveries:
		for _, sess := range s.hub.memberSessions(m.Member) {
			s.kickDrain(sess)
		}
	case pgbus.KindStatus:
		if sess := s.hub.get(m.Presence); sess != nil {
			s.reloadStatus(ctx, sess)
		}
	case pgbus.KindReplace:
		if sess := s.hub.get(m.Presence); sess != nil && m.Node != s.nodeID {
			connOf(sess.ws).end.Set(endReplaced)
			closeWith(sess.ws, protocol.CloseSessionReplaced, protocol.CloseReasonSessionReplaced)
		}
	case pgbus.KindKick:
		for _, sess := range s.hub.memberSessions(m.Member) {
			connOf(sess.ws).end.Set(endNow)
			reason := "revoked"
			if m.Code == protocol.CloseKicked {
				reason = "kicked"
			}
			closeWith(sess.ws, m.Code, reason)
		}
	case pgbus.KindEvent:
		b, _ := protocol.Encode(&protocol.Push{MessageID: "", MeshID: m.Mesh, SenderPubkey: protocol.SenderSystem,
			Priority: protocol.PriorityNow, Subtype: protocol.SubtypeSystem, Event: m.Key, EventData: m.Data,
			CreatedAt: protocol.FormatTime(time.Now())})
		for _, sess := range s.hub.meshSessions(m.Mesh) {
			if sess.systemEvents && sess.memberID != m.Member {
				sess.send(b, false)
			}
		}
	case pgbus.KindState:
		change := m.Data
		if len(change) == 0 {
			row, err := s.q.GetState(ctx, db.GetStateParams{MeshID: m.Mesh, Key: m.Key})
			if err != nil {
				s.log.Warn("load changed state", "mesh", m.Mesh, "err", err)
				return
			}
			change, _ = json.Marshal(&protocol.StateChange{Key: row.Key, Value: row.Value, UpdatedBy: row.UpdatedBy})
		}
		for _, sess := range s.hub.meshSessions(m.Mesh) {
			if sess.presenceID != m.Presence {
				sess.send(change, false)
			}
		}
	}
}

// reloadStatus reads a local session's status from the table (the truth) and releases held
// messages when it became idle.
func (s *Server) reloadStatus(ctx context.Context, sess *session) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	p, err := s.q.PresenceByID(ctx, sess.presenceID)
	if err != nil {
		s.log.Warn("reload status", "presence", sess.presenceID, "err", err)
		return
	}
	s.noteStatus(sess, protocol.Status(p.Status))
}

func (s *Server) noteStatus(sess *session, st protocol.Status) {
	sess.setStatus(st)
	if st == protocol.StatusIdle {
		s.kickDrain(sess)
	}
}

// resync re-reads the statuses of all local sessions and drains those with something to
// claim: after a (re)connect of the LISTEN connection anything may have been missed, and the
// slow poll backs up notifications lost any other way. It asks the table which sessions have
// a claimable delivery rather than claiming for every session, so a replica whose sessions
// are caught up polls with two read-only queries and takes no row locks.
func (s *Server) resync(ctx context.Context) {
	if s.hub.len() == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	rows, err := s.q.NodePresenceStatus(ctx, s.nodeID)
	if err != nil {
		s.log.Debug("resync", "err", err)
		return
	}
	for _, r := range rows {
		if sess := s.hub.get(r.ID); sess != nil {
			sess.setStatus(protocol.Status(r.Status))
		}
	}
	var f claimFilter
	for _, sess := range s.hub.all() {
		sess.mu.Lock()
		retry, idle := sess.backlog, sess.status == protocol.StatusIdle
		sess.mu.Unlock()
		if retry { // a drain that failed (Postgres away) is retried here
			s.kickDrain(sess)
			continue
		}
		f.add(sess, idle)
	}
	if len(f.presenceIDs) == 0 {
		return
	}
	claimable, err := s.q.SessionsWithClaimable(ctx, db.SessionsWithClaimableParams{PresenceIds: f.presenceIDs,
		MemberIds: f.memberIDs, SessionPubkeys: f.sessionPubkeys, SessionIds: f.sessionIDs, IncludeHeld: f.includeHeld})
	if err != nil {
		s.log.Debug("resync", "err", err)
		return
	}
	for _, id := range claimable {
		if sess := s.hub.get(id); sess != nil {
			s.kickDrain(sess)
		}
	}
}

// sessionClosed runs when a socket is gone: keep the presence in grace, end it, or leave it
// to the replica that took it over. The database side is batched by the ender, so a
// thousand sockets closing at once cost a few transactions, not a thousand.
func (s *Server) sessionClosed(sess *session, mode endMode) {
	sess.mu.Lock()
	sess.closed = true
	sess.mu.Unlock()
	if !s.hub.remove(sess) {
		return // replaced on this node by a newer socket of the same presence
	}
	if mode == endReplaced {
		return
	}
	if mode == endGrace && s.cfg.Grace() == 0 {
		mode = endNow
	}
	s.ender.enqueue(presenceEnd{presenceID: sess.presenceID, epoch: sess.epoch, mode: mode})
}

type presenceEnd struct {
	presenceID string
	epoch      int64 // the registration the closed socket belonged to
	mode       endMode
}

// ender records closed sessions in batches: one transaction, one audit append and one
// notification per node for everything that closed while the previous batch was in flight.
// A batch that fails is retried, so a presence never stays live for a socket that is gone
// (and the reconcile in the sweeper backs that up).
type ender struct {
	s       *Server
	mu      sync.Mutex
	pending []presenceEnd
	wake    chan struct{}
}

func newEnder(s *Server) *ender { return &ender{s: s, wake: make(chan struct{}, 1)} }

func (e *ender) enqueue(p presenceEnd) {
	e.mu.Lock()
	e.pending = append(e.pending, p)
	e.mu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

func (e *ender) run(ctx context.Context) {
	retry := time.NewTimer(time.Hour)
	defer retry.Stop()
	failures := 0
	for {
		select {
		case <-ctx.Done():
			// On the way out (drain): record what closed, with a deadline of its own.
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			_ = e.flush(fctx)
			cancel()
			return
		case <-e.wake:
		case <-retry.C:
		}
		if err := e.flush(ctx); err != nil {
			failures++
			retry.Reset(min(time.Duration(failures)*200*time.Millisecond, 3*time.Second))
			continue
		}
		failures = 0
	}
}

// flush writes every queued end; on failure they stay queued for the retry.
func (e *ender) flush(ctx context.Context) error {
	e.mu.Lock()
	batch := e.pending
	e.pending = nil
	e.mu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	err := e.store(ctx, batch)
	if err != nil {
		e.mu.Lock()
		e.pending = append(batch, e.pending...)
		e.mu.Unlock()
		if ctx.Err() == nil {
			e.s.log.Warn("record closed sessions; retrying", "count", len(batch), "err", err)
		}
	}
	return err
}

func (e *ender) store(ctx context.Context, batch []presenceEnd) error {
	s := e.s
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var graceIDs, endIDs, all []string
	var graceEpochs, endEpochs []int64
	for _, p := range batch {
		all = append(all, p.presenceID)
		if p.mode == endGrace {
			graceIDs, graceEpochs = append(graceIDs, p.presenceID), append(graceEpochs, p.epoch)
		} else {
			endIDs, endEpochs = append(endIDs, p.presenceID), append(endEpochs, p.epoch)
		}
	}
	return s.inTx(ctx, func(q *db.Queries, o *pgbus.Outbox) ([]audit.Entry, error) {
		if len(graceIDs) > 0 {
			until := time.Now().Add(s.cfg.Grace())
			if err := q.GracePresences(ctx, db.GracePresencesParams{Ids: graceIDs, Epochs: graceEpochs, NodeID: s.nodeID, GraceUntil: &until}); err != nil {
				return nil, fmt.Errorf("grace presences: %w", err)
			}
		}
		var entries []audit.Entry
		if len(endIDs) > 0 {
			ended, err := q.EndPresences(ctx, db.EndPresencesParams{Ids: endIDs, Epochs: endEpochs, NodeID: s.nodeID})
			if err != nil {
				return nil, fmt.Errorf("end presences: %w", err)
			}
			for _, r := range ended {
				entries = append(entries, s.presenceEnded(o, endedPresence{r.MeshID, r.MemberID, r.MemberPubkey, r.SessionPubkey, r.DisplayName, r.ID}))
			}
		}
		released, err := q.ReleasePresencePushes(ctx, all)
		if err != nil {
			return nil, fmt.Errorf("release pushes: %w", err)
		}
		byMesh := map[string][]string{}
		for _, r := range released {
			byMesh[r.MeshID] = append(byMesh[r.MeshID], r.RecipientMemberID)
		}
		if err := s.wakeHolders(ctx, q, o, byMesh); err != nil {
			return nil, err
		}
		return entries, nil
	})
}

// wakeHolders tells the nodes holding live sessions of these recipients (mesh → member ids)
// that deliveries were released to pending: another session may take them now.
func (s *Server) wakeHolders(ctx context.Context, q *db.Queries, o *pgbus.Outbox, byMesh map[string][]string) error {
	for mesh, members := range byMesh {
		holders, err := q.NodesOfMembers(ctx, db.NodesOfMembersParams{MeshID: mesh, MemberIds: members})
		if err != nil {
			return fmt.Errorf("find holders: %w", err)
		}
		for _, h := range holders {
			o.Add(s.bus.NodeChannel(h.NodeID), pgbus.Message{Kind: pgbus.KindDeliveries, Member: h.MemberID})
		}
	}
	return nil
}

// reconcile puts presences this node owns but holds no session for into grace, so the end of
// a session that could not be recorded (the database was away) is never lost for good.
func (s *Server) reconcile(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	rows, err := s.q.OrphanPresences(ctx, s.nodeID)
	if err != nil {
		return
	}
	for _, r := range rows {
		if s.hub.get(r.ID) == nil {
			s.log.Warn("presence without a session on this node; ending it after its grace", "presence", r.ID)
			s.ender.enqueue(presenceEnd{presenceID: r.ID, epoch: r.Epoch, mode: endGrace})
		}
	}
}

type endedPresence struct {
	mesh, member, memberPubkey string
	sessionPubkey              *string
	displayName, presenceID    string
}

// presenceEnded queues the peer_left event and returns the audit entry of an ended presence.
func (s *Server) presenceEnded(o *pgbus.Outbox, p endedPresence) audit.Entry {
	key := p.memberPubkey
	if p.sessionPubkey != nil {
		key = *p.sessionPubkey
	}
	s.addEvent(o, p.mesh, p.member, protocol.EventPeerLeft, peerEventData(p.presenceID, key, p.displayName, ""))
	return audit.Entry{MeshID: p.mesh, Type: audit.PeerDisconnected, Actor: key,
		Data: map[string]any{"presence_id": p.presenceID, "node": s.nodeID}}
}

// runSweeper ends presences whose grace ran out, flips sessions stuck in working to idle,
// expires deliveries and drops stale hook signals.
func (s *Server) runSweeper(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	n := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n++
		s.sweepGrace(ctx)
		s.sweepWorking(ctx)
		if n%5 == 0 {
			s.updatePendingGauge(ctx)
		}
		if n%15 == 0 {
			s.reconcile(ctx)
		}
		if n%30 == 0 {
			s.sweepExpired(ctx)
		}
	}
}

func (s *Server) sweepGrace(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	err := s.inTx(ctx, func(q *db.Queries, o *pgbus.Outbox) ([]audit.Entry, error) {
		rows, err := q.EndExpiredGrace(ctx)
		if err != nil || len(rows) == 0 {
			return nil, err
		}
		var entries []audit.Entry
		for _, r := range rows {
			entries = append(entries, s.presenceEnded(o, endedPresence{r.MeshID, r.MemberID, r.MemberPubkey, r.SessionPubkey, r.DisplayName, r.ID}))
		}
		return entries, nil
	})
	if err != nil && ctx.Err() == nil {
		s.log.Debug("grace sweep", "err", err)
	}
}

func (s *Server) sweepWorking(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var changed []changedStatus
	err := s.inTx(ctx, func(q *db.Queries, o *pgbus.Outbox) ([]audit.Entry, error) {
		rows, err := q.ExpireWorking(ctx, db.ExpireWorkingParams{NodeID: s.nodeID, TtlSeconds: s.cfg.StatusTTL.Seconds()})
		if err != nil {
			return nil, err
		}
		for _, r := range rows {
			c := changedStatus{r.ID, r.MeshID, r.MemberID, r.MemberPubkey, r.DisplayName, r.NodeID, r.Status, r.SessionPubkey}
			changed = append(changed, c)
			s.statusChanged(o, c)
		}
		return nil, nil
	})
	if err != nil {
		if ctx.Err() == nil {
			s.log.Debug("working sweep", "err", err)
		}
		return
	}
	for _, c := range changed {
		if sess := s.hub.get(c.id); sess != nil {
			s.noteStatus(sess, protocol.StatusIdle)
		}
	}
}

func (s *Server) sweepExpired(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if n, err := s.q.ExpireDeliveries(ctx); err == nil && n > 0 {
		s.log.Info("expired deliveries", "count", n)
	}
	_, _ = s.q.DeleteOldEnvelopes(ctx)
	_ = s.q.DeleteExpiredPendingStatus(ctx)
	_, _ = s.q.DeleteExpiredSignatures(ctx)
}

// runGuard enforces the local deadlines with one ticker for the whole replica (no timer per
// socket): hellos that did not come in time, and sessions that stopped reading. A session
// whose push window stayed full without a single write for StallTimeout is closed with 4008
// and what was claimed for it goes back to pending; the timeout is shorter than writeWait so
// the close frame can still get out to a peer that reads slowly.
func (s *Server) runGuard(ctx context.Context) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			s.closeHelloLate(now)
			for _, sess := range s.drainer.stalled(now, s.cfg.StallTimeout) {
				go s.closeSlowConsumer(sess.ws, "pushes not read") // its close frame may wait up to a second
			}
		}
	}
}

func (s *Server) updatePendingGauge(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	if n, err := s.q.PendingDeliveryCount(ctx); err == nil {
		s.metrics.DeliveriesPending.Set(float64(n))
	}
}
