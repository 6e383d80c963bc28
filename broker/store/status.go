package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/claudemesh/broker/db"
)

// Status sources, by rank: hook > manual > inferred.
const (
	SourceHook     = "hook"
	SourceManual   = "manual"
	SourceInferred = "inferred"
)

// ExpireWorking flips node's sessions stuck in working longer than ttl to idle (inferred).
func (t *Tx) ExpireWorking(ctx context.Context, nodeID string, ttl time.Duration) ([]StatusChange, error) {
	rows, err := t.q.ExpireWorking(ctx, db.ExpireWorkingParams{NodeID: nodeID, TtlSeconds: ttl.Seconds()})
	if err != nil {
		return nil, fmt.Errorf("expire working: %w", err)
	}
	out := make([]StatusChange, len(rows))
	for i, r := range rows {
		out[i] = StatusChange{r.ID, r.MeshID, r.MemberID, r.MemberPubkey, deref(r.SessionPubkey), r.DisplayName, r.NodeID, r.Status}
	}
	return out, nil
}

// HookQuery is what a hook request names: a session id, else a pid + cwd, else a cwd. A signed
// hook (MemberPubkey set) reaches only that member's sessions.
type HookQuery struct {
	MemberPubkey, SessionID, CWD string
	PID                          int
}

// DeleteExpired drops stale hook signals, remembered signatures, the rows of nodes gone more
// than GoneNodeRetention ago, shared-state deletions older than StateDeletionRetention, and up
// to endedPresencePages pages of presences ended more than EndedPresenceRetention ago.
func (s *Store) DeleteExpired(ctx context.Context) error {
	// Each on its own: one failing leaves the others' rows to be deleted.
	var errs []error
	if err := s.q.DeleteExpiredPendingStatus(ctx); err != nil {
		errs = append(errs, fmt.Errorf("delete expired hook signals: %w", err))
	}
	if _, err := s.q.DeleteExpiredSignatures(ctx); err != nil {
		errs = append(errs, fmt.Errorf("delete expired signatures: %w", err))
	}
	if _, err := s.q.DeleteGoneNodes(ctx, GoneNodeRetention.Seconds()); err != nil {
		errs = append(errs, fmt.Errorf("delete gone nodes: %w", err))
	}
	if _, err := s.q.DeleteOldStateDeletions(ctx, StateDeletionRetention.Seconds()); err != nil {
		errs = append(errs, fmt.Errorf("delete old state deletions: %w", err))
	}
	// A few pages per sweep: a backlog (the rows kept before pruning existed) clears in
	// minutes without one long statement.
	for range endedPresencePages {
		n, err := s.q.DeleteEndedPresences(ctx, db.DeleteEndedPresencesParams{
			EndedBeforeSeconds: EndedPresenceRetention.Seconds(), PageSize: endedPresencePage})
		if err != nil {
			errs = append(errs, fmt.Errorf("delete ended presences: %w", err))
			break
		}
		if n < endedPresencePage {
			break
		}
	}
	return errors.Join(errs...)
}

// endedPresencePage is the rows one DeleteEndedPresences statement deletes at most;
// endedPresencePages bounds the statements of one sweep.
const (
	endedPresencePage  = 5000
	endedPresencePages = 10
)

// EndedPresenceRetention is how long an ended presence is kept: every new session adds one,
// and only a replica catching up on the peer_left notices it lost reads one once ended
// (PresenceChangesSince; the audit log records who connected when).
const EndedPresenceRetention = time.Hour

// GoneNodeRetention is how long the row of a replica that stopped or was declared dead is
// kept; then it goes once nothing live names it.
const GoneNodeRetention = 24 * time.Hour

// StateDeletionRetention is how long a shared-state key's deletion is kept for the replicas
// catching up on notices they lost (StateChangesSince): far longer than a LISTEN connection
// stays away while its replica keeps its sessions.
const StateDeletionRetention = time.Hour

// StateChange is a shared-state write or deletion (Value null) of a mesh, for a catch-up.
type StateChange struct {
	MeshID, Key string
	Value       json.RawMessage
	UpdatedBy   string
	PresenceID  string // the writer's session ("" when unknown), not told its own change
	At          time.Time
}

// StateChangesSince returns the shared-state changes of these meshes at or after since, for
// each mesh its newest perMesh, ordered by mesh and then oldest first.
func (s *Store) StateChangesSince(ctx context.Context, meshIDs []string, since time.Time, perMesh int) ([]StateChange, error) {
	rows, err := s.q.StateChangesSince(ctx, db.StateChangesSinceParams{MeshIds: meshIDs, Since: since, PerMesh: int32(perMesh)})
	if err != nil {
		return nil, fmt.Errorf("state changes since: %w", err)
	}
	out := make([]StateChange, len(rows))
	for i, r := range rows {
		out[i] = StateChange{MeshID: r.MeshID, Key: r.Key, Value: r.Value, UpdatedBy: r.UpdatedBy, PresenceID: r.PresenceID, At: r.At}
	}
	return out, nil
}

// PresenceChange is a presence of a mesh that connected, changed status or ended since a time,
// as it is now, for a catch-up of system events.
type PresenceChange struct {
	MeshID, PresenceID, MemberID string
	Pubkey, DisplayName, Status  string // Pubkey: the session key if set, else the member key
	ConnectedAt                  time.Time
	Ended                        bool      // ended (peer_left); else live
	At                           time.Time // its latest change: the end, else the later of connect and change of status
}

// PresenceChangesSince returns the presences of these meshes that connected, changed status or
// ended at or after since, for each mesh its newest perMesh, ordered by mesh and then oldest
// first.
func (s *Store) PresenceChangesSince(ctx context.Context, meshIDs []string, since time.Time, perMesh int) ([]PresenceChange, error) {
	rows, err := s.q.PresenceChangesSince(ctx, db.PresenceChangesSinceParams{MeshIds: meshIDs, Since: since, PerMesh: int32(perMesh)})
	if err != nil {
		return nil, fmt.Errorf("presence changes since: %w", err)
	}
	out := make([]PresenceChange, len(rows))
	for i, r := range rows {
		out[i] = PresenceChange{MeshID: r.MeshID, PresenceID: r.PresenceID, MemberID: r.MemberID, Pubkey: r.Pubkey,
			DisplayName: r.DisplayName, Status: r.Status, ConnectedAt: r.ConnectedAt, Ended: r.Ended, At: r.At}
	}
	return out, nil
}

// StateQuota bounds a mesh's shared state.
type StateQuota struct{ MaxKeys, MaxBytes int }

// GetState reads one key; ErrNotFound when missing.
func (s *Store) GetState(ctx context.Context, meshID, key string) (StateEntry, error) {
	r, err := s.q.GetState(ctx, db.GetStateParams{MeshID: meshID, Key: key})
	if err = notFound(err); err != nil {
		if errors.Is(err, ErrNotFound) {
			return StateEntry{}, err
		}
		return StateEntry{}, fmt.Errorf("get state: %w", err)
	}
	return StateEntry{Key: r.Key, Value: r.Value, UpdatedBy: r.UpdatedBy, UpdatedAt: r.UpdatedAt}, nil
}

// ListState lists a mesh's keys in order, at most maxKeys.
func (s *Store) ListState(ctx context.Context, meshID string, maxKeys int) ([]StateEntry, error) {
	rows, err := s.q.ListState(ctx, db.ListStateParams{MeshID: meshID, MaxKeys: int32(maxKeys)})
	if err != nil {
		return nil, fmt.Errorf("list state: %w", err)
	}
	out := make([]StateEntry, len(rows))
	for i, r := range rows {
		out[i] = StateEntry{Key: r.Key, Value: r.Value, UpdatedBy: r.UpdatedBy, UpdatedAt: r.UpdatedAt, Size: int(r.Size)}
	}
	return out, nil
}
