package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/olahol/melody"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// opTimeout bounds the database work of one client request.
const opTimeout = 5 * time.Second

// dispatch handles one decoded message of an established session. Errors that are the
// broker's (database down) answer with an error frame; the session stays open.
func (p *peers) dispatch(ms *melody.Session, sess *session, msg protocol.ClientMessage) {
	if m, ok := msg.(*protocol.Send); ok {
		if refusal := p.checkSend(sess, m); refusal != "" {
			p.metrics.SendRefused.WithLabelValues(refusal).Inc()
			p.reply(ms, &protocol.Ack{ID: m.ID, Queued: false, Error: refusal, ReqID: m.ReqID})
			return
		}
		p.committer.enqueue(sess, m)
		return
	}
	// Refused before any database work; the session stays open.
	if refusal := sess.limits.allow(msg, p.cfg); refusal != "" {
		p.metrics.RequestsRateLimited.WithLabelValues(msg.Type()).Inc()
		p.refusals.Info("request rate limited", "type", msg.Type(), "presence", sess.presenceID)
		p.reply(ms, &protocol.Error{Code: protocol.CodeRateLimited, Message: refusal, ReqID: msg.RequestID()})
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	var reply protocol.ServerMessage
	var err error
	switch m := msg.(type) {
	case *protocol.ClientAck:
		// A peer that acks is treated as acking from now on (today's CLI never announces it).
		sess.clientAck.Store(true)
		ids := m.IDs()
		if k := sess.ackAllowance(len(ids)); k < len(ids) {
			// No reply (client_ack has none; today's CLI would give an error to another request).
			p.metrics.RequestsRateLimited.WithLabelValues(msg.Type()).Inc()
			p.refusals.Info("client_ack of more ids than were pushed to the session", "presence", sess.presenceID,
				"ids", len(ids), "recorded", k)
			ids = ids[:k]
		}
		if len(ids) > 0 {
			p.recorder.acked(sess, ids)
		}
	case *protocol.ListPeers:
		reply, err = p.listPeers(ctx, sess, m)
	case *protocol.SetStatus:
		// One statement: the status model, the replicas and the mesh told, held messages released.
		_, err = p.store.SetStatus(ctx, sess.presenceID, string(m.Status), store.SourceManual, p.cfg.HookFreshWindow)
	case *protocol.SetSummary:
		err = p.store.SetSummary(ctx, sess.presenceID, m.Summary)
	case *protocol.JoinGroup:
		err = p.changeGroups(ctx, sess, func(gs []groupEntry) ([]groupEntry, error) {
			for i, g := range gs {
				if g.Name == m.Name {
					gs[i].Role = m.Role
					return gs, nil
				}
			}
			if len(gs) >= p.cfg.MaxGroupsPerSession {
				return nil, &protocol.Error{Code: protocol.CodeQuotaExceeded,
					Message: fmt.Sprintf("a session may be in at most %d groups; leave one first", p.cfg.MaxGroupsPerSession)}
			}
			return append(gs, groupEntry{Name: m.Name, Role: m.Role}), nil
		})
	case *protocol.LeaveGroup:
		err = p.changeGroups(ctx, sess, func(gs []groupEntry) ([]groupEntry, error) {
			out := gs[:0]
			for _, g := range gs {
				if g.Name != m.Name {
					out = append(out, g)
				}
			}
			return out, nil
		})
	case *protocol.SetState:
		err = p.setState(ctx, sess, m)
	case *protocol.GetState:
		reply, err = p.getState(ctx, sess, m)
	case *protocol.ListState:
		reply, err = p.listState(ctx, sess, m)
	case *protocol.MessageStatus:
		reply, err = p.messageStatus(ctx, sess, m)
	case *protocol.Kick:
		reply, err = p.kick(ctx, sess, m)
	case *protocol.Ban:
		reply, err = p.ban(ctx, sess, m)
	case *protocol.Unban:
		reply, err = p.unban(ctx, sess, m)
	case *protocol.ListBans:
		reply, err = p.listBans(ctx, sess, m)
	case *protocol.SetStats:
		// Taken and not kept (protocol.SetStats); it has no reply.
	default:
		reply = &protocol.Error{Code: protocol.CodeUnknownMessageType, Message: "unknown type " + msg.Type(), ReqID: msg.RequestID()}
	}
	if err != nil {
		var perr *protocol.Error
		if !errors.As(err, &perr) {
			p.metrics.warnRepeated(p.log, "request failed", "type", msg.Type(), "presence", sess.presenceID, "err", err)
			perr = &protocol.Error{Code: "internal", Message: "broker could not complete " + msg.Type() + "; retry"}
		}
		perr.ReqID = msg.RequestID()
		reply = perr
	}
	if reply != nil {
		n := p.reply(ms, reply)
		switch msg.(type) {
		case *protocol.ListPeers, *protocol.ListState:
			sess.limits.listed(n)
		}
	}
}

// checkSend refuses, before any database work, a send whose envelope is over the limit or
// whose member is over its send rate on this replica; "" lets it through.
func (p *peers) checkSend(sess *session, m *protocol.Send) string {
	if len(m.Nonce)+len(m.Ciphertext)+len(m.TargetSpec) > p.cfg.MaxEnvelopeBytes {
		return protocol.CodeTooLarge
	}
	if sess.limits != nil && !sess.limits.send.Allow() {
		return protocol.CodeRateLimited
	}
	return ""
}

func (p *peers) listPeers(ctx context.Context, sess *session, m *protocol.ListPeers) (protocol.ServerMessage, error) {
	rows, err := p.store.LivePresences(ctx, sess.meshID)
	if err != nil {
		return nil, err
	}
	out := &protocol.PeersList{Peers: make([]protocol.Peer, 0, len(rows)), ReqID: m.ReqID}
	for _, pr := range rows {
		groups := make([]protocol.Group, len(pr.Groups))
		for i, g := range pr.Groups {
			groups[i] = protocol.Group{Name: g.Name, Role: g.Role}
		}
		out.Peers = append(out.Peers, protocol.Peer{
			Pubkey: pr.RoutingKey(), DisplayName: pr.DisplayName, Status: protocol.Status(pr.Status), Summary: pr.Summary,
			Groups: groups, SessionID: pr.SessionID, ConnectedAt: protocol.FormatTime(pr.ConnectedAt),
			MemberPubkey: pr.MemberPubkey, PeerRole: pr.Role, CWD: pr.CWD, Hostname: pr.Hostname, PeerType: pr.PeerType,
			Channel: pr.Channel, Model: pr.Model,
		})
	}
	return out, nil
}

func (p *peers) changeGroups(ctx context.Context, sess *session, f func([]groupEntry) ([]groupEntry, error)) error {
	gs, err := f(sess.groupsCopy())
	if err != nil {
		return err
	}
	if err := p.store.SetGroups(ctx, sess.presenceID, gs); err != nil {
		return err
	}
	sess.setGroups(gs)
	return nil
}

func (p *peers) setState(ctx context.Context, sess *session, m *protocol.SetState) error {
	value := m.Value
	if len(value) == 0 {
		value = json.RawMessage("null")
	}
	// The limit is on the value as Postgres stores and renders it (what the quota counts and
	// every reader gets): numbers in all their digits, so 1e300 weighs 301 bytes, not 5.
	if size := protocol.JSONBSize(value); size > p.cfg.MaxStateValueBytes {
		p.refusals.Info("state value too large", "presence", sess.presenceID, "size", size, "frame_bytes", len(value))
		return &protocol.Error{Code: protocol.CodeTooLarge, Message: fmt.Sprintf(
			"value: %d bytes as stored (numbers written out in full, members with spaces) is over the limit of %d (MAX_STATE_VALUE_BYTES)",
			size, p.cfg.MaxStateValueBytes)}
	}
	quota := store.StateQuota{MaxKeys: p.cfg.MaxStateKeysPerMesh, MaxBytes: p.cfg.MaxStateBytesPerMesh}
	data, err := audit.CanonicalData(map[string]any{"key": m.Key, "size": len(value)})
	if err != nil {
		return err
	}
	// One statement: the row within the quota (null deletes it, whatever the quota), the
	// state_change for every replica, the audit.
	_, err = p.store.SetState(ctx, store.StateWrite{MeshID: sess.meshID, Key: m.Key, Value: value, UpdatedBy: sess.name(),
		PresenceID: sess.presenceID, Actor: sess.routingKey(), AuditData: data, Quota: quota})
	if errors.Is(err, store.ErrQuotaExceeded) {
		return &protocol.Error{Code: protocol.CodeQuotaExceeded, Message: fmt.Sprintf(
			"the mesh's shared state is full: at most %d keys and %d bytes (delete keys by setting them to null, or ask the operator)",
			quota.MaxKeys, quota.MaxBytes)}
	}
	return err
}

func (p *peers) getState(ctx context.Context, sess *session, m *protocol.GetState) (protocol.ServerMessage, error) {
	e, err := p.store.GetState(ctx, sess.meshID, m.Key)
	if errors.Is(err, store.ErrNotFound) {
		return &protocol.StateResult{Key: m.Key, ReqID: m.ReqID}, nil
	}
	if err != nil {
		return nil, err
	}
	return &protocol.StateResult{Key: e.Key, Value: e.Value, UpdatedBy: e.UpdatedBy,
		UpdatedAt: protocol.FormatTime(e.UpdatedAt), ReqID: m.ReqID}, nil
}

func (p *peers) listState(ctx context.Context, sess *session, m *protocol.ListState) (protocol.ServerMessage, error) {
	rows, err := p.store.ListState(ctx, sess.meshID, p.cfg.MaxStateKeysPerMesh)
	if err != nil {
		return nil, err
	}
	out := &protocol.StateList{Entries: make([]protocol.StateEntry, 0, len(rows)), ReqID: m.ReqID}
	total := 0
	for _, e := range rows {
		// The quotas bound the answer; entries stored before them are cut at the same size.
		if total += e.Size; total > p.cfg.MaxStateBytesPerMesh {
			out.Truncated = true
			break
		}
		out.Entries = append(out.Entries, protocol.StateEntry{Key: e.Key, Value: e.Value, UpdatedBy: e.UpdatedBy,
			UpdatedAt: protocol.FormatTime(e.UpdatedAt)})
	}
	return out, nil
}

func (p *peers) messageStatus(ctx context.Context, sess *session, m *protocol.MessageStatus) (protocol.ServerMessage, error) {
	// Message ids are UUIDs, stored lowercase; a client may write them in either case.
	st, err := p.store.MessageStatus(ctx, sess.meshID, strings.ToLower(m.MessageID))
	if errors.Is(err, store.ErrNotFound) {
		return nil, &protocol.Error{Code: protocol.CodeNotFound, Message: "no message with that id in this mesh"}
	}
	if err != nil {
		return nil, err
	}
	out := &protocol.MessageStatusResult{MessageID: st.EnvelopeID, TargetSpec: st.TargetSpec, Delivered: len(st.Recipients) > 0,
		Recipients: make([]protocol.RecipientStatus, 0, len(st.Recipients)), ReqID: m.ReqID}
	var last time.Time
	for _, r := range st.Recipients {
		rs := protocol.RecipientHeld
		switch {
		case r.State == store.DeliveryAcked:
			rs = protocol.RecipientDelivered
			if r.AckedAt != nil && r.AckedAt.After(last) {
				last = *r.AckedAt
			}
		case r.State == store.DeliveryPushed:
			rs = protocol.RecipientDelivered // on its way to the socket; client_ack pending
			if r.PushedAt != nil && r.PushedAt.After(last) {
				last = *r.PushedAt
			}
		case !r.Online:
			rs = protocol.RecipientDisconnected
		}
		if rs != protocol.RecipientDelivered {
			out.Delivered = false
		}
		key := r.MemberPubkey
		if r.SessionPubkey != "" {
			key = r.SessionPubkey
		}
		out.Recipients = append(out.Recipients, protocol.RecipientStatus{Name: r.DisplayName, Pubkey: key, Status: rs})
	}
	if out.Delivered && !last.IsZero() {
		out.DeliveredAt = protocol.FormatTime(last)
	}
	return out, nil
}
