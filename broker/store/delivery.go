package store

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
)

// Envelope is one message of a send batch: the ciphertext, stored once.
type Envelope struct {
	ID, MeshID, SenderMemberID, SenderPubkey, SenderMemberPubkey string
	TargetSpec, Priority, Nonce, Ciphertext, ClientID            string
	CreatedAt, ExpiresAt                                         time.Time
	// What today's CLI adds: the send's idempotency key and fingerprint (echoed in pushes),
	// and the sender's display name (senderName).
	ClientMessageID, RequestFingerprint, SenderName string
}

// ClaimFor is one session a claim takes deliveries for.
type ClaimFor struct {
	PresenceID, MemberID, SessionPubkey, SessionID string
	Epoch                                          int64 // the registration its socket owns: nothing is taken for an older one
	IncludeHeld                                    bool  // may take next/low (the session is idle)
	Limit                                          int   // at most this many
	// Retake are deliveries assigned to the session that its replica could not push in order;
	// TakeAssigned takes every one assigned to it (its replica's notifications were lost).
	// Otherwise an assigned one is taken once AssignedStale old (its notification was lost): a
	// recent one may have been pushed from its notification, its push not recorded yet.
	Retake       []int64
	TakeAssigned bool
}

// AssignedStale is how long a delivery may stay assigned to a session (its notification on the
// way) before the catch-up poll counts its notification lost and has the session claim it.
const AssignedStale = 1500 * time.Millisecond

// Claim takes the next deliveries of many sessions in one statement, in id order per session,
// marking them pushed to that session by node: pending ones the session may take, and those
// assigned to it that it did not push (see ClaimFor). Claimed.FromAssigned tells the latter.
// skipped are the presences whose row another transaction held (a takeover, a change of
// status): nothing was taken for them, and a claim a moment later may take what they have.
func (s *Store) Claim(ctx context.Context, nodeID string, sessions []ClaimFor) (claimed []Claimed, skipped []string, err error) {
	p := db.ClaimDeliveriesParams{NodeID: nodeID, AssignedStaleSeconds: AssignedStale.Seconds()}
	for _, c := range sessions {
		p.PresenceIds = append(p.PresenceIds, c.PresenceID)
		p.Epochs = append(p.Epochs, c.Epoch)
		p.MemberIds = append(p.MemberIds, c.MemberID)
		p.SessionPubkeys = append(p.SessionPubkeys, c.SessionPubkey)
		p.SessionIds = append(p.SessionIds, c.SessionID)
		p.IncludeHeld = append(p.IncludeHeld, c.IncludeHeld)
		p.Limits = append(p.Limits, int32(c.Limit))
		p.TakeAssigned = append(p.TakeAssigned, c.TakeAssigned)
		for _, id := range c.Retake {
			p.RetakePresenceIds = append(p.RetakePresenceIds, c.PresenceID)
			p.RetakeIds = append(p.RetakeIds, id)
		}
	}
	rows, err := s.q.ClaimDeliveries(ctx, p)
	if err != nil {
		return nil, nil, fmt.Errorf("claim deliveries: %w", err)
	}
	out := make([]Claimed, 0, len(rows))
	for _, r := range rows {
		if r.ID == 0 {
			skipped = append(skipped, r.PushedPresence)
			continue
		}
		out = append(out, Claimed{ID: r.ID, PresenceID: r.PushedPresence, FromAssigned: r.Assigned, Push: Push{EnvelopeID: r.EnvelopeID,
			MeshID: r.MeshID, SenderPubkey: r.SenderPubkey, SenderMemberPubkey: r.SenderMemberPubkey, Priority: r.Priority,
			Nonce: r.Nonce, Ciphertext: r.Ciphertext, CreatedAt: r.CreatedAt, SenderMemberID: r.SenderMemberID,
			SenderName: r.SenderName, ClientMessageID: r.ClientMessageID, RequestFingerprint: r.RequestFingerprint}})
	}
	return out, skipped, nil
}

// SessionsWithClaimable returns node's connected sessions that have a delivery to claim now,
// with their status (presence id → status), and the ids of node's old assigned pushes whose
// session is no longer live on node (to give back to pending).
func (s *Store) SessionsWithClaimable(ctx context.Context, nodeID string) (map[string]string, []int64, error) {
	rows, err := s.q.NodeSessionsWithClaimable(ctx, db.NodeSessionsWithClaimableParams{NodeID: nodeID,
		AssignedStaleSeconds: AssignedStale.Seconds()})
	if err != nil {
		return nil, nil, fmt.Errorf("sessions with claimable: %w", err)
	}
	out := make(map[string]string, len(rows))
	var orphans []int64
	for _, r := range rows {
		if r.Kind == "o" {
			id, err := strconv.ParseInt(r.ID, 10, 64)
			if err != nil {
				return nil, nil, fmt.Errorf("sessions with claimable: delivery id %q: %w", r.ID, err)
			}
			orphans = append(orphans, id)
			continue
		}
		out[r.ID] = r.Status
	}
	return out, orphans, nil
}

// GiveBack returns to pending node's assigned pushes that SessionsWithClaimable reported as
// orphans, those still so (old, assigned here, their session not live here), and wakes the
// replicas of their members' live sessions. It returns how many went back.
func (s *Store) GiveBack(ctx context.Context, nodeID string, ids []int64) (int, error) {
	n, err := s.q.GiveBackAssigned(ctx, db.GiveBackAssignedParams{Ns: s.ns, NodeID: nodeID, Ids: ids,
		StaleSeconds: AssignedStale.Seconds()})
	if err != nil {
		return 0, fmt.Errorf("give back assigned pushes: %w", err)
	}
	return int(n), nil
}

// Release returns deliveries that could not be written to pending (see ReleaseDeliveries) and
// wakes every replica for their recipients; it says how many it released. With onlyAssigned,
// one whose presence is connected on node stays assigned: its session is joining the hub.
func (s *Store) Release(ctx context.Context, nodeID string, ids []int64, onlyAssigned bool) (int, error) {
	r, err := s.q.ReleaseDeliveries(ctx, db.ReleaseDeliveriesParams{Ids: ids, OnlyAssigned: onlyAssigned,
		NodeID: nodeID, Channel: pgbus.ClusterChannel(s.ns)})
	if err != nil {
		return 0, fmt.Errorf("release deliveries: %w", err)
	}
	return int(r.Released), nil
}

// Ack is one client_ack: a message id acked by a recipient session.
type Ack struct{ EnvelopeID, MemberID, SessionPubkey, SessionID string }

// Taken is an assigned push written to a session that acks, and the epoch of the socket it was
// written to.
type Taken struct {
	ID    int64
	Epoch int64
}

// MarkDelivered records finished deliveries in one statement: client acks, the ids of pushes
// written to sessions that do not ack (done), and the assigned pushes written to sessions that
// ack (taken: pushed, waiting for the ack; pending again when the socket they were written to
// has been taken over since, so that the new one gets them).
func (s *Store) MarkDelivered(ctx context.Context, acks []Ack, written []int64, taken []Taken) error {
	p := db.MarkDeliveredParams{Ns: s.ns, WrittenIds: written}
	for _, t := range taken {
		p.TakenIds = append(p.TakenIds, t.ID)
		p.TakenEpochs = append(p.TakenEpochs, t.Epoch)
	}
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
	return pages(func() (int64, error) {
		n, err := s.q.ExpireDeliveries(ctx, expiryPage)
		if err != nil {
			return n, fmt.Errorf("expire deliveries: %w", err)
		}
		return n, nil
	})
}

// DeleteOldEnvelopes removes the envelopes a day past expiry, with their deliveries, in pages;
// it returns how many envelopes.
func (s *Store) DeleteOldEnvelopes(ctx context.Context) (int64, error) {
	return pages(func() (int64, error) {
		r, err := s.q.DeleteOldEnvelopes(ctx, expiryPage)
		if err != nil {
			return 0, fmt.Errorf("delete old envelopes: %w", err)
		}
		return r.Envelopes, nil
	})
}

// expiryPage is the rows one expiry or deletion statement takes at most, and expiryBudget how
// long one sweep goes on taking pages while they come back full. One page a sweep (every 30 s)
// kept up with 167 messages a second a replica, and what a busier cluster left behind grew
// without end; pages until the work is done clear thousands a second, each statement short.
const (
	expiryPage   = 5000
	expiryBudget = 10 * time.Second
)

// pages runs page until it comes back short, fails, or expiryBudget has passed; it returns
// the total.
func pages(page func() (int64, error)) (int64, error) {
	var total int64
	for start := time.Now(); ; {
		n, err := page()
		total += n
		if err != nil || n < expiryPage || time.Since(start) > expiryBudget {
			return total, err
		}
	}
}

// SealAudit chains the audit entries committed since the last seal, unless another replica is
// sealing at this moment (it will chain them).
func (s *Store) SealAudit(ctx context.Context) (int, error) {
	return audit.Seal(ctx, s.pool, false)
}

// LogAuditAnchors logs the chain heads that moved since a's last call (audit.Anchors).
func (s *Store) LogAuditAnchors(ctx context.Context, a *audit.Anchors) (int, error) {
	return a.Log(ctx, s.pool)
}

// AuditPending is how many audit entries wait to be chained, cluster-wide, and the age of the
// oldest in seconds (0 when none).
func (s *Store) AuditPending(ctx context.Context) (int64, float64, error) {
	r, err := s.q.AuditPendingStats(ctx)
	if err != nil {
		return 0, 0, fmt.Errorf("audit pending: %w", err)
	}
	return r.Entries, r.OldestSeconds, nil
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

// BacklogChange is a member whose waiting messages reached the bound (AtBound) or fell below
// it, as a sweep found them.
type BacklogChange struct {
	MemberID, MeshID string
	Waiting          int
	AtBound          bool
}

// BacklogScan is how many delivery ids one sweep looks at: a cursor left far behind (a
// cluster stopped for a while under load) catches up over several sweeps, each one short.
const BacklogScan = 100_000

// SweepBacklog adds the deliveries stored since the last sweep, on any replica, to their
// members' estimates, counts exactly the members whose estimate reached maxWaiting (an unsure
// one, whose estimate is at it while its count is not, at most every 5 s, else every minute)
// and those at it whose oldest open delivery changed (or counted a minute ago), and keeps the
// set of members at maxWaiting that the send statement refuses to add to (migration 00046). One replica sweeps at
// a time, at most once per gap: ran is false when another replica is sweeping or swept less
// than gap ago, and nothing was done.
func (s *Store) SweepBacklog(ctx context.Context, maxWaiting int, gap time.Duration) (changes []BacklogChange, ran bool, err error) {
	rows, err := s.q.SweepBacklog(ctx, db.SweepBacklogParams{MaxWaiting: int32(maxWaiting), Scan: BacklogScan, GapSeconds: gap.Seconds()})
	if err != nil {
		return nil, false, fmt.Errorf("sweep backlog: %w", err)
	}
	for _, r := range rows {
		if r.MemberID == "" { // the row that says the sweep ran
			ran = true
			continue
		}
		changes = append(changes, BacklogChange{MemberID: r.MemberID, MeshID: r.MeshID, Waiting: int(r.Waiting), AtBound: r.AtBound})
	}
	return changes, ran, nil
}
