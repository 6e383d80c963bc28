package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sync/errgroup"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// Group commit: sends that arrive while a commit is in flight go into the next transaction,
// up to maxBatch of them, so throughput is not capped at one notifying commit per message.
// One committer per replica: measured on 2 cores, parallel committers only queue on the
// mesh's audit lock (BENCHMARKS.md), and one keeps every sender's sends in order.
const (
	maxBatch     = 512
	sendQueueCap = 4096
	// DefaultMessageTTL is how long an undelivered envelope waits for its recipients.
	DefaultMessageTTL = 7 * 24 * time.Hour
	// ackUnavailable is the ack error when the envelope could not be stored (Postgres away).
	ackUnavailable = "unavailable"
)

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

// enqueueSend hands a send to the committer. It blocks when the queue is full: back-pressure
// on the sender's socket rather than unbounded memory.
func (s *Server) enqueueSend(sess *session, m *protocol.Send) {
	sess.promise() // the ack's slot in the reply window
	select {
	case s.sends <- sendReq{sess: sess, msg: m}:
	case <-s.runCtx.Done():
		s.replyTo(sess, &protocol.Ack{ID: m.ID, Queued: false, Error: ackUnavailable, ReqID: m.ReqID})
	}
}

func (s *Server) runCommitter(ctx context.Context) {
	in := s.sends
	limit := s.cfg.MaxBatch
	batch := make([]sendReq, 0, limit)
	for {
		select {
		case <-ctx.Done():
			return
		case r := <-in:
			batch = append(batch[:0], r)
		}
	fill:
		for len(batch) < limit {
			select {
			case r := <-in:
				batch = append(batch, r)
			default:
				break fill
			}
		}
		s.commitBatch(context.WithoutCancel(ctx), batch)
	}
}

// plannedDelivery is one delivery row of a batch, and where it goes after commit.
type plannedDelivery struct {
	env      int // index into envelopes
	memberID string
	sessKey  string
	sessID   string
	state    string
	local    *session // pushed by this node right after commit
}

// envelope is one stored message of a batch.
type envelope struct {
	ID, MeshID, SenderMemberID, SenderPubkey, SenderMemberPubkey string
	TargetSpec, Priority, Nonce, Ciphertext, ClientID            string
	CreatedAt, ExpiresAt                                         time.Time
}

type batchPlan struct {
	envelopes []envelope
	deliv     []plannedDelivery
	outbox    pgbus.Outbox
	audit     []audit.Entry
	kick      map[*session]struct{}
	acks      []*protocol.Ack // per request
	// deliveryIDs of the local deliveries, in plan.deliv order, filled at insert.
	deliveryIDs []int64
}

func (s *Server) commitBatch(ctx context.Context, batch []sendReq) {
	start := time.Now()
	plan, err := s.planBatch(ctx, batch)
	if err == nil {
		err = s.storeBatch(ctx, plan)
	}
	if err != nil {
		if plan != nil {
			plan.unreserve()
		}
		if rejectedInput(err) {
			s.isolateRejected(ctx, batch, err)
			return
		}
		s.log.Warn("send batch failed; refusing its sends", "size", len(batch), "err", err)
		s.metrics.SendFailures.Add(float64(len(batch)))
		for _, r := range batch {
			s.replyTo(r.sess, &protocol.Ack{ID: r.msg.ID, Queued: false, Error: ackUnavailable, ReqID: r.msg.ReqID})
		}
		return
	}
	s.metrics.BatchSize.Observe(float64(len(batch)))
	if s.log.Enabled(ctx, slog.LevelDebug) { // per message: only when asked for
		for _, e := range plan.envelopes {
			s.log.Debug("message stored", "mesh", e.MeshID, "message_id", e.ID, "sender", e.SenderPubkey,
				"target", e.TargetSpec, "priority", e.Priority, "size", len(e.Ciphertext))
		}
	}
	s.metrics.CommitSeconds.Observe(time.Since(start).Seconds())
	for i, r := range batch {
		s.replyTo(r.sess, plan.acks[i])
	}
	s.pushPlanned(plan)
	for sess := range plan.kick {
		s.kickDrain(sess)
	}
}

// rejectedInput reports whether Postgres refused a statement for the data in it (SQLSTATE
// class 22, data exception, or 23, integrity constraint) rather than for being unavailable:
// one send's input, which the edge checks should have refused, would fail the whole batch.
func rejectedInput(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (strings.HasPrefix(pgErr.Code, "22") || strings.HasPrefix(pgErr.Code, "23"))
}

// isolateRejected commits a batch that Postgres refused for its data in halves, so the send
// at fault is found in log2(batch) commits and refused alone; every other sender's sends are
// stored. A batch of one is refused with bad_request.
func (s *Server) isolateRejected(ctx context.Context, batch []sendReq, err error) {
	if len(batch) == 1 {
		r := batch[0]
		s.log.Warn("send refused: Postgres cannot store it", "presence", r.sess.presenceID, "err", err)
		s.metrics.SendFailures.Inc()
		s.replyTo(r.sess, &protocol.Ack{ID: r.msg.ID, Queued: false, Error: protocol.CodeBadRequest, ReqID: r.msg.ReqID})
		return
	}
	half := len(batch) / 2
	s.commitBatch(ctx, batch[:half])
	s.commitBatch(ctx, batch[half:])
}

// planBatch resolves every send's recipients cluster-wide (from live presence and members)
// with three queries for the whole batch, and decides which deliveries this node pushes.
func (s *Server) planBatch(ctx context.Context, batch []sendReq) (*batchPlan, error) {
	plan := &batchPlan{acks: make([]*protocol.Ack, len(batch)), kick: map[*session]struct{}{}}
	kinds := make([]targetKind, len(batch))
	keys := make([]string, len(batch))
	// Multicasts need every live session of their mesh; direct sends only their targets'.
	meshSet := map[string]struct{}{}
	var dMesh, dKey []string
	for i, r := range batch {
		kinds[i], keys[i] = parseTarget(r.msg.TargetSpec)
		switch kinds[i] {
		case targetDirect:
			dMesh, dKey = append(dMesh, r.sess.meshID), append(dKey, keys[i])
		case targetAll, targetGroup:
			meshSet[r.sess.meshID] = struct{}{}
		}
	}
	meshes := make([]string, 0, len(meshSet))
	for m := range meshSet {
		meshes = append(meshes, m)
	}
	// The look-ups are independent: run them at once, so the plan costs one round trip.
	var (
		live    []db.LivePresenceByMeshesRow
		targets []db.LivePresenceByTargetsRow
		ms      []db.ResolveMembersRow
		sk      []db.ResolveSessionKeysRow
	)
	g, gctx := errgroup.WithContext(ctx)
	if len(meshes) > 0 {
		g.Go(func() (err error) {
			if live, err = s.q.LivePresenceByMeshes(gctx, meshes); err != nil {
				err = fmt.Errorf("load presence: %w", err)
			}
			return err
		})
	}
	if len(dKey) > 0 {
		g.Go(func() (err error) {
			if targets, err = s.q.LivePresenceByTargets(gctx, db.LivePresenceByTargetsParams{MeshIds: dMesh, Pubkeys: dKey}); err != nil {
				err = fmt.Errorf("load target presence: %w", err)
			}
			return err
		})
		g.Go(func() (err error) {
			if ms, err = s.q.ResolveMembers(gctx, db.ResolveMembersParams{MeshIds: dMesh, Pubkeys: dKey}); err != nil {
				err = fmt.Errorf("resolve members: %w", err)
			}
			return err
		})
		g.Go(func() (err error) {
			if sk, err = s.q.ResolveSessionKeys(gctx, db.ResolveSessionKeysParams{MeshIds: dMesh, Pubkeys: dKey}); err != nil {
				err = fmt.Errorf("resolve session keys: %w", err)
			}
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	// Direct targets look their presences up by member or session key, so planning a send
	// costs the same in a mesh of ten sessions or of ten thousand.
	byMesh := map[string][]*db.LivePresenceByMeshesRow{}
	byMember := map[[2]string][]*db.LivePresenceByMeshesRow{}  // (mesh, member id)
	bySessKey := map[[2]string][]*db.LivePresenceByMeshesRow{} // (mesh, session key)
	seen := make(map[string]struct{}, len(live))
	for _, p := range live {
		seen[p.ID] = struct{}{}
	}
	for _, t := range targets { // a mesh with multicasts in the batch has them all already
		if _, dup := seen[t.ID]; !dup {
			live = append(live, db.LivePresenceByMeshesRow(t))
		}
	}
	for i := range live {
		p := &live[i]
		if _, multicast := meshSet[p.MeshID]; multicast {
			byMesh[p.MeshID] = append(byMesh[p.MeshID], p)
		}
		byMember[[2]string{p.MeshID, p.MemberID}] = append(byMember[[2]string{p.MeshID, p.MemberID}], p)
		if p.SessionPubkey != nil {
			k := [2]string{p.MeshID, *p.SessionPubkey}
			bySessKey[k] = append(bySessKey[k], p)
		}
	}
	members := map[[2]string]string{} // (mesh, pubkey) → member id
	for _, m := range ms {
		members[[2]string{m.MeshID, m.Pubkey}] = m.ID
	}
	sessKeys := map[[2]string]string{} // (mesh, session key) → member id
	for _, k := range sk {
		sessKeys[[2]string{k.MeshID, k.SessionPubkey}] = k.MemberID
	}

	now := time.Now().UTC().Truncate(time.Microsecond)
	for i, r := range batch {
		m := r.msg
		if kinds[i] == targetInvalid {
			plan.acks[i] = &protocol.Ack{ID: m.ID, Queued: false, Error: protocol.CodeNoRecipient, ReqID: m.ReqID}
			continue
		}
		var recips []plannedDelivery
		remote := map[string][]string{} // node → member ids to wake
		switch kinds[i] {
		case targetDirect:
			mk := [2]string{r.sess.meshID, keys[i]}
			if member, ok := members[mk]; ok {
				d := plannedDelivery{memberID: member}
				d.local = s.pickLocal(byMember[[2]string{r.sess.meshID, member}], m.Priority, plan, remote)
				recips = append(recips, d)
			} else if member, ok := sessKeys[mk]; ok {
				d := plannedDelivery{memberID: member, sessKey: keys[i]}
				d.local = s.pickLocal(bySessKey[mk], m.Priority, plan, remote)
				recips = append(recips, d)
			} else {
				plan.acks[i] = &protocol.Ack{ID: m.ID, Queued: false, Error: protocol.CodeNoRecipient, ReqID: m.ReqID}
				continue
			}
		default:
			group := keys[i]
			presences := byMesh[r.sess.meshID]
			for pi, p := range presences {
				if p.MemberID == r.sess.memberID { // never the sender's own sessions
					continue
				}
				if kinds[i] == targetGroup && !presenceInGroup(p.Groups, group) {
					continue
				}
				d := plannedDelivery{memberID: p.MemberID, sessID: p.SessionID}
				d.local = s.pickLocal(presences[pi:pi+1], m.Priority, plan, remote)
				recips = append(recips, d)
			}
		}
		env := len(plan.envelopes)
		id := uuid.Must(uuid.NewV7()).String()
		plan.envelopes = append(plan.envelopes, envelope{
			ID: id, MeshID: r.sess.meshID, SenderMemberID: r.sess.memberID, SenderPubkey: r.sess.routingKey(),
			SenderMemberPubkey: r.sess.memberPubkey, TargetSpec: m.TargetSpec, Priority: string(m.Priority),
			Nonce: m.Nonce, Ciphertext: m.Ciphertext, ClientID: m.ID, CreatedAt: now, ExpiresAt: now.Add(s.cfg.MessageTTL),
		})
		for _, d := range recips {
			d.env = env
			d.state = "pending"
			if d.local != nil {
				// Pushed right after commit into the slot reserved for it; it counts as
				// delivered once written (or acked), and returns to pending if never written.
				d.state = "pushed"
			}
			plan.deliv = append(plan.deliv, d)
		}
		for node, ms := range remote {
			for _, member := range ms {
				plan.outbox.Add(s.bus.NodeChannel(node), pgbus.Message{Kind: pgbus.KindDeliveries, Member: member})
			}
		}
		kind := map[targetKind]string{targetDirect: "direct", targetAll: "broadcast", targetGroup: "group"}[kinds[i]]
		plan.audit = append(plan.audit, audit.Entry{MeshID: r.sess.meshID, Type: audit.MessageSent, Actor: r.sess.routingKey(), At: now,
			Data: map[string]any{"message_id": id, "target_kind": kind, "priority": string(m.Priority),
				"size": len(m.Ciphertext) + len(m.Nonce), "recipients": len(recips)}})
		plan.acks[i] = &protocol.Ack{ID: m.ID, MessageID: id, Queued: true, ReqID: m.ReqID}
		s.metrics.MessagesRouted.WithLabelValues(string(m.Priority)).Inc()
	}
	return plan, nil
}

// pickLocal chooses a local session among the recipient's live presences that may take a
// priority-p push now, without overtaking its backlog, and reserves a slot of its push window.
// When none can, remote holders are woken up and local ones get their drain kicked.
func (s *Server) pickLocal(presences []*db.LivePresenceByMeshesRow, p protocol.Priority, plan *batchPlan,
	remote map[string][]string) *session {
	var wake []*db.LivePresenceByMeshesRow
	var waiting []*session
	for _, pr := range presences {
		if pr.NodeID != s.nodeID {
			wake = append(wake, pr)
			continue
		}
		sess := s.hub.get(pr.ID)
		if sess == nil {
			continue
		}
		if sess.reserve(p) {
			return sess
		}
		waiting = append(waiting, sess)
	}
	for _, pr := range wake {
		remote[pr.NodeID] = append(remote[pr.NodeID], pr.MemberID)
	}
	for _, w := range waiting {
		plan.kick[w] = struct{}{}
	}
	return nil
}

// unreserve gives back the window slots of a plan that was not committed.
func (plan *batchPlan) unreserve() {
	for _, d := range plan.deliv {
		if d.local != nil {
			d.local.unreserve()
		}
	}
}

func presenceInGroup(raw json.RawMessage, group string) bool {
	var gs []groupEntry
	if json.Unmarshal(raw, &gs) != nil {
		return false
	}
	for _, g := range gs {
		if inGroup(g.Name, group) {
			return true
		}
	}
	return false
}

// storeBatch writes the whole batch in one transaction: envelopes and deliveries in one
// statement, one notification per target node in another, then the audit entries (last, so
// the per-mesh audit lock is held for as short a time as possible).
func (s *Server) storeBatch(ctx context.Context, plan *batchPlan) error {
	if len(plan.envelopes) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	p := db.InsertBatchParams{NodeID: s.nodeID}
	for _, e := range plan.envelopes {
		p.EIds = append(p.EIds, e.ID)
		p.EMeshIds = append(p.EMeshIds, e.MeshID)
		p.ESenderMemberIds = append(p.ESenderMemberIds, e.SenderMemberID)
		p.ESenderPubkeys = append(p.ESenderPubkeys, e.SenderPubkey)
		p.ESenderMemberPubkeys = append(p.ESenderMemberPubkeys, e.SenderMemberPubkey)
		p.ETargetSpecs = append(p.ETargetSpecs, e.TargetSpec)
		p.EPriorities = append(p.EPriorities, e.Priority)
		p.ENonces = append(p.ENonces, e.Nonce)
		p.ECiphertexts = append(p.ECiphertexts, e.Ciphertext)
		p.EClientIds = append(p.EClientIds, e.ClientID)
		p.ECreated = append(p.ECreated, e.CreatedAt)
		p.EExpires = append(p.EExpires, e.ExpiresAt)
	}
	for _, d := range plan.deliv {
		e := plan.envelopes[d.env]
		pushed := ""
		if d.local != nil {
			pushed = d.local.presenceID
		}
		p.DEnvelopeIds = append(p.DEnvelopeIds, e.ID)
		p.DMeshIds = append(p.DMeshIds, e.MeshID)
		p.DMemberIds = append(p.DMemberIds, d.memberID)
		p.DSessionPubkeys = append(p.DSessionPubkeys, d.sessKey)
		p.DSessionIds = append(p.DSessionIds, d.sessID)
		p.DPriorities = append(p.DPriorities, e.Priority)
		p.DStates = append(p.DStates, d.state)
		p.DPushedPresences = append(p.DPushedPresences, pushed)
		p.DExpires = append(p.DExpires, e.ExpiresAt)
	}
	return s.inTxOutbox(ctx, &plan.outbox, func(q *db.Queries, _ *pgbus.Outbox) ([]audit.Entry, error) {
		rows, err := q.InsertBatch(ctx, p)
		if err != nil {
			return nil, fmt.Errorf("insert batch: %w", err)
		}
		ids := make(map[[2]string]int64, len(rows))
		for _, r := range rows {
			if r.PushedPresence != nil {
				ids[[2]string{r.EnvelopeID, *r.PushedPresence}] = r.ID
			}
		}
		plan.deliveryIDs = plan.deliveryIDs[:0]
		for _, d := range plan.deliv {
			if d.local != nil {
				plan.deliveryIDs = append(plan.deliveryIDs, ids[[2]string{plan.envelopes[d.env].ID, d.local.presenceID}])
			}
		}
		return plan.audit, nil
	})
}

// pushPlanned writes this node's direct pushes into their reserved slots: each envelope is
// encoded once and the same bytes go to every local recipient.
func (s *Server) pushPlanned(plan *batchPlan) {
	encoded := make(map[int][]byte)
	var unwritten []int64
	k := 0
	for _, d := range plan.deliv {
		if d.local == nil {
			continue
		}
		id := plan.deliveryIDs[k]
		k++
		b, ok := encoded[d.env]
		if !ok {
			e := plan.envelopes[d.env]
			b = encodePush(e.ID, e.MeshID, e.SenderPubkey, e.SenderMemberPubkey, e.Priority, e.Nonce, e.Ciphertext, e.CreatedAt)
			encoded[d.env] = b
		}
		if !d.local.push(b, id, true) {
			unwritten = append(unwritten, id) // closed meanwhile: back to pending
		}
	}
	s.releaseUnwritten(unwritten)
}

func encodePush(id, mesh, sender, senderMember, priority, nonce, ciphertext string, created time.Time) []byte {
	// protocol.Encode skips encoding/json's re-validation of the hand-written encoder's output.
	b, _ := protocol.Encode(&protocol.Push{
		MessageID: id, MeshID: mesh, SenderPubkey: sender, SenderMemberPubkey: senderMember,
		Priority: protocol.Priority(priority), Nonce: nonce, Ciphertext: ciphertext,
		CreatedAt: protocol.FormatTime(created),
	})
	return b
}

// replyTo writes the ack of a send, whose slot in the reply window was promised.
func (s *Server) replyTo(sess *session, m protocol.ServerMessage) {
	b, err := protocol.Encode(m)
	if err != nil {
		s.log.Error("encode reply", "type", m.Type(), "err", err)
		return
	}
	sess.send(b, true)
}
