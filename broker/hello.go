package broker

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
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

// errHelloRateLimited: retryable, as overloaded (close 1013).
var errHelloRateLimited = &helloRefusal{code: protocol.CodeRateLimited,
	msg: "too many hellos for this session on this broker; retry in a moment", closeCd: protocol.CloseTryAgainLater}

var errMemberHelloRateLimited = &helloRefusal{code: protocol.CodeRateLimited,
	msg: "too many hellos for this member on this broker; retry in a moment", closeCd: protocol.CloseTryAgainLater}

var errOverloaded = &helloRefusal{code: protocol.CodeOverloaded, msg: "too many hellos at once; retry in a moment",
	closeCd: protocol.CloseTryAgainLater}

func (p *peers) handleHello(ms *melody.Session, c *conn, msg protocol.ClientMessage) {
	ctx, cancel := context.WithTimeout(context.Background(), helloTimeout)
	defer cancel()
	var req *helloReq
	var err error
	switch h := msg.(type) {
	case *protocol.Hello:
		req, err = p.checkHello(h, time.Now())
	case *protocol.SessionHello:
		req, err = p.checkSessionHello(h, time.Now())
	}
	// A client reconnecting in a loop (each hello signed afresh) would fill the replica's hello
	// statements and audit log: counted per session (member key and session id, so a member's
	// many sessions each have their own), once its signature verified (a forger can't spend
	// anyone's), before any database work. A member's fresh session id per hello would dodge
	// that, so its member has a bound too, wide enough for its sessions after a failover; a
	// hello the session's bound refused spends none of it.
	if err == nil && p.hellos.allow(req.params.MemberPubkey+"|"+req.params.SessionID) != limitAllowed {
		err = errHelloRateLimited
	} else if err == nil && p.memberHellos.allow(req.params.MemberPubkey) != limitAllowed {
		err = errMemberHelloRateLimited
	}
	var sess *session
	var resumed, waiting bool
	wakes := p.hub.wakeMark() // before the hello's statement: see after hub.add below
	if err == nil {
		sess, resumed, waiting, err = p.register(ctx, ms, req)
	}
	if err != nil {
		var ref *helloRefusal
		if !errors.As(err, &ref) {
			// Not the peer's fault (database down, ...): say so and let it retry elsewhere.
			p.metrics.warnRepeated(p.log, "hello failed", "type", msg.Type(), "err", err)
			ref = &helloRefusal{code: "internal", msg: "broker could not register the session; retry", closeCd: protocol.CloseGoingAway}
		} else {
			p.refusals.Info("hello refused", "type", msg.Type(), "code", ref.code, "reason", ref.msg, "source", c.source)
		}
		p.metrics.ConnRejected.WithLabelValues(ref.code).Inc()
		p.reply(ms, &protocol.Error{Code: ref.code, Message: ref.msg, ReqID: msg.RequestID()})
		closeWith(ms, ref.closeCd, ref.code)
		return
	}
	if p.cfg.helloRegistered != nil {
		p.cfg.helloRegistered()
	}
	c.sess.Store(sess)
	p.gate.release(c) // authenticated: no longer held to the hello deadline
	if wc := ms.WebsocketConnection(); wc != nil {
		lingerOnClose(wc.UnderlyingConn()) // pushes will be written to it
		coalesceFor(wc.UnderlyingConn(), sess.framesBehind)
	}
	if old, added := p.hub.add(sess); !added {
		// A later hello of the same session registered here first: this one is the replaced.
		// Its presence is the later one's now, so its end must not end that.
		connOf(ms).end.Set(endReplaced)
		closeWith(ms, protocol.CloseSessionReplaced, protocol.CloseReasonSessionReplaced)
		return
	} else if old != nil {
		// The same session reconnected to this replica while its old socket was still open.
		connOf(old.ws).end.Set(endReplaced)
		closeWith(old.ws, protocol.CloseSessionReplaced, protocol.CloseReasonSessionReplaced)
	}
	if p.cfg.helloJoined != nil {
		p.cfg.helloJoined()
	}
	// A kick, ban or revocation that committed after the hello's statement and whose notice
	// came before the session joined the hub found nothing to close here: closed now, before
	// the ack, or it would stay open (and a revoked member keep sending) until a full resync.
	if k, found, unsure := p.hub.kickedSince(wakes, sess.presenceID, sess.memberID); (found || unsure) &&
		p.closedMeanwhile(ctx, sess, k, found) {
		return
	}
	// Whatever waited for this session (offline queue, unacked pushes) goes out now: only if
	// something may. The hello's probe, after its commit in the same flight, saw every send
	// committed by then. A send that commits later either found the new session, and wakes
	// this replica for it, or left its rows pending, and wakes every replica for the member
	// (migration 00040); so does a release. Lookups for this session or member are counted: if
	// none was counted from before the statement until the session joined the hub, none
	// missed it, and any later one finds it there.
	// Decided before the ack, so what is sent to it once the peer has the ack is pushed as
	// before. Until here, and until a claim catches up if one runs, the session's pushes queue behind
	// and its claims take what is assigned to it too (set in register): a lookup that missed
	// it may have found a delivery assigned to it and be giving that back to pending in a
	// statement of its own, not committed yet, and a push written at once would overtake it.
	claim := waiting || p.hub.wokeSince(wakes, sess.presenceID, sess.memberID)
	if !claim {
		sess.noBacklog()
	}
	p.reply(ms, &protocol.HelloAck{PresenceID: sess.presenceID, MemberDisplayName: sess.name(), Resumed: resumed, ReqID: msg.RequestID()})
	p.log.Info("session connected", "mesh", sess.meshID, "presence", sess.presenceID, "role", sess.role, "resumed", resumed)
	if claim {
		p.pusher.request(sess)
	}
	// A status change that came over the bus between the statement and the hub (a hook, the
	// working-TTL sweep) found no session here and was dropped; the session would keep the
	// status the hello read, and a stale `working` would hold its messages until the poll.
	if p.hub.statusMissed(wakes, sess.presenceID) {
		reloadStatus(ctx, p.store, p.pusher, p.metrics, p.log, sess)
	}
}

// helloReq is a hello of either kind whose signatures were verified: what registers it.
type helloReq struct {
	params       store.HelloParams
	groups       []groupEntry
	sessionKey   string
	clientAck    bool
	systemEvents bool
}

// checkHello runs a plain hello's checks that need no database: timestamp, key and signature
// formats and the signature itself. Nothing is queried for a hello that fails them, so an
// unauthenticated client can't make the replica do database work. A plain hello is the
// member's own connection (role control-plane), as today's CLI's daemon and the April client.
func (p *peers) checkHello(h *protocol.Hello, now time.Time) (*helloReq, error) {
	if err := checkSkew(h.Timestamp, now); err != nil {
		return nil, err
	}
	pub, err := protocol.NormalizePubkey(h.Pubkey)
	if err != nil {
		return nil, refuse(protocol.CodeMalformed, "pubkey must be 64 hex characters")
	}
	if _, err := protocol.NormalizeSignature(h.Signature); err != nil {
		return nil, refuse(protocol.CodeMalformed, "signature must be 128 hex characters")
	}
	var sessKey string
	if h.SessionPubkey != "" {
		if sessKey, err = protocol.NormalizePubkey(h.SessionPubkey); err != nil {
			return nil, refuse(protocol.CodeMalformed, "sessionPubkey must be 64 hex characters")
		}
	}
	if !protocol.VerifyHello(h.MeshID, h.MemberID, h.Pubkey, h.Timestamp, h.Signature) {
		return nil, refuse(protocol.CodeBadSignature, "signature does not verify")
	}
	return p.helloReq(store.HelloParams{MeshID: h.MeshID, MemberID: h.MemberID, MemberPubkey: pub, SessionID: h.SessionID,
		SessionPubkey: sessKey, DisplayName: h.DisplayName, CWD: h.CWD, PID: h.PID, Role: protocol.RoleControlPlane,
		Hostname: h.Hostname, PeerType: h.PeerType, Channel: h.Channel, Model: h.Model, Capabilities: h.Capabilities},
		h.Groups, h.Signature, h.Timestamp)
}

// checkSessionHello runs a session_hello's checks that need no database, in upstream's order
// and with its codes: the two keys' formats, the attestation naming them, the attestation's
// lifetime, format and signature, then the hello's timestamp, format and signature. (Upstream
// checks its replica's capacity between the third and fourth; here capacity is counted
// cluster-wide in the database, after the signatures: see docs/protocol.md.)
func (p *peers) checkSessionHello(h *protocol.SessionHello, now time.Time) (*helloReq, error) {
	att := h.ParentAttestation
	switch {
	case !protocol.IsLowerHexKey(h.SessionPubkey):
		return nil, refuse(protocol.CodeBadSessionPubkey, "sessionPubkey must be 64 lowercase hex characters")
	case !protocol.IsLowerHexKey(h.ParentMemberPubkey):
		return nil, refuse(protocol.CodeBadParentPubkey, "parentMemberPubkey must be 64 lowercase hex characters")
	case att.SessionPubkey != h.SessionPubkey || att.ParentMemberPubkey != h.ParentMemberPubkey:
		return nil, refuse(protocol.CodeAttestationMismatch, "parentAttestation must name this sessionPubkey and parentMemberPubkey")
	case att.ExpiresAt == 0:
		return nil, refuse(protocol.CodeMalformed, "attestation rejected: expiresAt must be a number (ms since the epoch)")
	case att.ExpiresAt <= now.UnixMilli():
		return nil, refuse(protocol.CodeExpired, "attestation rejected: expired")
	case att.ExpiresAt > now.Add(protocol.MaxAttestationTTL).UnixMilli():
		return nil, refuse(protocol.CodeTTLTooLong, "attestation rejected: expiresAt is more than 24 h away")
	}
	if _, err := protocol.NormalizeSignature(att.Signature); err != nil {
		return nil, refuse(protocol.CodeMalformed, "attestation rejected: signature must be 128 hex characters")
	}
	if !protocol.VerifyAttestation(att) {
		return nil, refuse(protocol.CodeBadSignature, "attestation rejected: signature does not verify")
	}
	if err := checkSkew(h.Timestamp, now); err != nil {
		return nil, err
	}
	if _, err := protocol.NormalizeSignature(h.Signature); err != nil {
		return nil, refuse(protocol.CodeMalformed, "session_hello rejected: signature must be 128 hex characters")
	}
	if !protocol.VerifySessionHello(h) {
		return nil, refuse(protocol.CodeBadSignature, "session_hello rejected: signature does not verify")
	}
	return p.helloReq(store.HelloParams{MeshID: h.MeshID, MemberID: h.ParentMemberID, MemberPubkey: h.ParentMemberPubkey,
		SessionID: h.SessionID, SessionPubkey: h.SessionPubkey, DisplayName: h.DisplayName, CWD: h.CWD, PID: h.PID,
		Role: protocol.RoleSession, Hostname: h.Hostname, PeerType: h.PeerType, Channel: h.Channel, Model: h.Model,
		Capabilities: h.Capabilities}, h.Groups, h.Signature, h.Timestamp)
}

func checkSkew(ts int64, now time.Time) error {
	if skew := now.Sub(time.UnixMilli(ts)); skew > helloMaxSkew || skew < -helloMaxSkew {
		return refuse(protocol.CodeTimestampSkew, "timestamp is more than 60 s from the broker clock")
	}
	return nil
}

// helloReq completes a verified hello: its groups within the limit, its signature for the
// replay check, and whether it acks. Today's CLI never announces client_ack, but its daemon
// and session sockets ack every push: those are acking connections from the start (and any
// connection becomes one with its first client_ack).
func (p *peers) helloReq(hp store.HelloParams, groups []protocol.Group, signature string, ts int64) (*helloReq, error) {
	if len(groups) > p.cfg.MaxGroupsPerSession {
		return nil, refuse(protocol.CodeBadRequest, fmt.Sprintf("groups: at most %d per session", p.cfg.MaxGroupsPerSession))
	}
	r := &helloReq{params: hp, groups: make([]groupEntry, 0, len(groups)), sessionKey: hp.SessionPubkey,
		clientAck: slices.Contains(hp.Capabilities, protocol.CapClientAck) || hp.Role == protocol.RoleSession ||
			hp.Channel == protocol.ChannelDaemon || hp.Channel == protocol.ChannelSession,
		systemEvents: slices.Contains(hp.Capabilities, protocol.CapSystemEvents)}
	// A group named twice is one membership, the later role kept, as join_group has it: twice,
	// it showed twice in list_peers and counted twice toward the limit.
	for _, g := range groups {
		if i := slices.IndexFunc(r.groups, func(e groupEntry) bool { return e.Name == g.Name }); i >= 0 {
			r.groups[i].Role = g.Role
			continue
		}
		r.groups = append(r.groups, groupEntry{Name: g.Name, Role: g.Role})
	}
	r.params.Groups = r.groups
	r.params.Signature, _ = protocol.NormalizeSignature(signature)
	r.params.SignatureExpires = signatureExpiry(time.UnixMilli(ts))
	return r, nil
}

// signatureExpiry is when a signature stamped at ts can no longer pass the skew check, plus a
// margin for clock differences between replicas.
func signatureExpiry(ts time.Time) time.Time { return ts.Add(helloMaxSkew + 5*time.Second) }

// register registers a verified hello's presence in one statement: unauthorized, revoked
// (and for a session_hello, a parentMemberId that is not the key's member), (ext) a replayed
// signature and a session key that is another member's, then capacity (docs/protocol.md says
// why this order); then the presence (taken over by session key or sessionId, or new), its notifications and
// its audit entry.
func (p *peers) register(ctx context.Context, ms *melody.Session, r *helloReq) (sess *session, resumed, waiting bool, err error) {
	hp := r.params
	hp.LocalLive = p.liveHere(hp.MeshID, hp.MemberPubkey, hp.SessionID, hp.SessionPubkey)
	res, err := p.registrar.register(ctx, hp)
	if err != nil {
		return nil, false, false, err
	}
	switch res.Refusal {
	case "":
	case protocol.CodeCapacity:
		return nil, false, false, refuse(protocol.CodeCapacity, fmt.Sprintf("mesh has reached its limit of %d live sessions", res.Limit))
	case protocol.CodeRevoked:
		return nil, false, false, &helloRefusal{code: protocol.CodeRevoked, msg: "member was revoked", closeCd: protocol.CloseRevoked}
	case protocol.CodeParentMemberIDMismatch:
		return nil, false, false, refuse(protocol.CodeParentMemberIDMismatch, "parentMemberId is not the member of parentMemberPubkey")
	case protocol.CodeHelloReplayed:
		return nil, false, false, refuse(protocol.CodeHelloReplayed, "this signed hello was already used: sign a new one")
	case protocol.CodeSessionKeyTaken:
		return nil, false, false, refuse(protocol.CodeSessionKeyTaken, "sessionPubkey is another member's key or bound to another member")
	default:
		return nil, false, false, refuse(protocol.CodeUnauthorized, "no live member with that mesh and pubkey")
	}
	reg := res.Registration
	// The hello's strings point into its frame: copies, so a session keeps a few ids, not the
	// whole frame it said hello with.
	groups := make([]groupEntry, len(r.groups))
	for i, g := range r.groups {
		groups[i] = groupEntry{Name: strings.Clone(g.Name), Role: strings.Clone(g.Role)}
	}
	sess = &session{
		ws: ms, out: ms, presenceID: reg.PresenceID, meshID: strings.Clone(hp.MeshID), memberID: res.MemberID,
		memberPubkey: strings.Clone(hp.MemberPubkey), sessionPubkey: strings.Clone(r.sessionKey),
		sessionID: strings.Clone(hp.SessionID), role: hp.Role, systemEvents: r.systemEvents,
		displayName: res.DisplayName, status: protocol.Status(reg.Status), groups: groups,
		epoch: reg.Epoch, lane: laneOf(reg.PresenceID),
		// Pushes queue behind whatever may wait for it, assigned ones included, until the
		// hello has looked (see the end of handleHello).
		backlog: true, takeAll: true,
		overflow: func() { p.closeSlowConsumerLater(ms, "frames waiting to be sent") },
	}
	sess.clientAck.Store(r.clientAck)
	return sess, res.Resumed, res.Waiting, nil
}

// laneOf spreads sessions over the committer's lanes.
func laneOf(presenceID string) uint32 {
	h := fnv.New32a()
	_, _ = h.Write([]byte(presenceID))
	return h.Sum32()
}

// liveHere reports whether this replica holds an open socket of the member's session, by
// sessionId or session key (a new hello for it replaces it rather than resuming it). The
// member is known by key here (a session_hello names no member id), among the mesh's local
// sessions: at most the mesh's session limit.
func (p *peers) liveHere(meshID, memberPubkey, sessionID, sessionKey string) bool {
	for _, s := range p.hub.meshSessions(meshID) {
		if s.memberPubkey == memberPubkey && (s.sessionID == sessionID || (sessionKey != "" && s.sessionPubkey == sessionKey)) &&
			!s.isClosed() {
			return true
		}
	}
	return false
}

// closedMeanwhile checks a session that joined the hub after a close notice for it (or for its
// member) came, with the database: its presence ended, moved or its member revoked, it is
// closed as the notice said (found) or as the resync closes stale sockets, and it reports true.
// A notice that turns out not to apply (a member revoked and added again meanwhile) leaves it.
func (p *peers) closedMeanwhile(ctx context.Context, sess *session, k kickNote, found bool) bool {
	statuses, err := p.store.NodeStatuses(ctx, p.nodeID)
	if err != nil && !found {
		return false // unsure and can't tell: the next full resync does
	}
	pr, live := statuses[sess.presenceID]
	if err == nil && live && pr.Epoch == sess.epoch && !pr.Revoked {
		return false
	}
	if found {
		if removes(k.code) {
			connOf(sess.ws).removed.Store(true)
		}
		connOf(sess.ws).end.Set(endNow)
		closeWith(sess.ws, k.code, k.reason)
		p.log.Info("closed a session whose close notice came while it registered", "presence", sess.presenceID,
			"code", k.code, "reason", k.reason)
		return true
	}
	closeStale(p.log, sess, pr, live)
	return true
}
