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
	size int64 // counted against the committer's byte bounds (sendBytes)
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
	// sameAs: sends repeating an earlier send's client_message_id in this batch (send → the
	// earlier send): acked as it is, not stored twice.
	sameAs map[int]int
}

// planner turns sends into envelopes. Their recipients are resolved by the store, in the
// statement that stores them.
type planner struct {
	ttl time.Duration
	now func() time.Time
}

// idemKey is what a client_message_id is unique within: its sender member and mesh.
type idemKey struct{ mesh, member, id string }

func (p *planner) plan(batch []sendReq) *batchPlan {
	out := &batchPlan{acks: make([]*protocol.Ack, len(batch)), frames: map[int][]byte{}}
	now := p.now().UTC().Truncate(time.Microsecond)
	var firsts map[idemKey]int
	for i, r := range batch {
		m := r.msg
		kind, key, ok := parseTarget(m.TargetSpec)
		if !ok {
			out.acks[i] = &protocol.Ack{ID: m.ID, Queued: false, Error: protocol.CodeNoRecipient, ReqID: m.ReqID}
			continue
		}
		if m.ClientMessageID != "" {
			k := idemKey{r.sess.meshID, r.sess.memberID, m.ClientMessageID}
			if first, ok := firsts[k]; ok {
				if out.sameAs == nil {
					out.sameAs = map[int]int{}
				}
				out.sameAs[i] = first
				continue
			}
			if firsts == nil {
				firsts = map[idemKey]int{}
			}
			firsts[k] = i
		}
		out.envelopes = append(out.envelopes, store.OutgoingEnvelope{Kind: kind, Key: key, Envelope: store.Envelope{
			ID: uuid.Must(uuid.NewV7()).String(), MeshID: r.sess.meshID, SenderMemberID: r.sess.memberID,
			SenderPubkey: r.sess.routingKey(), SenderMemberPubkey: r.sess.memberPubkey, TargetSpec: m.TargetSpec,
			Priority: string(m.Priority), Nonce: m.Nonce, Ciphertext: m.Ciphertext, ClientID: m.ID,
			CreatedAt: now, ExpiresAt: now.Add(p.ttl), ClientMessageID: m.ClientMessageID,
			RequestFingerprint: m.RequestFingerprint, SenderName: r.sess.name(),
		}})
		// Encoded once, here: the statement sends it to the other replicas' sessions as is,
		// and this replica's sessions get the same bytes.
		e := len(out.envelopes) - 1
		out.envelopes[e].Frame = out.frame(e)
		out.reqOf = append(out.reqOf, i)
	}
	return out
}

// settle fills the acks of the stored envelopes: queued with their message id, refused (a
// direct target that is no member and no session key of the mesh, or one whose waiting
// messages are at the bound), or a retry acked with the
// first envelope's id, unless it reuses the client_message_id for a different request.
func (plan *batchPlan) settle(batch []sendReq, sent []store.SentEnvelope) {
	for e, s := range sent {
		m := batch[plan.reqOf[e]].msg
		switch {
		case s.Original != "":
			plan.acks[plan.reqOf[e]] = retryAck(m, s.Original, s.StoredFingerprint)
		case s.Queued:
			plan.acks[plan.reqOf[e]] = &protocol.Ack{ID: m.ID, MessageID: plan.envelopes[e].ID, Queued: true, ReqID: m.ReqID}
		case s.Skipped > 0:
			plan.acks[plan.reqOf[e]] = &protocol.Ack{ID: m.ID, Queued: false, Error: protocol.CodeRecipientFull, ReqID: m.ReqID}
		default:
			plan.acks[plan.reqOf[e]] = &protocol.Ack{ID: m.ID, Queued: false, Error: protocol.CodeNoRecipient, ReqID: m.ReqID}
		}
	}
	for i, first := range plan.sameAs {
		m, a := batch[i].msg, plan.acks[first]
		switch {
		case a == nil: // the first was not planned (refused before the store): same outcome
			plan.acks[i] = &protocol.Ack{ID: m.ID, Queued: false, Error: protocol.CodeNoRecipient, ReqID: m.ReqID}
		case !a.Queued:
			plan.acks[i] = &protocol.Ack{ID: m.ID, Queued: false, Error: a.Error, ReqID: m.ReqID}
		default:
			plan.acks[i] = retryAck(m, a.MessageID, batch[first].msg.RequestFingerprint)
		}
	}
}

// retryAck acks a send whose client_message_id was used before, by the message stored then.
func retryAck(m *protocol.Send, original, storedFingerprint string) *protocol.Ack {
	if m.RequestFingerprint != "" && storedFingerprint != "" && m.RequestFingerprint != storedFingerprint {
		return &protocol.Ack{ID: m.ID, Queued: false, Error: protocol.CodeClientMessageIDConflict, ReqID: m.ReqID}
	}
	return &protocol.Ack{ID: m.ID, MessageID: original, Queued: true, Duplicate: true, ReqID: m.ReqID}
}

// frame is envelope e's push, encoded once for every local recipient.
func (plan *batchPlan) frame(e int) []byte {
	b, ok := plan.frames[e]
	if !ok {
		env := &plan.envelopes[e].Envelope
		b = pushFrame(&store.Push{EnvelopeID: env.ID, MeshID: env.MeshID, SenderPubkey: env.SenderPubkey,
			SenderMemberPubkey: env.SenderMemberPubkey, Priority: env.Priority, Nonce: env.Nonce, Ciphertext: env.Ciphertext,
			CreatedAt: env.CreatedAt, SenderMemberID: env.SenderMemberID, SenderName: env.SenderName,
			ClientMessageID: env.ClientMessageID, RequestFingerprint: env.RequestFingerprint})
		plan.frames[e] = b
	}
	return b
}
