package broker

import (
	"context"
	"errors"
	"math"
	"time"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// The admin operations of today's CLI over the WebSocket: kick, disconnect, ban, unban and
// list_bans. What they trust: the session's authenticated member, which must be an admin of the
// mesh (or its owner's key), checked in the statement that acts. Each is one statement,
// cluster-wide: the sessions it closes may be on any replica.

// maxBansListed bounds a list_bans answer.
const maxBansListed = 1000

func (p *peers) caller(sess *session) store.Caller {
	return store.Caller{MeshID: sess.meshID, MemberID: sess.memberID, PresenceID: sess.presenceID, Actor: sess.routingKey()}
}

// adminError turns a store outcome into the reply upstream's CLI reads ("forbidden",
// "not_found", "invalid", with _reqId).
func (p *peers) adminError(op string, err error) error {
	outcome := "ok"
	switch {
	case err == nil:
	case errors.Is(err, store.ErrForbidden):
		outcome, err = "forbidden", &protocol.Error{Code: protocol.CodeForbidden, Message: "only an owner or admin of the mesh can " + op}
	case errors.Is(err, store.ErrNotFound):
		outcome, err = "not_found", &protocol.Error{Code: protocol.CodeNotFound, Message: "no such member"}
	case errors.Is(err, store.ErrBanSelf):
		outcome, err = "invalid", &protocol.Error{Code: protocol.CodeInvalid, Message: "cannot ban yourself"}
	case errors.Is(err, store.ErrAmbiguous):
		outcome, err = "invalid", &protocol.Error{Code: protocol.CodeInvalid,
			Message: "several members match that name or key prefix: give the full key"}
	case errors.Is(err, store.ErrProtected) && op == "unban":
		outcome, err = "forbidden", &protocol.Error{Code: protocol.CodeForbidden,
			Message: "only the owner can lift the owner's ban or an admin's, and only the operator an operator's revocation"}
	case errors.Is(err, store.ErrProtected):
		outcome, err = "forbidden", &protocol.Error{Code: protocol.CodeForbidden,
			Message: "the mesh owner can't be banned, and only the owner can ban an admin"}
	default:
		outcome = "error"
	}
	p.metrics.AdminOps.WithLabelValues(op, outcome).Inc()
	return err
}

func (p *peers) kick(ctx context.Context, sess *session, m *protocol.Kick) (protocol.ServerMessage, error) {
	// Milliseconds beyond what a Duration holds (292 years) would wrap around to a small stale
	// that matches every session in its grace; capped, they match none, as asked.
	stale := time.Duration(min(m.Stale, int64(math.MaxInt64/time.Millisecond))) * time.Millisecond
	kp := store.KickParams{Target: m.Target, Stale: stale, All: m.All,
		SkipControlPlane: !m.Disconnect, CloseCode: protocol.CloseKicked, CloseReason: "kicked"}
	op := "kick"
	if m.Disconnect {
		op, kp.CloseCode, kp.CloseReason = "disconnect", protocol.CloseSessionReplaced, "disconnected"
	}
	if m.Stale > 0 && m.Target == "" && !m.All {
		kp.CloseReason += "_stale"
	}
	res, err := p.store.Kick(ctx, p.caller(sess), kp)
	if err = p.adminError(op, err); err != nil {
		return nil, err
	}
	p.log.Info(op, "mesh", sess.meshID, "by", sess.presenceID, "closed", len(res.Closed), "skipped", len(res.Skipped))
	return &protocol.KickAck{Kicked: res.Closed, SkippedControlPlane: res.Skipped, Disconnect: m.Disconnect, ReqID: m.ReqID}, nil
}

func (p *peers) ban(ctx context.Context, sess *session, m *protocol.Ban) (protocol.ServerMessage, error) {
	name, err := p.store.Ban(ctx, p.caller(sess), m.Target)
	if err = p.adminError("ban", err); err != nil {
		return nil, err
	}
	p.log.Info("member banned", "mesh", sess.meshID, "by", sess.presenceID)
	return &protocol.BanAck{Banned: name, ReqID: m.ReqID}, nil
}

func (p *peers) unban(ctx context.Context, sess *session, m *protocol.Unban) (protocol.ServerMessage, error) {
	name, err := p.store.Unban(ctx, p.caller(sess), m.Target)
	if err = p.adminError("unban", err); err != nil {
		return nil, err
	}
	p.log.Info("member unbanned", "mesh", sess.meshID, "by", sess.presenceID)
	return &protocol.UnbanAck{Unbanned: name, ReqID: m.ReqID}, nil
}

func (p *peers) listBans(ctx context.Context, sess *session, m *protocol.ListBans) (protocol.ServerMessage, error) {
	bans, err := p.store.ListBans(ctx, p.caller(sess), maxBansListed)
	if err = p.adminError("list_bans", err); err != nil {
		return nil, err
	}
	out := &protocol.ListBansResult{Bans: make([]protocol.BannedMember, len(bans)), ReqID: m.ReqID}
	for i, b := range bans {
		out.Bans[i] = protocol.BannedMember{Name: b.Name, Pubkey: b.Pubkey, RevokedAt: protocol.FormatTime(b.RevokedAt)}
	}
	return out, nil
}
