package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/claudemesh/broker/db"
)

// The admin operations of today's CLI (kick, disconnect, ban, unban, list_bans), each one
// statement that checks the caller is an admin of the mesh (or its owner's key) first.

// Admin outcomes besides success.
var (
	ErrForbidden = errors.New("only an admin of the mesh may do this")
	ErrBanSelf   = errors.New("cannot ban yourself")
	// ErrAmbiguous: the target (a display name or key prefix) names several members.
	ErrAmbiguous = errors.New("several members match")
	// ErrProtected: the owner's key, or an admin when the caller is not the owner; for an
	// unban, a ban by the owner or of an admin when the caller is not the owner, or an
	// operator's revocation.
	ErrProtected = errors.New("member is protected")
)

// Caller is the session running an admin operation.
type Caller struct {
	MeshID, MemberID, PresenceID string
	Actor                        string // its key, for the audit entries
}

// KickParams select the sessions to close: by Target (a display name, a member or session
// key, a member-key prefix of at least 8 characters), those in their grace for longer than
// Stale, or All (but the caller's). SkipControlPlane leaves control-plane connections alone.
type KickParams struct {
	Target           string
	Stale            time.Duration
	All              bool
	SkipControlPlane bool
	CloseCode        int
	CloseReason      string
}

// KickResult names the sessions closed and those skipped (control-plane).
type KickResult struct {
	Closed, Skipped []string
}

// Kick ends the matched presences at once (peer_left, what they held pending again, an audit
// entry each) and closes their sockets on whichever replica holds them.
func (s *Store) Kick(ctx context.Context, c Caller, p KickParams) (KickResult, error) {
	rows, err := s.q.Kick(ctx, db.KickParams{Ns: s.ns, MeshID: c.MeshID, CallerMember: c.MemberID,
		CallerPresence: c.PresenceID, Actor: c.Actor, Target: p.Target, StaleMs: p.Stale.Milliseconds(),
		AllSessions: p.All, SkipControl: p.SkipControlPlane, CloseCode: int32(p.CloseCode), CloseReason: p.CloseReason})
	if err != nil {
		return KickResult{}, fmt.Errorf("kick: %w", err)
	}
	var out KickResult
	for _, r := range rows {
		switch {
		case r.Code == "forbidden":
			return KickResult{}, ErrForbidden
		case r.Code != "match":
		case r.Skipped:
			out.Skipped = append(out.Skipped, r.Name)
		default:
			out.Closed = append(out.Closed, r.Name)
		}
	}
	return out, nil
}

// Ban revokes the live member matched by target (display name, key, or a key prefix of at
// least 8 characters), ends its presences and closes their sockets with 4002, and audits it.
// It returns the member's display name; ErrNotFound, ErrForbidden or ErrBanSelf otherwise.
func (s *Store) Ban(ctx context.Context, c Caller, target string) (string, error) {
	r, err := s.q.Ban(ctx, db.BanParams{Ns: s.ns, MeshID: c.MeshID, CallerMember: c.MemberID, Actor: c.Actor, Target: target})
	if err != nil {
		return "", fmt.Errorf("ban: %w", err)
	}
	return r.Name, adminCode(r.Code)
}

// Unban restores the revoked member matched by target (display name or key) and audits it.
func (s *Store) Unban(ctx context.Context, c Caller, target string) (string, error) {
	r, err := s.q.Unban(ctx, db.UnbanParams{MeshID: c.MeshID, CallerMember: c.MemberID, Actor: c.Actor, Target: target})
	if err != nil {
		return "", fmt.Errorf("unban: %w", err)
	}
	return r.Name, adminCode(r.Code)
}

// Ban is a revoked member of a mesh.
type Ban struct {
	Name, Pubkey string
	RevokedAt    time.Time
}

// ListBans returns up to limit revoked keys of the mesh that have no live member again,
// latest revocation first.
func (s *Store) ListBans(ctx context.Context, c Caller, limit int) ([]Ban, error) {
	rows, err := s.q.ListBans(ctx, db.ListBansParams{MeshID: c.MeshID, CallerMember: c.MemberID, MaxRows: int32(limit)})
	if err != nil {
		return nil, fmt.Errorf("list bans: %w", err)
	}
	out := []Ban{}
	for _, r := range rows {
		if err := adminCode(r.Code); err != nil {
			return nil, err
		}
		if r.Code == "ban" {
			out = append(out, Ban{Name: r.Name, Pubkey: r.Pubkey, RevokedAt: r.RevokedAt})
		}
	}
	return out, nil
}

func adminCode(code string) error {
	switch code {
	case "forbidden":
		return ErrForbidden
	case "not_found":
		return ErrNotFound
	case "self":
		return ErrBanSelf
	case "ambiguous":
		return ErrAmbiguous
	case "protected":
		return ErrProtected
	}
	return nil
}

// ClientMessageRace reports whether a send batch failed because of another one storing the
// same client_message_id (a retry racing its first attempt on another replica): a unique
// violation, or a deadlock when two batches hold each other's ids. Run again, the batch folds
// the send into the envelope stored first.
func ClientMessageRace(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	return (pgErr.Code == "23505" && pgErr.ConstraintName == "envelope_client_message") || pgErr.Code == "40P01"
}
