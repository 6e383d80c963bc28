package broker

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"sync/atomic"
	"time"

	"github.com/olahol/melody"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// helloMaxSkew is how far a hello's timestamp may be from the broker clock.
const helloMaxSkew = protocol.HelloMaxSkew

// helloTimeout bounds the handshake's database work; the ack is due within 500 ms normally.
const helloTimeout = 5 * time.Second

// helloQueueWait is the longest a hello waits for its turn before it is refused (overloaded):
// well under helloTimeout, so a storm gets a retryable answer, not a timeout.
const helloQueueWait = 3 * time.Second

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

// helloQueue bounds the hellos of a replica: at most slots of them in the database at once
// (about its pool), at most waiting more waiting for a slot, none waiting longer than wait.
// A storm beyond that is answered at once with a clear, retryable refusal (overloaded, close
// 1013 "try again later") instead of piling onto the database until every hello times out.
type helloQueue struct {
	slots   chan struct{}
	waiting atomic.Int64
	max     int64
	wait    time.Duration
}

func newHelloQueue(slots, waiting int, wait time.Duration) *helloQueue {
	return &helloQueue{slots: make(chan struct{}, slots), max: int64(waiting), wait: wait}
}

// enter takes a slot; false when the queue is full or the wait ran out.
func (q *helloQueue) enter() bool {
	select {
	case q.slots <- struct{}{}:
		return true
	default:
	}
	if q.waiting.Add(1) > q.max {
		q.waiting.Add(-1)
		return false
	}
	defer q.waiting.Add(-1)
	t := time.NewTimer(q.wait)
	defer t.Stop()
	select {
	case q.slots <- struct{}{}:
		return true
	case <-t.C:
		return false
	}
}

func (q *helloQueue) leave() { <-q.slots }

var errOverloaded = &helloRefusal{code: protocol.CodeOverloaded, msg: "too many hellos at once; retry in a moment",
	closeCd: protocol.CloseTryAgainLater}

func (p *peers) handleHello(ms *melody.Session, c *conn, h *protocol.Hello) {
	ctx, cancel := context.WithTimeout(context.Background(), helloTimeout)
	defer cancel()
	sess, resumed, err := p.hello(ctx, ms, h)
	if err != nil {
		var ref *helloRefusal
		if !errors.As(err, &ref) {
			// Not the peer's fault (database down, ...): say so and let it retry elsewhere.
			p.log.Warn("hello failed", "mesh", h.MeshID, "err", err)
			ref = &helloRefusal{code: "internal", msg: "broker could not register the session; retry", closeCd: protocol.CloseGoingAway}
		} else {
			p.refusals.Info("hello refused", "mesh", h.MeshID, "code", ref.code, "reason", ref.msg, "source", c.source)
		}
		p.metrics.ConnRejected.WithLabelValues(ref.code).Inc()
		p.reply(ms, &protocol.Error{Code: ref.code, Message: ref.msg, ReqID: h.ReqID})
		closeWith(ms, ref.closeCd, ref.code)
		return
	}
	c.sess.Store(sess)
	p.gate.release(c) // authenticated: no longer held to the hello deadline
	if old := p.hub.add(sess); old != nil {
		// The same session reconnected to this replica while its old socket lingered.
		connOf(old.ws).end.Set(endReplaced)
		closeWith(old.ws, protocol.CloseSessionReplaced, protocol.CloseReasonSessionReplaced)
	}
	p.reply(ms, &protocol.HelloAck{PresenceID: sess.presenceID, MemberDisplayName: sess.name(), Resumed: resumed, ReqID: h.ReqID})
	p.log.Info("session connected", "mesh", sess.meshID, "presence", sess.presenceID, "resumed", resumed)
	// Whatever waited for this session (offline queue, unacked pushes) goes out now.
	p.pusher.request(sess)
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

// hello checks a hello and registers its presence. The checks that need no database come
// first; the rest is one statement: in protocol order, capacity, unauthorized, revoked, and
// (ext) a replayed signature and a session key that is another member's, then the presence,
// its notifications and its audit entry.
func (p *peers) hello(ctx context.Context, ms *melody.Session, h *protocol.Hello) (*session, bool, error) {
	pubLower, sessKey, err := checkSigned(h, time.Now())
	if err != nil {
		return nil, false, err
	}
	if len(h.Groups) > p.cfg.MaxGroupsPerSession {
		return nil, false, refuse(protocol.CodeBadRequest, fmt.Sprintf("groups: at most %d per session", p.cfg.MaxGroupsPerSession))
	}
	groups := make([]groupEntry, 0, len(h.Groups))
	for _, g := range h.Groups {
		groups = append(groups, groupEntry{Name: g.Name, Role: g.Role})
	}
	sig, _ := protocol.NormalizeSignature(h.Signature)
	if !p.hellos.enter() {
		return nil, false, errOverloaded
	}
	defer p.hellos.leave()
	res, err := p.store.Hello(ctx, store.HelloParams{
		NodeID: p.nodeID, MeshID: h.MeshID, MemberID: h.MemberID, MemberPubkey: pubLower, SessionID: h.SessionID,
		SessionPubkey: sessKey, DisplayName: h.DisplayName, CWD: h.CWD, PID: h.PID, Groups: groups,
		Capabilities: h.Capabilities, DefaultLimit: p.cfg.MaxConnsPerMesh, Signature: sig,
		SignatureExpires: signatureExpiry(time.UnixMilli(h.Timestamp)), LocalLive: p.liveHere(h.MemberID, h.SessionID),
	})
	if err != nil {
		return nil, false, err
	}
	switch res.Refusal {
	case "":
	case protocol.CodeCapacity:
		return nil, false, refuse(protocol.CodeCapacity, fmt.Sprintf("mesh has reached its limit of %d live sessions", res.Limit))
	case protocol.CodeRevoked:
		return nil, false, &helloRefusal{code: protocol.CodeRevoked, msg: "member was revoked", closeCd: protocol.CloseRevoked}
	case protocol.CodeHelloReplayed:
		return nil, false, refuse(protocol.CodeHelloReplayed, "this signed hello was already used: sign a new one")
	case protocol.CodeSessionKeyTaken:
		return nil, false, refuse(protocol.CodeSessionKeyTaken, "sessionPubkey is another member's key or bound to another member")
	default:
		return nil, false, refuse(protocol.CodeUnauthorized, "no live member with that mesh and pubkey")
	}
	reg := res.Registration
	sess := &session{
		ws: ms, out: ms, presenceID: reg.PresenceID, meshID: h.MeshID, memberID: h.MemberID, memberPubkey: pubLower,
		sessionPubkey: sessKey, sessionID: h.SessionID,
		clientAck:    h.HasCapability(protocol.CapClientAck),
		systemEvents: h.HasCapability(protocol.CapSystemEvents),
		displayName:  res.DisplayName, status: protocol.Status(reg.Status), groups: groups,
		epoch: reg.Epoch, lane: laneOf(reg.PresenceID),
	}
	return sess, res.Resumed, nil
}

// laneOf spreads sessions over the committer's lanes.
func laneOf(presenceID string) uint32 {
	h := fnv.New32a()
	_, _ = h.Write([]byte(presenceID))
	return h.Sum32()
}

// liveHere reports whether this replica holds an open socket of the member's session (a new
// hello for it replaces it rather than resuming it).
func (p *peers) liveHere(memberID, sessionID string) bool {
	for _, s := range p.hub.memberSessions(memberID) {
		if s.sessionID == sessionID && !s.isClosed() {
			return true
		}
	}
	return false
}
