package broker

import (
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// sendReq is one send waiting for the committer.
type sendReq struct {
	sess *session
	msg  *protocol.Send
}

// targetKind classifies a targetSpec.
type targetKind int

const (
	targetInvalid targetKind = iota
	targetDirect
	targetAll
	targetGroup
)

func parseTarget(spec string) (targetKind, string) {
	switch {
	case spec == "*" || spec == "@all":
		return targetAll, ""
	case strings.HasPrefix(spec, "@") && len(spec) > 1:
		return targetGroup, spec[1:]
	}
	if k, err := protocol.NormalizePubkey(spec); err == nil {
		return targetDirect, k
	}
	return targetInvalid, ""
}

// localSessions is what the planner asks of this replica's sessions (the hub).
type localSessions interface {
	get(presenceID string) *session
	inGroup(meshID, group string) []*session
}

// lookups returns what must be read to plan a batch: the meshes with multicasts and the
// direct targets.
func lookups(batch []sendReq) (multicast []string, direct []store.MeshKey) {
	seen := map[string]bool{}
	for _, r := range batch {
		switch kind, key := parseTarget(r.msg.TargetSpec); kind {
		case targetDirect:
			direct = append(direct, store.MeshKey{MeshID: r.sess.meshID, Key: key})
		case targetAll, targetGroup:
			if !seen[r.sess.meshID] {
				seen[r.sess.meshID] = true
				multicast = append(multicast, r.sess.meshID)
			}
		}
	}
	return multicast, direct
}

// batchPlan is a batch of sends resolved to envelopes and deliveries, with what to do after
// commit.
type batchPlan struct {
	envelopes []store.Envelope
	deliv     []store.NewDelivery
	local     []*session // per delivery: the local session it is pushed to right after commit
	wake      []store.Holder
	audit     []audit.Entry
	request   map[*session]struct{} // local sessions whose pusher must run after commit
	acks      []*protocol.Ack       // per request
	// pushedIDs: the ids of the deliveries with a local session, in deliv order, filled at commit.
	pushedIDs []int64
}

// planner resolves sends against this replica's sessions.
type planner struct {
	local  localSessions
	nodeID string
	ttl    time.Duration
	now    func() time.Time
}

// plan resolves a batch against its recipients: every direct target to its member (or session
// key), every multicast to the mesh's sessions (all but the sender's own; a group's through
// the hub's group index here and the stored group names elsewhere). A delivery goes straight
// to a local session when one may take it now (reserving a slot of its push window); otherwise
// it waits, pending, and the replicas holding the recipient are woken after commit.
func (p *planner) plan(batch []sendReq, rec store.Recipients) *batchPlan {
	out := &batchPlan{acks: make([]*protocol.Ack, len(batch)), request: map[*session]struct{}{}}
	byMember := map[[2]string][]*store.Target{}  // (mesh, member id)
	bySessKey := map[[2]string][]*store.Target{} // (mesh, session key)
	byMesh := map[string][]*store.Target{}
	for i := range rec.Targets {
		t := &rec.Targets[i]
		byMember[[2]string{t.MeshID, t.MemberID}] = append(byMember[[2]string{t.MeshID, t.MemberID}], t)
		if t.SessionPubkey != "" {
			k := [2]string{t.MeshID, t.SessionPubkey}
			bySessKey[k] = append(bySessKey[k], t)
		}
		byMesh[t.MeshID] = append(byMesh[t.MeshID], t)
	}
	wake := map[store.Holder]struct{}{}
	now := p.now().UTC().Truncate(time.Microsecond)
	for i, r := range batch {
		m := r.msg
		kind, key := parseTarget(m.TargetSpec)
		refuse := &protocol.Ack{ID: m.ID, Queued: false, Error: protocol.CodeNoRecipient, ReqID: m.ReqID}
		var recips []store.NewDelivery
		var locals []*session
		add := func(d store.NewDelivery, candidates []*store.Target) {
			local := p.pickLocal(candidates, m.Priority, out.request, wake)
			if local != nil {
				d.PushedTo = local.presenceID
			}
			recips, locals = append(recips, d), append(locals, local)
		}
		switch kind {
		case targetInvalid:
			out.acks[i] = refuse
			continue
		case targetDirect:
			mk := store.MeshKey{MeshID: r.sess.meshID, Key: key}
			if member, ok := rec.Members[mk]; ok {
				add(store.NewDelivery{MemberID: member}, byMember[[2]string{r.sess.meshID, member}])
			} else if member, ok := rec.SessionKeys[mk]; ok {
				add(store.NewDelivery{MemberID: member, SessionPubkey: key}, bySessKey[[2]string{r.sess.meshID, key}])
			} else {
				out.acks[i] = refuse
				continue
			}
		case targetAll:
			for _, t := range byMesh[r.sess.meshID] {
				if t.MemberID != r.sess.memberID { // never the sender's own sessions
					add(store.NewDelivery{MemberID: t.MemberID, SessionID: t.SessionID}, []*store.Target{t})
				}
			}
		case targetGroup:
			// This replica's connected members of the group come from the hub's group index;
			// the others (other replicas, sessions in their grace) from the stored group names.
			for _, s := range p.local.inGroup(r.sess.meshID, key) {
				if s.memberID != r.sess.memberID {
					add(store.NewDelivery{MemberID: s.memberID, SessionID: s.sessionID},
						[]*store.Target{{ID: s.presenceID, MeshID: s.meshID, MemberID: s.memberID, NodeID: p.nodeID, SessionID: s.sessionID}})
				}
			}
			for _, t := range byMesh[r.sess.meshID] {
				connectedHere := t.NodeID == p.nodeID && p.local.get(t.ID) != nil
				if !connectedHere && t.MemberID != r.sess.memberID && namesInGroup(t.GroupNames, key) {
					add(store.NewDelivery{MemberID: t.MemberID, SessionID: t.SessionID}, []*store.Target{t})
				}
			}
		}
		env := len(out.envelopes)
		id := uuid.Must(uuid.NewV7()).String()
		out.envelopes = append(out.envelopes, store.Envelope{
			ID: id, MeshID: r.sess.meshID, SenderMemberID: r.sess.memberID, SenderPubkey: r.sess.routingKey(),
			SenderMemberPubkey: r.sess.memberPubkey, TargetSpec: m.TargetSpec, Priority: string(m.Priority),
			Nonce: m.Nonce, Ciphertext: m.Ciphertext, ClientID: m.ID, CreatedAt: now, ExpiresAt: now.Add(p.ttl),
		})
		for j := range recips {
			recips[j].Envelope = env
		}
		out.deliv = append(out.deliv, recips...)
		out.local = append(out.local, locals...)
		kindName := map[targetKind]string{targetDirect: "direct", targetAll: "broadcast", targetGroup: "group"}[kind]
		out.audit = append(out.audit, audit.Entry{MeshID: r.sess.meshID, Type: audit.MessageSent, Actor: r.sess.routingKey(), At: now,
			Data: map[string]any{"message_id": id, "target_kind": kindName, "priority": string(m.Priority),
				"size": len(m.Ciphertext) + len(m.Nonce), "recipients": len(recips)}})
		out.acks[i] = &protocol.Ack{ID: m.ID, MessageID: id, Queued: true, ReqID: m.ReqID}
	}
	for h := range wake {
		out.wake = append(out.wake, h)
	}
	return out
}

// pickLocal chooses, among a recipient's live sessions, a local one that may take a priority-p
// push now, without overtaking its backlog, and reserves a slot of its push window. When none
// can, the replicas holding the others are woken and the local ones get their pusher run.
func (p *planner) pickLocal(candidates []*store.Target, prio protocol.Priority, request map[*session]struct{}, wake map[store.Holder]struct{}) *session {
	var waiting []*session
	var remote []*store.Target
	for _, t := range candidates {
		if t.NodeID != p.nodeID {
			remote = append(remote, t)
			continue
		}
		sess := p.local.get(t.ID)
		if sess == nil {
			continue
		}
		if sess.reserve(prio) {
			return sess
		}
		waiting = append(waiting, sess)
	}
	for _, t := range remote {
		wake[store.Holder{NodeID: t.NodeID, MemberID: t.MemberID}] = struct{}{}
	}
	for _, s := range waiting {
		request[s] = struct{}{}
	}
	return nil
}

// unreserve gives back the window slots of a plan that was not committed.
func (plan *batchPlan) unreserve() {
	for _, s := range plan.local {
		if s != nil {
			s.unreserve()
		}
	}
}

func namesInGroup(names []string, group string) bool {
	for _, n := range names {
		if inGroup(n, group) {
			return true
		}
	}
	return false
}
