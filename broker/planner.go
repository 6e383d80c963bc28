package broker

import (
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// sendReq is one send waiting for the committer.
type sendReq struct {
	sess *session
	msg  *protocol.Send
}

// parseTarget classifies a targetSpec: a member or session key (normalized), everyone, or a
// group; ok is false for anything else.
func parseTarget(spec string) (kind store.SendKind, key string, ok bool) {
	switch {
	case spec == "*" || spec == "@all":
		return store.SendAll, "", true
	case strings.HasPrefix(spec, "@") && len(spec) > 1:
		return store.SendGroup, spec[1:], true
	}
	if k, err := protocol.NormalizePubkey(spec); err == nil {
		return store.SendDirect, k, true
	}
	return "", "", false
}

// batchPlan is a batch of sends turned into envelopes for the store, and their acks.
type batchPlan struct {
	envelopes []store.OutgoingEnvelope
	reqOf     []int           // per envelope: its send in the batch
	acks      []*protocol.Ack // per send; filled for refusals before the commit, the rest after
	frames    map[int][]byte  // per envelope: its push frame, encoded once when first needed
}

// planner turns sends into envelopes. Their recipients are resolved by the store, in the
// statement that stores them.
type planner struct {
	ttl time.Duration
	now func() time.Time
}

func (p *planner) plan(batch []sendReq) *batchPlan {
	out := &batchPlan{acks: make([]*protocol.Ack, len(batch)), frames: map[int][]byte{}}
	now := p.now().UTC().Truncate(time.Microsecond)
	for i, r := range batch {
		m := r.msg
		kind, key, ok := parseTarget(m.TargetSpec)
		if !ok {
			out.acks[i] = &protocol.Ack{ID: m.ID, Queued: false, Error: protocol.CodeNoRecipient, ReqID: m.ReqID}
			continue
		}
		out.envelopes = append(out.envelopes, store.OutgoingEnvelope{Kind: kind, Key: key, Envelope: store.Envelope{
			ID: uuid.Must(uuid.NewV7()).String(), MeshID: r.sess.meshID, SenderMemberID: r.sess.memberID,
			SenderPubkey: r.sess.routingKey(), SenderMemberPubkey: r.sess.memberPubkey, TargetSpec: m.TargetSpec,
			Priority: string(m.Priority), Nonce: m.Nonce, Ciphertext: m.Ciphertext, ClientID: m.ID,
			CreatedAt: now, ExpiresAt: now.Add(p.ttl),
		}})
		out.reqOf = append(out.reqOf, i)
	}
	return out
}

// settle fills the acks of the stored envelopes: queued with their message id, or refused
// (a direct target that is no member and no session key of the mesh).
func (plan *batchPlan) settle(batch []sendReq, sent []store.SentEnvelope) {
	for e, s := range sent {
		m := batch[plan.reqOf[e]].msg
		if s.Queued {
			plan.acks[plan.reqOf[e]] = &protocol.Ack{ID: m.ID, MessageID: plan.envelopes[e].ID, Queued: true, ReqID: m.ReqID}
		} else {
			plan.acks[plan.reqOf[e]] = &protocol.Ack{ID: m.ID, Queued: false, Error: protocol.CodeNoRecipient, ReqID: m.ReqID}
		}
	}
}

// frame is envelope e's push, encoded once for every local recipient.
func (plan *batchPlan) frame(e int) []byte {
	b, ok := plan.frames[e]
	if !ok {
		env := plan.envelopes[e]
		b = encodePush(env.ID, env.MeshID, env.SenderPubkey, env.SenderMemberPubkey, env.Priority, env.Nonce, env.Ciphertext, env.CreatedAt)
		plan.frames[e] = b
	}
	return b
}
