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

// ApplyStatus applies the status model to one presence: dnd is changed only by the peer
// itself, a hook never touches dnd, and a lower-rank source does not override a fresh
// higher-rank one (fresh: within freshWindow). ok is false when the model refused the change.
func (t *Tx) ApplyStatus(ctx context.Context, presenceID, status, source string, freshWindow time.Duration) (StatusChange, bool, error) {
	r, err := t.q.ApplyStatus(ctx, db.ApplyStatusParams{ID: presenceID, Status: status, Source: source, FreshSeconds: freshWindow.Seconds()})
	switch err = notFound(err); {
	case errors.Is(err, ErrNotFound):
		return StatusChange{}, false, nil
	case err != nil:
		return StatusChange{}, false, fmt.Errorf("apply status: %w", err)
	}
	return StatusChange{r.ID, r.MeshID, r.MemberID, r.MemberPubkey, deref(r.SessionPubkey), r.DisplayName, r.NodeID, r.Status}, true, nil
}

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

// HookTargets resolves a hook's live sessions, cluster-wide.
func (t *Tx) HookTargets(ctx context.Context, h HookQuery) ([]string, error) {
	ids, err := t.q.HookTargets(ctx, db.HookTargetsParams{MemberPubkey: h.MemberPubkey, SessionID: h.SessionID, Pid: int32(h.PID), Cwd: h.CWD})
	if err != nil {
		return nil, fmt.Errorf("resolve hook targets: %w", err)
	}
	return ids, nil
}

// HoldPendingStatus keeps a hook's status for 10 s for a session that has not said hello yet.
func (t *Tx) HoldPendingStatus(ctx context.Context, h HookQuery, status string) error {
	p := db.InsertPendingStatusParams{Cwd: h.CWD, Status: status}
	if h.SessionID != "" {
		p.SessionID = &h.SessionID
	}
	if h.PID != 0 {
		pid := int32(h.PID)
		p.Pid = &pid
	}
	if h.MemberPubkey != "" {
		p.MemberPubkey = &h.MemberPubkey
	}
	if err := t.q.InsertPendingStatus(ctx, p); err != nil {
		return fmt.Errorf("hold pending status: %w", err)
	}
	return nil
}

// DeleteExpired drops stale hook signals and remembered signatures.
func (s *Store) DeleteExpired(ctx context.Context) error {
	if err := s.q.DeleteExpiredPendingStatus(ctx); err != nil {
		return fmt.Errorf("delete expired hook signals: %w", err)
	}
	if _, err := s.q.DeleteExpiredSignatures(ctx); err != nil {
		return fmt.Errorf("delete expired signatures: %w", err)
	}
	return nil
}

// StateQuota bounds a mesh's shared state.
type StateQuota struct{ MaxKeys, MaxBytes int }

// SetState stores a key's value within the mesh's quota; ErrQuotaExceeded when it would pass it.
func (t *Tx) SetState(ctx context.Context, meshID, key string, value json.RawMessage, updatedBy string, q StateQuota) (StateEntry, error) {
	r, err := t.q.SetState(ctx, db.SetStateParams{MeshID: meshID, Key: key, Value: value, UpdatedBy: updatedBy,
		MaxKeys: int64(q.MaxKeys), MaxBytes: int64(q.MaxBytes)})
	switch err = notFound(err); {
	case errors.Is(err, ErrNotFound):
		return StateEntry{}, ErrQuotaExceeded
	case err != nil:
		return StateEntry{}, fmt.Errorf("set state: %w", err)
	}
	return StateEntry{Key: r.Key, Value: r.Value, UpdatedBy: r.UpdatedBy, UpdatedAt: r.UpdatedAt}, nil
}

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
