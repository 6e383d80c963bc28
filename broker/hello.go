package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/olahol/melody"
	"golang.org/x/sync/errgroup"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// helloMaxSkew is how far a hello's timestamp may be from the broker clock.
const helloMaxSkew = 60 * time.Second

// helloTimeout bounds the handshake's database work; the ack is due within 500 ms normally.
const helloTimeout = 5 * time.Second

// helloRefusal is a handshake failure: its code goes to the peer, then the socket closes.
type helloRefusal struct {
	code    string
	msg     string
	closeCd int
}

func (e *helloRefusal) Error() string { return e.code + ": " + e.msg }

func refuse(code, msg string) *helloRefusal {
	return &helloRefusal{code: code, msg: msg, closeCd: protocol.CloseHelloRefused}
}

func (s *Server) handleHello(ms *melody.Session, c *conn, h *protocol.Hello) {
	ctx, cancel := context.WithTimeout(context.Background(), helloTimeout)
	defer cancel()
	sess, resumed, err := s.hello(ctx, ms, h)
	if err != nil {
		var ref *helloRefusal
		if !errors.As(err, &ref) {
			// Not the peer's fault (database down, ...): say so and let it retry elsewhere.
			s.log.Warn("hello failed", "mesh", h.MeshID, "err", err)
			ref = &helloRefusal{code: "internal", msg: "broker could not register the session; retry", closeCd: protocol.CloseGoingAway}
		} else {
			s.refusals.Info("hello refused", "mesh", h.MeshID, "code", ref.code, "reason", ref.msg, "source", c.source)
		}
		s.metrics.ConnRejected.WithLabelValues(ref.code).Inc()
		s.reply(ms, &protocol.Error{Code: ref.code, Message: ref.msg, ReqID: h.ReqID})
		closeWith(ms, ref.closeCd, ref.code)
		return
	}
	c.sess.Store(sess)
	s.gate.release(c) // authenticated: no longer held to the hello deadline
	if old := s.hub.add(sess); old != nil {
		// The same session reconnected to this replica while its old socket lingered.
		connOf(old.ws).end.Set(endReplaced)
		closeWith(old.ws, protocol.CloseSessionReplaced, protocol.CloseReasonSessionReplaced)
	}
	s.reply(ms, &protocol.HelloAck{PresenceID: sess.presenceID, MemberDisplayName: sess.name(), Resumed: resumed, ReqID: h.ReqID})
	s.log.Info("session connected", "mesh", sess.meshID, "presence", sess.presenceID, "resumed", resumed)
	// Whatever waited for this session (offline queue, unacked pushes) goes out now.
	s.kickDrain(sess)
}

// checkSigned runs the checks that need no database: timestamp, key and signature formats and
// the signature itself. Nothing is queried for a hello that fails them, so an
// unauthenticated client can't make the replica do database work.
func checkSigned(h *protocol.Hello, now time.Time) (pub, sessKey string, err error) {
	if skew := now.Sub(time.UnixMilli(h.Timestamp)); skew > helloMaxSkew || skew < -helloMaxSkew {
		return "", "", refuse(protocol.CodeTimestampSkew, "timestamp is more than 60 s from the broker clock")
	}
	pub, err = protocol.NormalizePubkey(h.Pubkey)
	if err != nil {
		return "", "", refuse(protocol.CodeMalformed, "pubkey must be 64 hex characters")
	}
	if _, err := protocol.NormalizeSignature(h.Signature); err != nil {
		return "", "", refuse(protocol.CodeMalformed, "signature must be 128 hex characters")
	}
	if h.SessionPubkey != "" {
		if sessKey, err = protocol.NormalizePubkey(h.SessionPubkey); err != nil {
			return "", "", refuse(protocol.CodeMalformed, "sessionPubkey must be 64 hex characters")
		}
	}
	if !protocol.VerifyHello(h.MeshID, h.MemberID, h.Pubkey, h.Timestamp, h.Signature) {
		return "", "", refuse(protocol.CodeBadSignature, "signature does not verify")
	}
	return pub, sessKey, nil
}

// signatureExpiry is when a signature stamped at ts can no longer pass the skew check, plus a
// margin for clock differences between replicas.
func signatureExpiry(ts time.Time) time.Time { return ts.Add(helloMaxSkew + 5*time.Second) }

// hello checks a hello and registers its presence in one transaction. The checks that need no
// database come first; then, in protocol order, capacity, unauthorized, revoked, and (ext) a
// replayed signature and a session key that is another member's.
func (s *Server) hello(ctx context.Context, ms *melody.Session, h *protocol.Hello) (*session, bool, error) {
	pubLower, sessKey, err := checkSigned(h, time.Now())
	if err != nil {
		return nil, false, err
	}
	sig, _ := protocol.NormalizeSignature(h.Signature)
	// The look-ups are independent: run them at once (one round trip, not four).
	var (
		mesh    db.MeshForHelloRow
		meshErr error
		live    int64
		members []db.MemberByPubkeyRow
		fresh   bool
	)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		mesh, meshErr = s.q.MeshForHello(gctx, h.MeshID)
		if meshErr != nil && !errors.Is(meshErr, pgx.ErrNoRows) {
			return fmt.Errorf("load mesh: %w", meshErr)
		}
		return nil
	})
	g.Go(func() (err error) {
		live, err = s.q.CountLivePresence(gctx, db.CountLivePresenceParams{MeshID: h.MeshID, SessionID: h.SessionID, MemberPubkey: pubLower})
		if err != nil {
			err = fmt.Errorf("count presence: %w", err)
		}
		return err
	})
	g.Go(func() (err error) {
		members, err = s.q.MemberByPubkey(gctx, db.MemberByPubkeyParams{MeshID: h.MeshID, Pubkey: pubLower})
		if err != nil {
			err = fmt.Errorf("load member: %w", err)
		}
		return err
	})
	g.Go(func() error {
		// Cluster-wide: a captured hello replayed on another replica is seen here too.
		_, err := s.q.ClaimSignature(gctx, db.ClaimSignatureParams{Signature: sig, ExpiresAt: signatureExpiry(time.UnixMilli(h.Timestamp))})
		switch {
		case err == nil:
			fresh = true
		case !errors.Is(err, pgx.ErrNoRows):
			return fmt.Errorf("record hello signature: %w", err)
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return nil, false, err
	}
	meshFound := meshErr == nil && mesh.ArchivedAt == nil
	limit := int64(s.cfg.MaxConnsPerMesh)
	if meshFound && mesh.MaxPeers > 0 {
		limit = int64(mesh.MaxPeers)
	}
	if meshFound && live >= limit {
		return nil, false, refuse(protocol.CodeCapacity, fmt.Sprintf("mesh has reached its limit of %d live sessions", limit))
	}
	if !meshFound {
		return nil, false, refuse(protocol.CodeUnauthorized, "no live member with that mesh and pubkey")
	}
	var member *db.MemberByPubkeyRow
	revoked := false
	for i := range members {
		if members[i].RevokedAt == nil && members[i].ID == h.MemberID {
			member = &members[i]
			break
		}
		if members[i].RevokedAt != nil && members[i].ID == h.MemberID {
			revoked = true
		}
	}
	if member == nil {
		if revoked {
			return nil, false, &helloRefusal{code: protocol.CodeRevoked, msg: "member was revoked", closeCd: protocol.CloseRevoked}
		}
		return nil, false, refuse(protocol.CodeUnauthorized, "no live member with that mesh and pubkey")
	}
	if !fresh {
		return nil, false, refuse(protocol.CodeHelloReplayed, "this signed hello was already used: sign a new one")
	}

	displayName := h.DisplayName
	if displayName == "" {
		displayName = member.DisplayName
	}
	groups := make([]groupEntry, 0, len(h.Groups))
	for _, g := range h.Groups {
		groups = append(groups, groupEntry{Name: g.Name, Role: g.Role})
	}
	groupsJSON, _ := json.Marshal(groups)
	caps := h.Capabilities
	if caps == nil {
		caps = []string{}
	}
	var sessKeyPtr *string
	if sessKey != "" {
		sessKeyPtr = &sessKey
	}

	var (
		row     db.UpsertPresenceRow
		resumed bool
	)
	err = s.inTx(ctx, func(q *db.Queries, outbox *pgbus.Outbox) ([]audit.Entry, error) {
		// What doesn't depend on the mesh's session count runs before its lock.
		if sessKey != "" {
			owner, err := q.BindSessionKey(ctx, db.BindSessionKeyParams{MeshID: h.MeshID, SessionPubkey: sessKey,
				MemberPubkey: pubLower, MemberID: member.ID})
			if err != nil {
				return nil, fmt.Errorf("bind session key: %w", err)
			}
			if owner != member.ID {
				return nil, refuse(protocol.CodeSessionKeyTaken, "sessionPubkey is another member's key or bound to another member")
			}
		}
		// A hook that fired before this hello (the first-turn race) applies now.
		var hookStatus *string
		if st, err := q.TakePendingStatus(ctx, db.TakePendingStatusParams{MemberPubkey: pubLower, SessionID: h.SessionID, Pid: int32(h.PID), Cwd: h.CWD}); err == nil {
			hookStatus = &st
		} else if !errors.Is(err, pgx.ErrNoRows) {
			return nil, fmt.Errorf("take pending status: %w", err)
		}
		// Hellos of one mesh (not of the cluster) serialize from here to commit, so the
		// capacity check can't be raced by a hello on another replica.
		if err := q.LockMeshHello(ctx, h.MeshID); err != nil {
			return nil, err
		}
		n, err := q.CountLivePresence(ctx, db.CountLivePresenceParams{MeshID: h.MeshID, SessionID: h.SessionID, MemberPubkey: pubLower})
		if err != nil {
			return nil, err
		}
		if n >= limit {
			return nil, refuse(protocol.CodeCapacity, fmt.Sprintf("mesh has reached its limit of %d live sessions", limit))
		}
		row, err = q.UpsertPresence(ctx, db.UpsertPresenceParams{
			MeshID: h.MeshID, MemberID: member.ID, MemberPubkey: pubLower, NodeID: s.nodeID,
			SessionID: h.SessionID, SessionPubkey: sessKeyPtr, DisplayName: displayName,
			Pid: int32(h.PID), Cwd: h.CWD, Groups: groupsJSON, Capabilities: caps, HookStatus: hookStatus,
		})
		if err != nil {
			return nil, fmt.Errorf("register presence: %w", err)
		}
		// Resumed: the presence was in its grace, or its socket on this node is already gone
		// (its close may not be recorded yet).
		resumed = row.OldGraceUntil != nil
		if row.OldNodeID != nil && *row.OldNodeID == s.nodeID {
			if old := s.hub.get(row.ID); old == nil || old.isClosed() {
				resumed = true
			}
		}
		if row.OldNodeID != nil && *row.OldNodeID != s.nodeID {
			// The session was live on another replica: that one closes its socket.
			outbox.Add(s.bus.NodeChannel(*row.OldNodeID), pgbus.Message{Kind: pgbus.KindReplace, Presence: row.ID, Node: s.nodeID})
		}
		if row.OldNodeID == nil { // a new presence, not a resume or replacement: tell the mesh
			s.addEvent(outbox, h.MeshID, member.ID, protocol.EventPeerJoined, peerEventData(row.ID, keyOr(sessKey, pubLower), displayName, row.Status))
		}
		return []audit.Entry{{MeshID: h.MeshID, Type: audit.PeerConnected, Actor: pubLower,
			Data: map[string]any{"presence_id": row.ID, "node": s.nodeID, "resumed": resumed}}}, nil
	})
	if err != nil {
		return nil, false, err
	}
	sess := &session{
		ws: ms, presenceID: row.ID, meshID: h.MeshID, memberID: member.ID, memberPubkey: pubLower,
		sessionPubkey: sessKey, sessionID: h.SessionID,
		clientAck:    h.HasCapability(protocol.CapClientAck),
		systemEvents: h.HasCapability(protocol.CapSystemEvents),
		displayName:  displayName, status: protocol.Status(row.Status), groups: groups,
		epoch: row.Epoch,
	}
	return sess, resumed, nil
}

func keyOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
