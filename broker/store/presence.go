package store

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/claudemesh/broker/db"
)

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

// nonNil makes a nil list an empty one, which encodes as [] rather than null.
func nonNil[T any](xs []T) []T {
	if xs == nil {
		return []T{}
	}
	return xs
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
			ConnectedAt: p.ConnectedAt, InGrace: p.GraceUntil != nil, Role: p.Role, Hostname: p.Hostname,
			PeerType: p.PeerType, Channel: p.Channel, Model: p.Model}
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

// NodePresence is a live presence a node owns, as the table has it.
type NodePresence struct {
	Status  string
	Epoch   int64 // of the socket it belongs to
	Revoked bool  // its member was revoked since
}

// NodeStatuses returns every live presence owned by node, by id.
func (s *Store) NodeStatuses(ctx context.Context, nodeID string) (map[string]NodePresence, error) {
	rows, err := s.q.NodePresenceStatus(ctx, nodeID)
	if err != nil {
		return nil, fmt.Errorf("node statuses: %w", err)
	}
	out := make(map[string]NodePresence, len(rows))
	for _, r := range rows {
		out[r.ID] = NodePresence{Status: r.Status, Epoch: r.Epoch, Revoked: r.Revoked}
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
	ids := make([]string, len(rows))
	for i, r := range rows {
		out[i] = EndedPresence{r.ID, r.MeshID, r.MemberID, r.MemberPubkey, deref(r.SessionPubkey), r.DisplayName}
		ids[i] = r.ID
	}
	if len(ids) > 0 {
		// Their sockets are gone: what is still assigned or pushed to them waits for the
		// member's other sessions.
		if err := t.q.ReleaseHeld(ctx, db.ReleaseHeldParams{Ns: t.ns, Ids: ids}); err != nil {
			return nil, fmt.Errorf("end expired grace: release: %w", err)
		}
	}
	return out, nil
}
