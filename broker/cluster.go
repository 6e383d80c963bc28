package broker

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"

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
		b, _ := json.Marshal(&protocol.Push{MessageID: "", MeshID: m.Mesh, SenderPubkey: protocol.SenderSystem,
			Priority: protocol.PriorityNow, Subtype: protocol.SubtypeSystem, Event: m.Key, EventData: m.Data,
			CreatedAt: protocol.FormatTime(time.Now())})
		for _, sess := range s.hub.meshSessions(m.Mesh) {
			if sess.systemEvents && sess.memberID != m.Member {
				_ = sess.ws.Write(b)
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
				_ = sess.ws.Write(change)
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

// resync re-reads statuses of all local sessions and re-drains them: after a (re)connect of
// the LISTEN connection anything may have been missed.
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
	for _, sess := range s.hub.all() {
		s.kickDrain(sess)
	}
}

// sessionClosed runs when a socket is gone: keep the presence in grace, end it, or leave it
// to the replica that took it over.
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
	ctx, cancel := context.WithTimeout(context.WithoutCancel(s.runCtx), opTimeout)
	defer cancel()
	if mode == endGrace && s.cfg.Grace() > 0 {
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			q := s.q.WithTx(tx)
			until := time.Now().Add(s.cfg.Grace())
			if err := q.PresenceGrace(ctx, db.PresenceGraceParams{ID: sess.presenceID, NodeID: s.nodeID, GraceUntil: &until}); err != nil {
				return err
			}
			return s.releasePushes(ctx, q, sess)
		})
		if err != nil {
			s.log.Warn("keep presence in grace", "presence", sess.presenceID, "err", err)
		}
		s.log.Info("session disconnected; presence kept in grace", "presence", sess.presenceID, "grace", s.cfg.Grace())
		return
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := s.q.WithTx(tx)
		row, err := q.EndPresence(ctx, db.EndPresenceParams{ID: sess.presenceID, NodeID: s.nodeID})
		if errors.Is(err, pgx.ErrNoRows) {
			return nil // taken over or already ended
		}
		if err != nil {
			return err
		}
		if err := s.releasePushes(ctx, q, sess); err != nil {
			return err
		}
		var o pgbus.Outbox
		if err := s.presenceEnded(ctx, tx, &o, endedPresence{row.MeshID, row.MemberID, row.MemberPubkey, row.SessionPubkey, row.DisplayName, sess.presenceID}); err != nil {
			return err
		}
		return pgbus.Send(ctx, q, &o)
	})
	if err != nil {
		s.log.Warn("end presence", "presence", sess.presenceID, "err", err)
	}
	s.log.Info("session ended", "presence", sess.presenceID)
}

// releasePushes returns a closed session's unacked pushes to pending and wakes the member's
// other sessions, which may take member-addressed ones.
func (s *Server) releasePushes(ctx context.Context, q *db.Queries, sess *session) error {
	members, err := q.ReleasePresencePushes(ctx, &sess.presenceID)
	if err != nil || len(members) == 0 {
		return err
	}
	nodes, err := q.NodesOfMembers(ctx, db.NodesOfMembersParams{MeshID: sess.meshID, MemberIds: []string{sess.memberID}})
	if err != nil {
		return err
	}
	var o pgbus.Outbox
	for _, n := range nodes {
		o.Add(s.bus.NodeChannel(n.NodeID), pgbus.Message{Kind: pgbus.KindDeliveries, Member: n.MemberID})
	}
	return pgbus.Send(ctx, q, &o)
}

type endedPresence struct {
	mesh, member, memberPubkey string
	sessionPubkey              *string
	displayName, presenceID    string
}

// presenceEnded records the end of a presence: audit and the peer_left event.
func (s *Server) presenceEnded(ctx context.Context, tx pgx.Tx, o *pgbus.Outbox, p endedPresence) error {
	key := p.memberPubkey
	if p.sessionPubkey != nil {
		key = *p.sessionPubkey
	}
	s.addEvent(o, p.mesh, p.member, protocol.EventPeerLeft, peerEventData(p.presenceID, key, p.displayName, ""))
	return audit.Append(ctx, tx, []audit.Entry{{MeshID: p.mesh, Type: audit.PeerDisconnected, Actor: key,
		Data: map[string]any{"presence_id": p.presenceID, "node": s.nodeID}}})
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
		if n%30 == 0 {
			s.sweepExpired(ctx)
		}
		s.updatePendingGauge(ctx)
	}
}

func (s *Server) sweepGrace(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := s.q.WithTx(tx)
		rows, err := q.EndExpiredGrace(ctx)
		if err != nil || len(rows) == 0 {
			return err
		}
		var o pgbus.Outbox
		for _, r := range rows {
			if err := s.presenceEnded(ctx, tx, &o, endedPresence{r.MeshID, r.MemberID, r.MemberPubkey, r.SessionPubkey, r.DisplayName, r.ID}); err != nil {
				return err
			}
		}
		return pgbus.Send(ctx, q, &o)
	})
	if err != nil && ctx.Err() == nil {
		s.log.Debug("grace sweep", "err", err)
	}
}

func (s *Server) sweepWorking(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var changed []changedStatus
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := s.q.WithTx(tx)
		rows, err := q.ExpireWorking(ctx, db.ExpireWorkingParams{NodeID: s.nodeID, TtlSeconds: s.cfg.StatusTTL.Seconds()})
		if err != nil || len(rows) == 0 {
			return err
		}
		var o pgbus.Outbox
		for _, r := range rows {
			c := changedStatus{r.ID, r.MeshID, r.MemberID, r.MemberPubkey, r.DisplayName, r.NodeID, r.Status, r.SessionPubkey}
			changed = append(changed, c)
			s.statusChanged(&o, c)
		}
		return pgbus.Send(ctx, q, &o)
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
}

func (s *Server) updatePendingGauge(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	if n, err := s.q.PendingDeliveryCount(ctx); err == nil {
		s.metrics.DeliveriesPending.Set(float64(n))
	}
}
