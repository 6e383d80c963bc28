package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/claudemesh/broker/db"
)

// HelloFacts is what a hello's checks need from the database, read in one round trip.
type HelloFacts struct {
	MeshFound bool // the mesh exists and is not archived
	MaxPeers  int  // the mesh's own session limit, 0 for the broker's default
	// Live is the mesh's live sessions, not counting this session's own presence.
	Live int64
	// MemberID, MemberName: the live member with that key and id ("" when none).
	MemberID, MemberName string
	Revoked              bool // a revoked member with that key and id exists
	// FreshSignature: the hello's signature had not been used before (now recorded).
	FreshSignature bool
}

// HelloLookup reads what a hello is checked against, four independent statements at once,
// and records its signature so it is accepted once cluster-wide.
func (s *Store) HelloLookup(ctx context.Context, meshID, memberID, pubkey, sessionID, signature string, sigExpires time.Time) (HelloFacts, error) {
	var (
		f       HelloFacts
		members []db.MemberByPubkeyRow
	)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		mesh, err := s.q.MeshForHello(gctx, meshID)
		switch err = notFound(err); {
		case errors.Is(err, ErrNotFound):
		case err != nil:
			return fmt.Errorf("load mesh: %w", err)
		default:
			f.MeshFound, f.MaxPeers = mesh.ArchivedAt == nil, int(mesh.MaxPeers)
		}
		return nil
	})
	g.Go(func() (err error) {
		f.Live, err = s.q.CountLivePresence(gctx, db.CountLivePresenceParams{MeshID: meshID, SessionID: sessionID, MemberPubkey: pubkey})
		if err != nil {
			err = fmt.Errorf("count presence: %w", err)
		}
		return err
	})
	g.Go(func() (err error) {
		if members, err = s.q.MemberByPubkey(gctx, db.MemberByPubkeyParams{MeshID: meshID, Pubkey: pubkey}); err != nil {
			err = fmt.Errorf("load member: %w", err)
		}
		return err
	})
	g.Go(func() error {
		fresh, err := s.ClaimSignature(gctx, signature, sigExpires)
		f.FreshSignature = fresh
		return err
	})
	if err := g.Wait(); err != nil {
		return HelloFacts{}, err
	}
	for _, m := range members {
		if m.ID != memberID {
			continue
		}
		if m.RevokedAt == nil {
			f.MemberID, f.MemberName = m.ID, m.DisplayName
			break
		}
		f.Revoked = true
	}
	return f, nil
}

// ClaimSignature records a signed request's signature until expires; false means it was seen
// before (a replay).
func (s *Store) ClaimSignature(ctx context.Context, signature string, expires time.Time) (bool, error) {
	_, err := s.q.ClaimSignature(ctx, db.ClaimSignatureParams{Signature: signature, ExpiresAt: expires})
	switch err = notFound(err); {
	case errors.Is(err, ErrNotFound):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("record signature: %w", err)
	}
	return true, nil
}

// Registration describes a presence a hello registered.
type Registration struct {
	PresenceID string
	Status     string
	Epoch      int64
	// OldNode is the node the presence was live on before ("" for a new presence);
	// WasInGrace says it was in its reconnect grace.
	OldNode    string
	WasInGrace bool
}

// RegisterParams is a hello's presence.
type RegisterParams struct {
	MeshID, MemberID, MemberPubkey, NodeID, SessionID string
	SessionPubkey                                     string // "" when none
	DisplayName, CWD                                  string
	PID                                               int
	Groups                                            []Group
	Capabilities                                      []string
	Limit                                             int64 // the mesh's session limit
}

// RegisterPresence binds the session key, takes a hook signal that arrived first, and
// registers the presence (new, resumed or taken over) under the mesh's capacity lock, in t.
// ErrSessionKeyTaken and ErrCapacity are refusals.
func (t *Tx) RegisterPresence(ctx context.Context, p RegisterParams) (Registration, error) {
	// What doesn't depend on the mesh's session count runs before its lock.
	if p.SessionPubkey != "" {
		owner, err := t.q.BindSessionKey(ctx, db.BindSessionKeyParams{MeshID: p.MeshID, SessionPubkey: p.SessionPubkey,
			MemberPubkey: p.MemberPubkey, MemberID: p.MemberID})
		if err != nil {
			return Registration{}, fmt.Errorf("bind session key: %w", err)
		}
		if owner != p.MemberID {
			return Registration{}, ErrSessionKeyTaken
		}
	}
	// A hook that fired before this hello (the first-turn race) applies now.
	var hookStatus *string
	st, err := t.q.TakePendingStatus(ctx, db.TakePendingStatusParams{MemberPubkey: p.MemberPubkey, SessionID: p.SessionID,
		Pid: int32(p.PID), Cwd: p.CWD})
	switch err = notFound(err); {
	case err == nil:
		hookStatus = &st
	case !errors.Is(err, ErrNotFound):
		return Registration{}, fmt.Errorf("take pending status: %w", err)
	}
	// Hellos of one mesh (not of the cluster) serialize from here to commit, so the capacity
	// check can't be raced by a hello on another replica.
	if err := t.q.LockMeshHello(ctx, p.MeshID); err != nil {
		return Registration{}, fmt.Errorf("lock mesh: %w", err)
	}
	n, err := t.q.CountLivePresence(ctx, db.CountLivePresenceParams{MeshID: p.MeshID, SessionID: p.SessionID, MemberPubkey: p.MemberPubkey})
	if err != nil {
		return Registration{}, fmt.Errorf("count presence: %w", err)
	}
	if n >= p.Limit {
		return Registration{}, ErrCapacity
	}
	groups, _ := json.Marshal(nonNil(p.Groups))
	var sessKey *string
	if p.SessionPubkey != "" {
		sessKey = &p.SessionPubkey
	}
	caps := p.Capabilities
	if caps == nil {
		caps = []string{}
	}
	row, err := t.q.UpsertPresence(ctx, db.UpsertPresenceParams{
		MeshID: p.MeshID, MemberID: p.MemberID, MemberPubkey: p.MemberPubkey, NodeID: p.NodeID,
		SessionID: p.SessionID, SessionPubkey: sessKey, DisplayName: p.DisplayName,
		Pid: int32(p.PID), Cwd: p.CWD, Groups: groups, Capabilities: caps, HookStatus: hookStatus,
	})
	if err != nil {
		return Registration{}, fmt.Errorf("register presence: %w", err)
	}
	r := Registration{PresenceID: row.ID, Status: row.Status, Epoch: row.Epoch, WasInGrace: row.OldGraceUntil != nil}
	if row.OldNodeID != nil {
		r.OldNode = *row.OldNodeID
	}
	return r, nil
}

func nonNil(gs []Group) []Group {
	if gs == nil {
		return []Group{}
	}
	return gs
}

// LivePresences lists every live session of a mesh, oldest first.
func (s *Store) LivePresences(ctx context.Context, meshID string) ([]Presence, error) {
	rows, err := s.q.ListLivePresence(ctx, meshID)
	if err != nil {
		return nil, fmt.Errorf("list presence: %w", err)
	}
	out := make([]Presence, len(rows))
	for i, p := range rows {
		out[i] = Presence{ID: p.ID, MeshID: p.MeshID, MemberID: p.MemberID, MemberPubkey: p.MemberPubkey, NodeID: p.NodeID,
			SessionID: p.SessionID, SessionPubkey: deref(p.SessionPubkey), DisplayName: p.DisplayName, CWD: p.Cwd,
			Status: p.Status, StatusSource: p.StatusSource, Summary: p.Summary, PID: int(p.Pid),
			ConnectedAt: p.ConnectedAt, InGrace: p.GraceUntil != nil}
		_ = json.Unmarshal(p.Groups, &out[i].Groups)
		out[i].Groups = nonNil(out[i].Groups)
	}
	return out, nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// SetSummary sets a live presence's summary.
func (s *Store) SetSummary(ctx context.Context, presenceID, summary string) error {
	if err := s.q.SetPresenceSummary(ctx, db.SetPresenceSummaryParams{ID: presenceID, Summary: summary}); err != nil {
		return fmt.Errorf("set summary: %w", err)
	}
	return nil
}

// SetGroups replaces a live presence's groups.
func (s *Store) SetGroups(ctx context.Context, presenceID string, groups []Group) error {
	raw, _ := json.Marshal(nonNil(groups))
	if err := s.q.SetPresenceGroups(ctx, db.SetPresenceGroupsParams{ID: presenceID, Groups: raw}); err != nil {
		return fmt.Errorf("set groups: %w", err)
	}
	return nil
}

// NodeStatuses returns the status of every live presence owned by node.
func (s *Store) NodeStatuses(ctx context.Context, nodeID string) (map[string]string, error) {
	rows, err := s.q.NodePresenceStatus(ctx, nodeID)
	if err != nil {
		return nil, fmt.Errorf("node statuses: %w", err)
	}
	out := make(map[string]string, len(rows))
	for _, r := range rows {
		out[r.ID] = r.Status
	}
	return out, nil
}

// PresenceStatus reads one presence's status.
func (s *Store) PresenceStatus(ctx context.Context, presenceID string) (string, error) {
	p, err := s.q.PresenceByID(ctx, presenceID)
	if err != nil {
		return "", fmt.Errorf("load presence: %w", notFound(err))
	}
	return p.Status, nil
}

// Orphan is a presence a node owns with no grace, last seen a while ago.
type Orphan struct {
	ID    string
	Epoch int64
}

// Orphans lists node's presences that should have a session on it (the reconcile compares).
func (s *Store) Orphans(ctx context.Context, nodeID string) ([]Orphan, error) {
	rows, err := s.q.OrphanPresences(ctx, nodeID)
	if err != nil {
		return nil, fmt.Errorf("orphan presences: %w", err)
	}
	out := make([]Orphan, len(rows))
	for i, r := range rows {
		out[i] = Orphan{ID: r.ID, Epoch: r.Epoch}
	}
	return out, nil
}

// PresenceRef names one registration of a presence (the epoch a closed socket owned).
type PresenceRef struct {
	ID    string
	Epoch int64
}

// GracePresences puts closed sockets' presences in their reconnect grace until until.
func (t *Tx) GracePresences(ctx context.Context, nodeID string, refs []PresenceRef, until time.Time) error {
	ids, epochs := splitRefs(refs)
	if err := t.q.GracePresences(ctx, db.GracePresencesParams{Ids: ids, Epochs: epochs, NodeID: nodeID, GraceUntil: &until}); err != nil {
		return fmt.Errorf("grace presences: %w", err)
	}
	return nil
}

// EndPresences ends closed sockets' presences at once.
func (t *Tx) EndPresences(ctx context.Context, nodeID string, refs []PresenceRef) ([]EndedPresence, error) {
	ids, epochs := splitRefs(refs)
	rows, err := t.q.EndPresences(ctx, db.EndPresencesParams{Ids: ids, Epochs: epochs, NodeID: nodeID})
	if err != nil {
		return nil, fmt.Errorf("end presences: %w", err)
	}
	out := make([]EndedPresence, len(rows))
	for i, r := range rows {
		out[i] = EndedPresence{r.ID, r.MeshID, r.MemberID, r.MemberPubkey, deref(r.SessionPubkey), r.DisplayName}
	}
	return out, nil
}

func splitRefs(refs []PresenceRef) ([]string, []int64) {
	ids, epochs := make([]string, len(refs)), make([]int64, len(refs))
	for i, r := range refs {
		ids[i], epochs[i] = r.ID, r.Epoch
	}
	return ids, epochs
}

// EndExpiredGrace ends presences whose grace ran out, on any node.
func (t *Tx) EndExpiredGrace(ctx context.Context) ([]EndedPresence, error) {
	rows, err := t.q.EndExpiredGrace(ctx)
	if err != nil {
		return nil, fmt.Errorf("end expired grace: %w", err)
	}
	out := make([]EndedPresence, len(rows))
	for i, r := range rows {
		out[i] = EndedPresence{r.ID, r.MeshID, r.MemberID, r.MemberPubkey, deref(r.SessionPubkey), r.DisplayName}
	}
	return out, nil
}

// ReleasePresencePushes returns the unacked pushes of ended sockets' presences to pending.
func (t *Tx) ReleasePresencePushes(ctx context.Context, presenceIDs []string) ([]Recipient, error) {
	rows, err := t.q.ReleasePresencePushes(ctx, presenceIDs)
	if err != nil {
		return nil, fmt.Errorf("release pushes: %w", err)
	}
	out := make([]Recipient, len(rows))
	for i, r := range rows {
		out[i] = Recipient{MeshID: r.MeshID, MemberID: r.RecipientMemberID}
	}
	return out, nil
}

// Holders returns the nodes holding live sessions of these recipients.
func (t *Tx) Holders(ctx context.Context, recipients []Recipient) ([]Holder, error) {
	byMesh := map[string][]string{}
	for _, r := range recipients {
		byMesh[r.MeshID] = append(byMesh[r.MeshID], r.MemberID)
	}
	var out []Holder
	for mesh, members := range byMesh {
		rows, err := t.q.NodesOfMembers(ctx, db.NodesOfMembersParams{MeshID: mesh, MemberIds: members})
		if err != nil {
			return nil, fmt.Errorf("find holders: %w", err)
		}
		for _, h := range rows {
			out = append(out, Holder{NodeID: h.NodeID, MemberID: h.MemberID})
		}
	}
	return out, nil
}
