package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/claudemesh/broker/db"
)

// MeshKey is a key (member or session pubkey) within a mesh.
type MeshKey struct{ MeshID, Key string }

// Recipients is what planning a batch of sends needs: the live sessions of the meshes with
// multicasts, the live sessions reachable by the direct targets, and which member each direct
// target key is (as a member key, or as a session key).
type Recipients struct {
	Targets     []Target
	Members     map[MeshKey]string // member key → member id (live members)
	SessionKeys map[MeshKey]string // session key → member id (live members)
}

// LoadRecipients reads the recipients of a batch: every live session of multicastMeshes, and
// the sessions and members behind direct targets (each through an index, never a scan of the
// mesh). The look-ups run at once: one round trip.
func (s *Store) LoadRecipients(ctx context.Context, multicastMeshes []string, direct []MeshKey) (Recipients, error) {
	var (
		live    []db.LivePresenceByMeshesRow
		targets []db.LivePresenceByTargetsRow
		ms      []db.ResolveMembersRow
		sk      []db.ResolveSessionKeysRow
	)
	dMesh, dKey := make([]string, len(direct)), make([]string, len(direct))
	for i, d := range direct {
		dMesh[i], dKey[i] = d.MeshID, d.Key
	}
	g, gctx := errgroup.WithContext(ctx)
	if len(multicastMeshes) > 0 {
		g.Go(func() (err error) {
			if live, err = s.q.LivePresenceByMeshes(gctx, multicastMeshes); err != nil {
				err = fmt.Errorf("load presence: %w", err)
			}
			return err
		})
	}
	if len(direct) > 0 {
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
		return Recipients{}, err
	}
	r := Recipients{Targets: make([]Target, 0, len(live)+len(targets)),
		Members: make(map[MeshKey]string, len(ms)), SessionKeys: make(map[MeshKey]string, len(sk))}
	seen := make(map[string]struct{}, len(live))
	for _, p := range live {
		seen[p.ID] = struct{}{}
		r.Targets = append(r.Targets, Target{ID: p.ID, MeshID: p.MeshID, MemberID: p.MemberID, NodeID: p.NodeID,
			SessionID: p.SessionID, SessionPubkey: deref(p.SessionPubkey), GroupNames: p.GroupNames, Status: p.Status})
	}
	for _, p := range targets { // a mesh with multicasts in the batch has them all already
		if _, dup := seen[p.ID]; !dup {
			r.Targets = append(r.Targets, Target{ID: p.ID, MeshID: p.MeshID, MemberID: p.MemberID, NodeID: p.NodeID,
				SessionID: p.SessionID, SessionPubkey: deref(p.SessionPubkey), Status: p.Status})
		}
	}
	for _, m := range ms {
		r.Members[MeshKey{m.MeshID, m.Pubkey}] = m.ID
	}
	for _, k := range sk {
		r.SessionKeys[MeshKey{k.MeshID, k.SessionPubkey}] = k.MemberID
	}
	return r, nil
}

// Envelope is one message of a send batch: the ciphertext, stored once.
type Envelope struct {
	ID, MeshID, SenderMemberID, SenderPubkey, SenderMemberPubkey string
	TargetSpec, Priority, Nonce, Ciphertext, ClientID            string
	CreatedAt, ExpiresAt                                         time.Time
}

// NewDelivery is one recipient of an envelope in a batch.
type NewDelivery struct {
	Envelope      int    // index into the batch's envelopes
	MemberID      string // the recipient member
	SessionPubkey string // only the session with this key may take it ("" any)
	SessionID     string // only the session with this id may take it ("" any)
	// PushedTo is the local presence the sender pushes it to right after commit ("" pending).
	PushedTo string
}

// InsertBatch stores a batch's envelopes and deliveries in one statement. It returns the ids
// of the deliveries with PushedTo set, in the order of deliveries.
func (t *Tx) InsertBatch(ctx context.Context, nodeID string, envs []Envelope, dels []NewDelivery) ([]int64, error) {
	p := db.InsertBatchParams{NodeID: nodeID}
	for _, e := range envs {
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
	for _, d := range dels {
		e := envs[d.Envelope]
		state := DeliveryPending
		if d.PushedTo != "" {
			state = DeliveryPushed
		}
		p.DEnvelopeIds = append(p.DEnvelopeIds, e.ID)
		p.DMeshIds = append(p.DMeshIds, e.MeshID)
		p.DMemberIds = append(p.DMemberIds, d.MemberID)
		p.DSessionPubkeys = append(p.DSessionPubkeys, d.SessionPubkey)
		p.DSessionIds = append(p.DSessionIds, d.SessionID)
		p.DPriorities = append(p.DPriorities, e.Priority)
		p.DStates = append(p.DStates, string(state))
		p.DPushedPresences = append(p.DPushedPresences, d.PushedTo)
		p.DExpires = append(p.DExpires, e.ExpiresAt)
	}
	rows, err := t.q.InsertBatch(ctx, p)
	if err != nil {
		return nil, fmt.Errorf("insert batch: %w", err)
	}
	ids := make(map[[2]string]int64, len(rows))
	for _, r := range rows {
		if r.PushedPresence != nil {
			ids[[2]string{r.EnvelopeID, *r.PushedPresence}] = r.ID
		}
	}
	var out []int64
	for _, d := range dels {
		if d.PushedTo != "" {
			out = append(out, ids[[2]string{envs[d.Envelope].ID, d.PushedTo}])
		}
	}
	return out, nil
}

// ClaimFor is one session a claim takes deliveries for.
type ClaimFor struct {
	PresenceID, MemberID, SessionPubkey, SessionID string
	IncludeHeld                                    bool // may take next/low (the session is idle)
	Limit                                          int  // at most this many
}

// Claim takes the next pending deliveries of many sessions in one statement, in id order per
// session, marking them pushed to that session by node.
func (s *Store) Claim(ctx context.Context, nodeID string, sessions []ClaimFor) ([]Claimed, error) {
	p := db.ClaimDeliveriesParams{NodeID: nodeID}
	for _, c := range sessions {
		p.PresenceIds = append(p.PresenceIds, c.PresenceID)
		p.MemberIds = append(p.MemberIds, c.MemberID)
		p.SessionPubkeys = append(p.SessionPubkeys, c.SessionPubkey)
		p.SessionIds = append(p.SessionIds, c.SessionID)
		p.IncludeHeld = append(p.IncludeHeld, c.IncludeHeld)
		p.Limits = append(p.Limits, int32(c.Limit))
	}
	rows, err := s.q.ClaimDeliveries(ctx, p)
	if err != nil {
		return nil, fmt.Errorf("claim deliveries: %w", err)
	}
	out := make([]Claimed, 0, len(rows))
	for _, r := range rows {
		out = append(out, Claimed{ID: r.ID, PresenceID: deref(r.PushedPresence), EnvelopeID: r.EnvelopeID, MeshID: r.MeshID,
			SenderPubkey: r.SenderPubkey, SenderMemberPubkey: r.SenderMemberPubkey, Priority: r.Priority,
			Nonce: r.Nonce, Ciphertext: r.Ciphertext, CreatedAt: r.CreatedAt})
	}
	return out, nil
}

// SessionsWithClaimable returns node's connected sessions that have a delivery to claim now,
// with their status (presence id → status).
func (s *Store) SessionsWithClaimable(ctx context.Context, nodeID string) (map[string]string, error) {
	rows, err := s.q.NodeSessionsWithClaimable(ctx, nodeID)
	if err != nil {
		return nil, fmt.Errorf("sessions with claimable: %w", err)
	}
	out := make(map[string]string, len(rows))
	for _, r := range rows {
		out[r.ID] = r.Status
	}
	return out, nil
}

// Release returns claimed deliveries that were never written to pending.
func (s *Store) Release(ctx context.Context, ids []int64) ([]Recipient, error) {
	rows, err := s.q.ReleaseDeliveries(ctx, ids)
	if err != nil {
		return nil, fmt.Errorf("release deliveries: %w", err)
	}
	out := make([]Recipient, len(rows))
	for i, r := range rows {
		out[i] = Recipient{MeshID: r.MeshID, MemberID: r.RecipientMemberID}
	}
	return out, nil
}

// Ack is one client_ack: a message id acked by a recipient session.
type Ack struct{ EnvelopeID, MemberID, SessionPubkey, SessionID string }

// MarkDelivered records finished deliveries in one statement: client acks, and the ids of
// pushes written to sessions that do not ack.
func (s *Store) MarkDelivered(ctx context.Context, acks []Ack, written []int64) error {
	p := db.MarkDeliveredParams{WrittenIds: written}
	for _, a := range acks {
		p.EnvelopeIds = append(p.EnvelopeIds, a.EnvelopeID)
		p.MemberIds = append(p.MemberIds, a.MemberID)
		p.SessionPubkeys = append(p.SessionPubkeys, a.SessionPubkey)
		p.SessionIds = append(p.SessionIds, a.SessionID)
	}
	if err := s.q.MarkDelivered(ctx, p); err != nil {
		return fmt.Errorf("mark delivered: %w", err)
	}
	return nil
}

// ExpireDeliveries marks a page of deliveries of expired envelopes expired.
func (s *Store) ExpireDeliveries(ctx context.Context) (int64, error) {
	n, err := s.q.ExpireDeliveries(ctx)
	if err != nil {
		return 0, fmt.Errorf("expire deliveries: %w", err)
	}
	return n, nil
}

// DeleteOldEnvelopes removes a page of envelopes a day past expiry, with their deliveries.
func (s *Store) DeleteOldEnvelopes(ctx context.Context) (int64, error) {
	n, err := s.q.DeleteOldEnvelopes(ctx)
	if err != nil {
		return 0, fmt.Errorf("delete old envelopes: %w", err)
	}
	return n, nil
}

// PendingCount is the number of deliveries not yet done, cluster-wide.
func (s *Store) PendingCount(ctx context.Context) (int64, error) {
	n, err := s.q.PendingDeliveryCount(ctx)
	if err != nil {
		return 0, fmt.Errorf("count pending deliveries: %w", err)
	}
	return n, nil
}

// MessageStatus is a sent message's per-recipient state.
type MessageStatus struct {
	EnvelopeID, TargetSpec string
	Recipients             []RecipientStatus
}

// MessageStatus reads a message of meshID and its recipients; ErrNotFound for an unknown id
// or one of another mesh.
func (s *Store) MessageStatus(ctx context.Context, meshID, envelopeID string) (MessageStatus, error) {
	env, err := s.q.EnvelopeForStatus(ctx, db.EnvelopeForStatusParams{ID: envelopeID, MeshID: meshID})
	if err = notFound(err); err != nil {
		if errors.Is(err, ErrNotFound) {
			return MessageStatus{}, err
		}
		return MessageStatus{}, fmt.Errorf("load envelope: %w", err)
	}
	rows, err := s.q.DeliveryStatus(ctx, env.ID)
	if err != nil {
		return MessageStatus{}, fmt.Errorf("load deliveries: %w", err)
	}
	out := MessageStatus{EnvelopeID: env.ID, TargetSpec: env.TargetSpec, Recipients: make([]RecipientStatus, len(rows))}
	for i, r := range rows {
		out.Recipients[i] = RecipientStatus{State: DeliveryState(r.State), PushedAt: r.PushedAt, AckedAt: r.AckedAt,
			DisplayName: r.DisplayName, MemberPubkey: r.MemberPubkey, SessionPubkey: deref(r.RecipientSessionPubkey), Online: r.Online}
	}
	return out, nil
}
