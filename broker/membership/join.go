package membership

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/protocol"
)

// JoinResult is a successful /join.
type JoinResult struct {
	MeshID   string
	MemberID string
	// AlreadyMember: the key was already a live member; the invite was not used.
	AlreadyMember bool
}

// Join enrolls req.PeerPubkey in the invite's mesh, checking in the order protocol.md gives:
// the payload's signature by its owner_pubkey; the mesh exists, is not archived and has that
// owner key; the invite (found by its exact token) belongs to the mesh and is neither revoked
// nor expired. A key that is already a live member gets its member id back without using the
// invite; a key revoked in the mesh without a live member is refused (member_revoked).
// Otherwise one use is taken atomically under max_uses (so of N concurrent joins on the
// last use exactly one wins) and the member is inserted with the payload's role, audited in the
// same transaction. Refusals are *JoinError; other errors are failures of the broker.
func (s *Service) Join(ctx context.Context, req protocol.JoinRequest) (JoinResult, error) {
	p := &req.InvitePayload
	if err := protocol.VerifyInvite(p); err != nil {
		return JoinResult{}, joinError(protocol.JoinErrInviteBadSignature)
	}
	peer, err := protocol.NormalizePubkey(req.PeerPubkey)
	if err != nil {
		return JoinResult{}, fmt.Errorf("join: peer_pubkey: %w", ErrInvalidPubkey)
	}

	var res JoinResult
	var lostRace bool
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := db.New(tx)
		m, err := q.MeshByID(ctx, p.MeshID)
		if err = db.NotFound(err); errors.Is(err, db.ErrNotFound) {
			return joinError(protocol.JoinErrMeshNotFound)
		} else if err != nil {
			return err
		}
		switch {
		case m.ArchivedAt != nil:
			return joinError(protocol.JoinErrMeshNotFound)
		case m.OwnerPubkey == "":
			return joinError(protocol.JoinErrMeshMissingOwnerKey)
		case !strings.EqualFold(m.OwnerPubkey, p.OwnerPubkey):
			return joinError(protocol.JoinErrInviteOwnerMismatch)
		}
		row, err := q.InviteByToken(ctx, tokenHash(req.InviteToken))
		if err = db.NotFound(err); errors.Is(err, db.ErrNotFound) {
			return joinError(protocol.JoinErrInviteNotFound)
		} else if err != nil {
			return err
		}
		inv := row.ClaudemeshInvite
		switch {
		case inv.MeshID != m.ID:
			return joinError(protocol.JoinErrInviteMeshMismatch)
		case !payloadOfInvite(inv.Payload, p):
			return joinError(protocol.JoinErrInvitePayloadMismatch)
		case inv.RevokedAt != nil:
			return joinError(protocol.JoinErrInviteRevoked)
		case row.Expired:
			return joinError(protocol.JoinErrInviteExpired)
		}
		existing, err := q.MemberLiveByPubkey(ctx, db.MemberLiveByPubkeyParams{MeshID: m.ID, Pubkey: peer})
		if err == nil {
			res = JoinResult{MeshID: m.ID, MemberID: existing.ID, AlreadyMember: true}
			return nil
		} else if err = db.NotFound(err); !errors.Is(err, db.ErrNotFound) {
			return err
		}
		// A revoked key is kept out: else a banned member (or a compromised key the operator
		// revoked) joins again with any invite it still holds, and the unban rules (00052: who
		// may lift whose revocation) mean nothing. Readmitting is an unban or `member add`.
		if by, err := q.MemberRevokedByPubkey(ctx, db.MemberRevokedByPubkeyParams{MeshID: m.ID, Pubkey: peer}); err == nil {
			s.refusals.Info("join refused: the key was revoked in the mesh", "mesh", m.ID, "pubkey", peer,
				"revoked_by", derefOr(by, "unknown"))
			return joinError(protocol.JoinErrMemberRevoked)
		} else if err = db.NotFound(err); !errors.Is(err, db.ErrNotFound) {
			return err
		}

		// A session key, shown to every member by list_peers, is not a member key to be taken:
		// the new member would receive the direct sends meant for that session.
		if bound, err := q.SessionKeyBound(ctx, db.SessionKeyBoundParams{MeshID: m.ID, Pubkey: peer}); err != nil {
			return err
		} else if bound {
			s.refusals.Info("join refused: the key is a session key in the mesh", "mesh", m.ID, "pubkey", peer)
			return joinError(protocol.JoinErrMemberInsertFailed)
		}
		if _, err := q.InviteClaim(ctx, inv.ID); err != nil {
			if err = db.NotFound(err); !errors.Is(err, db.ErrNotFound) {
				return err
			}
			// The claim's WHERE failed: say which condition, as seen after the row lock.
			now, err := q.InviteByToken(ctx, tokenHash(req.InviteToken))
			switch {
			case err != nil:
				return err
			case now.ClaudemeshInvite.RevokedAt != nil:
				return joinError(protocol.JoinErrInviteRevoked)
			case now.Expired:
				return joinError(protocol.JoinErrInviteExpired)
			}
			// Used up, maybe by this key's own join that held the row (a retry of a join still
			// in flight): committed before the lock was released, so this statement sees it.
			mb, err := q.MemberLiveByPubkey(ctx, db.MemberLiveByPubkeyParams{MeshID: m.ID, Pubkey: peer})
			if err == nil {
				res = JoinResult{MeshID: m.ID, MemberID: mb.ID, AlreadyMember: true}
				return nil
			} else if err = db.NotFound(err); !errors.Is(err, db.ErrNotFound) {
				return err
			}
			return joinError(protocol.JoinErrInviteExhausted)
		}
		mb, err := q.MemberInsert(ctx, db.MemberInsertParams{
			MeshID: m.ID, Pubkey: peer, DisplayName: req.DisplayName, Role: inv.Role, InviteID: &inv.ID,
		})
		if err != nil {
			// The same key joining concurrently wins the unique index; rolling back returns
			// the use this attempt took, and the caller is then told it is a member.
			if lostRace = isUniqueViolation(err); !lostRace {
				s.log.Warn("join: member insert failed", "mesh", m.ID, "pubkey", peer, "err", err)
			}
			return joinError(protocol.JoinErrMemberInsertFailed)
		}
		res = JoinResult{MeshID: m.ID, MemberID: mb.ID}
		return audit.Append(ctx, tx, []audit.Entry{{MeshID: m.ID, Type: audit.MemberJoined, Actor: peer, At: mb.CreatedAt,
			Data: map[string]any{"member_id": mb.ID, "pubkey": peer, "invite_id": inv.ID, "role": mb.Role}}})
	})
	if lostRace {
		mb, lookupErr := db.New(s.pool).MemberLiveByPubkey(ctx, db.MemberLiveByPubkeyParams{MeshID: p.MeshID, Pubkey: peer})
		if lookupErr == nil {
			return JoinResult{MeshID: mb.MeshID, MemberID: mb.ID, AlreadyMember: true}, nil
		}
	}
	if err != nil {
		var je *JoinError
		if errors.As(err, &je) {
			return JoinResult{}, err
		}
		return JoinResult{}, fmt.Errorf("join: %w", err)
	}
	return res, nil
}

func derefOr(s *string, def string) string {
	if s == nil {
		return def
	}
	return *s
}

// payloadOfInvite reports whether p (whose signature was verified) is the payload the invite
// was created with: every field stored with the invite (all but the mesh root key, which never
// reaches the database) must match, keys case-insensitively. So a token can't be combined with
// another invite's payload (a member token with an admin payload, a live token with an expired
// payload).
func payloadOfInvite(stored []byte, p *protocol.InvitePayload) bool {
	var o protocol.InvitePayload
	if err := json.Unmarshal(stored, &o); err != nil {
		return false
	}
	return o.V == p.V && o.MeshID == p.MeshID && o.MeshSlug == p.MeshSlug && o.BrokerURL == p.BrokerURL &&
		o.ExpiresAt == p.ExpiresAt && o.Role == p.Role && strings.EqualFold(o.OwnerPubkey, p.OwnerPubkey)
}

// JoinBounds bounds what POST /join can make a replica do. Anyone can sign an invite payload
// with a key of their own for a mesh id of their choosing: it passes every check made before
// the database, so without bounds a flood of them takes the pool from sends and hellos.
type JoinBounds interface {
	// Allow is asked first, before the body is read: false refuses the request 429. source
	// names the client the limit is keyed by, for the logs.
	Allow(r *http.Request) (source string, ok bool)
	// Acquire takes one of the few slots /join statements run in, waiting within ctx and a
	// bound of its own: false refuses the request 503 (retryable). Release gives it back.
	Acquire(ctx context.Context) bool
	Release()
}

// Outcomes of POST /join, counted through Config.CountJoin: a fixed set, whatever clients send.
const (
	JoinOutcomeOK          = "ok"           // joined, or already a member
	JoinOutcomeBadRequest  = "bad_request"  // not a POST, an unreadable or malformed body, a bad peer_pubkey
	JoinOutcomeTooLarge    = "too_large"    // a body over protocol.MaxJoinBodyBytes
	JoinOutcomeRefused     = "refused"      // a protocol refusal (bad signature, no such mesh or invite, expired...)
	JoinOutcomeRateLimited = "rate_limited" // JoinBounds.Allow refused the client
	JoinOutcomeBusy        = "busy"         // no statement slot in time
	JoinOutcomeInternal    = "internal"     // the broker failed, usually Postgres
)

// JoinOutcomes lists every outcome, for a metric to show each from the start.
var JoinOutcomes = []string{JoinOutcomeOK, JoinOutcomeBadRequest, JoinOutcomeTooLarge, JoinOutcomeRefused,
	JoinOutcomeRateLimited, JoinOutcomeBusy, JoinOutcomeInternal}

// joinTimeout bounds a join's statements. They run detached from the request: a client hanging
// up mid-join is no failure of the broker's, and its join, once started, completes or rolls back.
const joinTimeout = 5 * time.Second

// HandleJoin serves POST /join: 200 {ok:true, memberId, alreadyMember?}, 400 {ok:false, error}
// with a protocol code or, for a malformed body, a message naming the field, 413 for a body
// over protocol.MaxJoinBodyBytes, 500 {ok:false, error:"internal error"} when the broker fails.
// With JoinBounds: 429 for a client over its rate, checked before the body is read, and 503
// with Retry-After when no statement slot is free in time. Refusals are logged through
// Config.Refusals, and so are joins of a key that is already a member. The body carries the mesh root key, so neither it nor the token is ever
// logged.
func (s *Service) HandleJoin(w http.ResponseWriter, r *http.Request) {
	source := r.RemoteAddr
	if s.bounds != nil {
		var ok bool
		if source, ok = s.bounds.Allow(r); !ok {
			s.refusals.Info("join refused: rate limited", "source", source)
			s.joinFail(w, http.StatusTooManyRequests, JoinOutcomeRateLimited,
				"rate limited: too many join requests from this address; retry in a few seconds")
			return
		}
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		s.joinFail(w, http.StatusMethodNotAllowed, JoinOutcomeBadRequest, "method not allowed")
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, protocol.MaxJoinBodyBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			s.refusals.Info("join: body too large", "source", source, "limit", tooLarge.Limit)
			s.joinFail(w, http.StatusRequestEntityTooLarge, JoinOutcomeTooLarge, "payload too large")
			return
		}
		s.refusals.Info("join: read body", "source", source, "err", err)
		s.joinFail(w, http.StatusBadRequest, JoinOutcomeBadRequest, "could not read body")
		return
	}
	req, err := protocol.ParseJoinRequest(body)
	if err != nil {
		msg := err.Error()
		var pe *protocol.Error
		if errors.As(err, &pe) {
			msg = pe.Message
		}
		s.refusals.Info("join: bad request", "source", source, "reason", msg)
		s.joinFail(w, http.StatusBadRequest, JoinOutcomeBadRequest, msg)
		return
	}
	if s.bounds != nil {
		// Detached as the join is: a client that hangs up while it waits for a slot is not the
		// replica busy, and its join still completes (bounded by the slots' own wait).
		if !s.bounds.Acquire(context.WithoutCancel(r.Context())) {
			s.refusals.Info("join refused: too many in flight", "source", source)
			w.Header().Set("Retry-After", "1")
			s.joinFail(w, http.StatusServiceUnavailable, JoinOutcomeBusy,
				"broker busy: too many join requests in flight; retry in a second")
			return
		}
		defer s.bounds.Release()
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), joinTimeout)
	defer cancel()
	res, err := s.Join(ctx, req)
	var je *JoinError
	switch {
	case errors.As(err, &je):
		s.refusals.Info("join refused", "code", je.Code, "mesh", req.InvitePayload.MeshID,
			"pubkey", req.PeerPubkey, "source", source)
		s.joinFail(w, http.StatusBadRequest, JoinOutcomeRefused, je.Code)
	case errors.Is(err, ErrInvalidPubkey):
		const msg = "peer_pubkey: must be 64 hex characters"
		s.refusals.Info("join: bad request", "source", source, "reason", msg)
		s.joinFail(w, http.StatusBadRequest, JoinOutcomeBadRequest, msg)
	case err != nil:
		s.log.Error("join failed", "mesh", req.InvitePayload.MeshID, "pubkey", req.PeerPubkey, "err", err)
		s.joinFail(w, http.StatusInternalServerError, JoinOutcomeInternal, "internal error")
	default:
		// A join that changed nothing can be repeated at will (any member's key, any invite of
		// the mesh not yet expired): sampled, as refusals are. One that enrolled is always told.
		log := s.log.Info
		if res.AlreadyMember {
			log = s.refusals.Info
		}
		log("join", "mesh", res.MeshID, "member", res.MemberID, "pubkey", req.PeerPubkey,
			"already_member", res.AlreadyMember)
		s.countJoin(JoinOutcomeOK)
		writeJoin(w, http.StatusOK, protocol.JoinResponse{OK: true, MemberID: res.MemberID, AlreadyMember: res.AlreadyMember})
	}
}

// joinFail counts a /join that did not succeed under outcome and answers it {ok:false, error}.
func (s *Service) joinFail(w http.ResponseWriter, code int, outcome, msg string) {
	s.countJoin(outcome)
	writeJoin(w, code, protocol.JoinResponse{Error: msg})
}

func writeJoin(w http.ResponseWriter, code int, body protocol.JoinResponse) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(body)
}
