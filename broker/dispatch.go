package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/olahol/melody"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// opTimeout bounds the database work of one client request.
const opTimeout = 5 * time.Second

// Status sources, by rank: hook > manual > inferred.
const (
	sourceHook     = "hook"
	sourceManual   = "manual"
	sourceInferred = "inferred"
)

// dispatch handles one decoded message of an established session. Errors that are the
// broker's (database down) answer with an error frame; the session stays open.
func (s *Server) dispatch(ms *melody.Session, sess *session, msg protocol.ClientMessage) {
	if m, ok := msg.(*protocol.Send); ok {
		s.enqueueSend(sess, m)
		return
	}
	ctx, cancel := context.WithTimeout(s.runCtx, opTimeout)
	defer cancel()
	var reply protocol.ServerMessage
	var err error
	switch m := msg.(type) {
	case *protocol.ClientAck:
		s.marker.acked(sess, m.IDs())
	case *protocol.ListPeers:
		reply, err = s.listPeers(ctx, sess, m)
	case *protocol.SetStatus:
		err = s.setStatus(ctx, sess.presenceID, m.Status, sourceManual)
	case *protocol.SetSummary:
		err = s.q.SetPresenceSummary(ctx, db.SetPresenceSummaryParams{ID: sess.presenceID, Summary: m.Summary})
	case *protocol.JoinGroup:
		err = s.changeGroups(ctx, sess, func(gs []groupEntry) ([]groupEntry, error) {
			for i, g := range gs {
				if g.Name == m.Name {
					gs[i].Role = m.Role
					return gs, nil
				}
			}
			if len(gs) >= s.cfg.MaxGroupsPerSession {
				return nil, &protocol.Error{Code: protocol.CodeQuotaExceeded,
					Message: fmt.Sprintf("a session may be in at most %d groups; leave one first", s.cfg.MaxGroupsPerSession)}
			}
			return append(gs, groupEntry{Name: m.Name, Role: m.Role}), nil
		})
	case *protocol.LeaveGroup:
		err = s.changeGroups(ctx, sess, func(gs []groupEntry) ([]groupEntry, error) {
			out := gs[:0]
			for _, g := range gs {
				if g.Name != m.Name {
					out = append(out, g)
				}
			}
			return out, nil
		})
	case *protocol.SetState:
		err = s.setState(ctx, sess, m)
	case *protocol.GetState:
		reply, err = s.getState(ctx, sess, m)
	case *protocol.ListState:
		reply, err = s.listState(ctx, sess, m)
	case *protocol.MessageStatus:
		reply, err = s.messageStatus(ctx, sess, m)
	default:
		reply = &protocol.Error{Code: protocol.CodeUnknownMessageType, Message: "unknown type " + msg.Type(), ReqID: msg.RequestID()}
	}
	if err != nil {
		var perr *protocol.Error
		if !errors.As(err, &perr) {
			s.log.Warn("request failed", "type", msg.Type(), "presence", sess.presenceID, "err", err)
			perr = &protocol.Error{Code: "internal", Message: "broker could not complete " + msg.Type() + "; retry"}
		}
		perr.ReqID = msg.RequestID()
		reply = perr
	}
	if reply != nil {
		s.reply(ms, reply)
	}
}

func (s *Server) listPeers(ctx context.Context, sess *session, m *protocol.ListPeers) (protocol.ServerMessage, error) {
	rows, err := s.q.ListLivePresence(ctx, sess.meshID)
	if err != nil {
		return nil, fmt.Errorf("list presence: %w", err)
	}
	out := &protocol.PeersList{Peers: make([]protocol.Peer, 0, len(rows)), ReqID: m.ReqID}
	for _, p := range rows {
		var groups []protocol.Group
		_ = json.Unmarshal(p.Groups, &groups)
		if groups == nil {
			groups = []protocol.Group{}
		}
		key := p.MemberPubkey
		if p.SessionPubkey != nil {
			key = *p.SessionPubkey
		}
		out.Peers = append(out.Peers, protocol.Peer{
			Pubkey: key, DisplayName: p.DisplayName, Status: protocol.Status(p.Status), Summary: p.Summary,
			Groups: groups, SessionID: p.SessionID, ConnectedAt: protocol.FormatTime(p.ConnectedAt),
		})
	}
	return out, nil
}

func (s *Server) changeGroups(ctx context.Context, sess *session, f func([]groupEntry) ([]groupEntry, error)) error {
	sess.mu.Lock()
	gs, err := f(append([]groupEntry(nil), sess.groups...))
	sess.mu.Unlock()
	if err != nil {
		return err
	}
	raw, _ := json.Marshal(gs)
	if err := s.q.SetPresenceGroups(ctx, db.SetPresenceGroupsParams{ID: sess.presenceID, Groups: raw}); err != nil {
		return fmt.Errorf("set groups: %w", err)
	}
	s.hub.setGroups(sess, gs)
	return nil
}

func (s *Server) applyStatusParams(presenceID string, st protocol.Status, source string) db.ApplyStatusParams {
	return db.ApplyStatusParams{ID: presenceID, Status: string(st), Source: source, FreshSeconds: s.cfg.HookFreshWindow.Seconds()}
}

// setStatus applies the status model in SQL and tells the owning replica and the mesh.
// A change refused by the model (fresher hook, dnd) is not an error.
func (s *Server) setStatus(ctx context.Context, presenceID string, st protocol.Status, source string) error {
	return s.inTx(ctx, func(q *db.Queries, o *pgbus.Outbox) ([]audit.Entry, error) {
		row, err := q.ApplyStatus(ctx, s.applyStatusParams(presenceID, st, source))
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("apply status: %w", err)
		}
		s.statusChanged(o, statusRow(row))
		return nil, nil
	})
}

// changedStatus is a presence whose status just changed.
type changedStatus struct {
	id, mesh, member, memberPubkey, displayName, node, status string
	sessionPubkey                                             *string
}

func statusRow(r db.ApplyStatusRow) changedStatus {
	return changedStatus{r.ID, r.MeshID, r.MemberID, r.MemberPubkey, r.DisplayName, r.NodeID, r.Status, r.SessionPubkey}
}

// statusChanged queues the owning node's wake-up and the mesh's peer_status event.
func (s *Server) statusChanged(o *pgbus.Outbox, c changedStatus) {
	o.Add(s.bus.NodeChannel(c.node), pgbus.Message{Kind: pgbus.KindStatus, Presence: c.id})
	key := c.memberPubkey
	if c.sessionPubkey != nil {
		key = *c.sessionPubkey
	}
	s.addEvent(o, c.mesh, c.member, protocol.EventPeerStatus, peerEventData(c.id, key, c.displayName, c.status))
}

func (s *Server) setState(ctx context.Context, sess *session, m *protocol.SetState) error {
	value := m.Value
	if len(value) == 0 {
		value = json.RawMessage("null")
	}
	if len(value) > s.cfg.MaxStateValueBytes {
		return &protocol.Error{Code: protocol.CodeTooLarge,
			Message: fmt.Sprintf("value: %d bytes is over the limit of %d (MAX_STATE_VALUE_BYTES)", len(value), s.cfg.MaxStateValueBytes)}
	}
	return s.inTx(ctx, func(q *db.Queries, o *pgbus.Outbox) ([]audit.Entry, error) {
		row, err := q.SetState(ctx, db.SetStateParams{MeshID: sess.meshID, Key: m.Key, Value: value, UpdatedBy: sess.name(),
			MaxKeys: int64(s.cfg.MaxStateKeysPerMesh), MaxBytes: int64(s.cfg.MaxStateBytesPerMesh)})
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, &protocol.Error{Code: protocol.CodeQuotaExceeded, Message: fmt.Sprintf(
				"the mesh's shared state is full: at most %d keys and %d bytes (delete keys by setting them to null, or ask the operator)",
				s.cfg.MaxStateKeysPerMesh, s.cfg.MaxStateBytesPerMesh)}
		}
		if err != nil {
			return nil, fmt.Errorf("set state: %w", err)
		}
		msg := pgbus.Message{Kind: pgbus.KindState, Mesh: sess.meshID, Key: m.Key, Presence: sess.presenceID}
		change, _ := json.Marshal(&protocol.StateChange{Key: row.Key, Value: row.Value, UpdatedBy: row.UpdatedBy})
		if len(change) < pgbus.MaxPayload-200 {
			msg.Data = change // small values ride along; large ones are read back by receivers
		}
		o.Add(s.bus.ClusterChannel(), msg)
		return []audit.Entry{{MeshID: sess.meshID, Type: audit.StateSet, Actor: sess.routingKey(),
			Data: map[string]any{"key": m.Key, "size": len(value)}}}, nil
	})
}

func (s *Server) getState(ctx context.Context, sess *session, m *protocol.GetState) (protocol.ServerMessage, error) {
	row, err := s.q.GetState(ctx, db.GetStateParams{MeshID: sess.meshID, Key: m.Key})
	if errors.Is(err, pgx.ErrNoRows) {
		return &protocol.StateResult{Key: m.Key, ReqID: m.ReqID}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get state: %w", err)
	}
	return &protocol.StateResult{Key: row.Key, Value: row.Value, UpdatedBy: row.UpdatedBy,
		UpdatedAt: protocol.FormatTime(row.UpdatedAt), ReqID: m.ReqID}, nil
}

func (s *Server) listState(ctx context.Context, sess *session, m *protocol.ListState) (protocol.ServerMessage, error) {
	rows, err := s.q.ListState(ctx, db.ListStateParams{MeshID: sess.meshID, MaxKeys: int32(s.cfg.MaxStateKeysPerMesh)})
	if err != nil {
		return nil, fmt.Errorf("list state: %w", err)
	}
	out := &protocol.StateList{Entries: make([]protocol.StateEntry, 0, len(rows)), ReqID: m.ReqID}
	total := 0
	for _, r := range rows {
		// The quotas bound the answer; entries stored before them are cut at the same size.
		if total += int(r.Size); total > s.cfg.MaxStateBytesPerMesh {
			out.Truncated = true
			break
		}
		out.Entries = append(out.Entries, protocol.StateEntry{Key: r.Key, Value: r.Value, UpdatedBy: r.UpdatedBy,
			UpdatedAt: protocol.FormatTime(r.UpdatedAt)})
	}
	return out, nil
}

func (s *Server) messageStatus(ctx context.Context, sess *session, m *protocol.MessageStatus) (protocol.ServerMessage, error) {
	env, err := s.q.EnvelopeForStatus(ctx, db.EnvelopeForStatusParams{ID: m.MessageID, MeshID: sess.meshID})
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, &protocol.Error{Code: protocol.CodeNotFound, Message: "no message with that id in this mesh"}
	}
	if err != nil {
		return nil, fmt.Errorf("load envelope: %w", err)
	}
	rows, err := s.q.DeliveryStatus(ctx, env.ID)
	if err != nil {
		return nil, fmt.Errorf("load deliveries: %w", err)
	}
	out := &protocol.MessageStatusResult{MessageID: env.ID, TargetSpec: env.TargetSpec, Delivered: len(rows) > 0,
		Recipients: make([]protocol.RecipientStatus, 0, len(rows)), ReqID: m.ReqID}
	var last time.Time
	for _, r := range rows {
		st := protocol.RecipientHeld
		switch {
		case r.State == "acked":
			st = protocol.RecipientDelivered
			if r.AckedAt != nil && r.AckedAt.After(last) {
				last = *r.AckedAt
			}
		case r.State == "pushed":
			st = protocol.RecipientDelivered // written to the socket; client_ack pending
			if r.PushedAt != nil && r.PushedAt.After(last) {
				last = *r.PushedAt
			}
		case !r.Online:
			st = protocol.RecipientDisconnected
		}
		if st != protocol.RecipientDelivered {
			out.Delivered = false
		}
		key := r.MemberPubkey
		if r.RecipientSessionPubkey != nil {
			key = *r.RecipientSessionPubkey
		}
		out.Recipients = append(out.Recipients, protocol.RecipientStatus{Name: r.DisplayName, Pubkey: key, Status: st})
	}
	if out.Delivered && !last.IsZero() {
		out.DeliveredAt = protocol.FormatTime(last)
	}
	return out, nil
}
