// Package membership owns who may connect: meshes, their members, invites and POST /join, and
// the owner key file that holds a mesh's secrets on the operator's machine. Every change is
// recorded in the mesh's audit chain in the same transaction as the change itself.
//
// Invite tokens are bearer credentials that also carry the mesh root key, so the database keeps
// neither: invite.token holds the sha256 of the token (a /join still finds its invite by the
// exact token) and invite.payload holds the signed payload with mesh_root_key blanked.
package membership

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// Defaults of CreateInvite.
const (
	DefaultInviteUses = 1
	DefaultInviteTTL  = 24 * time.Hour
	// DefaultOwnerName is the owner member's display name when none is given.
	DefaultOwnerName = "owner"

	maxTokenAttempts = 100
)

// Config configures a Service; zero values mean the defaults.
type Config struct {
	// Logger receives /join refusals and failures; nil discards.
	Logger *slog.Logger
	// BusNamespace is the replicas' notification namespace (BUS_NAMESPACE; "" means the
	// default): a revocation's statement tells the replicas holding the member's sessions to
	// close them, with its commit or not at all.
	BusNamespace string
	// Now is the clock invites are dated by; nil means time.Now.
	Now func() time.Time
	// Refusals receives the /join lines a client can cause at will (a malformed or oversized
	// body, a refused invite, a limit reached, a join of a key already a member); nil means
	// Logger. The broker passes its sampled logger, so a flood can neither fill the disk nor
	// drown other lines.
	Refusals InfoLogger
	// JoinBounds bounds what POST /join can make a replica do; nil bounds nothing (tests, tools).
	JoinBounds JoinBounds
	// CountJoin counts every POST /join once, under one of JoinOutcomes; nil counts nothing.
	CountJoin func(outcome string)
}

// InfoLogger is where refusals are logged: a *slog.Logger, or a sampled logger in front of one.
type InfoLogger interface {
	Info(msg string, args ...any)
}

// Service runs membership operations against the database.
type Service struct {
	pool      *pgxpool.Pool
	log       *slog.Logger
	refusals  InfoLogger
	bounds    JoinBounds
	countJoin func(outcome string)
	busNS     string
	now       func() time.Time
}

// New returns a Service on pool. It does no I/O.
func New(pool *pgxpool.Pool, cfg Config) *Service {
	s := &Service{pool: pool, log: cfg.Logger, refusals: cfg.Refusals, bounds: cfg.JoinBounds, countJoin: cfg.CountJoin,
		busNS: cfg.BusNamespace, now: cfg.Now}
	if s.busNS == "" {
		s.busNS = pgbus.DefaultNamespace
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.refusals == nil {
		s.refusals = s.log
	}
	if s.countJoin == nil {
		s.countJoin = func(string) {}
	}
	if s.now == nil {
		s.now = time.Now
	}
	return s
}

// Mesh is a mesh as the admin verbs show it.
type Mesh struct {
	ID          string     `json:"id"`
	Slug        string     `json:"slug"`
	Name        string     `json:"name"`
	OwnerPubkey string     `json:"ownerPubkey"`
	MaxPeers    int        `json:"maxPeers"` // 0: the broker's MAX_CONNECTIONS_PER_MESH
	CreatedAt   time.Time  `json:"createdAt"`
	ArchivedAt  *time.Time `json:"archivedAt,omitempty"`
	// LiveMembers is filled by Meshes only.
	LiveMembers int `json:"liveMembers"`
}

// Member is a mesh member.
type Member struct {
	ID          string     `json:"id"`
	MeshID      string     `json:"meshId"`
	Pubkey      string     `json:"pubkey"`
	DisplayName string     `json:"displayName"`
	Role        string     `json:"role"`
	InviteID    string     `json:"inviteId,omitempty"`
	CreatedAt   time.Time  `json:"createdAt"`
	RevokedAt   *time.Time `json:"revokedAt,omitempty"`
}

// Invite is a stored invite. Token and Link are known only to CreateInvite's caller: the
// database keeps a hash of the token.
type Invite struct {
	ID        string     `json:"id"`
	MeshID    string     `json:"meshId"`
	MeshSlug  string     `json:"meshSlug,omitempty"`
	Role      string     `json:"role"`
	MaxUses   int        `json:"maxUses"`
	UsedCount int        `json:"usedCount"`
	ExpiresAt time.Time  `json:"expiresAt"`
	CreatedAt time.Time  `json:"createdAt"`
	RevokedAt *time.Time `json:"revokedAt,omitempty"`
	Token     string     `json:"token,omitempty"`
	Link      string     `json:"link,omitempty"`
}

func meshFromDB(m db.ClaudemeshMesh) Mesh {
	return Mesh{ID: m.ID, Slug: m.Slug, Name: m.Name, OwnerPubkey: m.OwnerPubkey, MaxPeers: int(m.MaxPeers),
		CreatedAt: m.CreatedAt, ArchivedAt: m.ArchivedAt}
}

func memberFromDB(m db.ClaudemeshMember) Member {
	out := Member{ID: m.ID, MeshID: m.MeshID, Pubkey: m.Pubkey, DisplayName: m.DisplayName, Role: m.Role,
		CreatedAt: m.CreatedAt, RevokedAt: m.RevokedAt}
	if m.InviteID != nil {
		out.InviteID = *m.InviteID
	}
	return out
}

func inviteFromDB(i db.ClaudemeshInvite) Invite {
	return Invite{ID: i.ID, MeshID: i.MeshID, Role: i.Role, MaxUses: int(i.MaxUses), UsedCount: int(i.UsedCount),
		ExpiresAt: i.ExpiresAt, CreatedAt: i.CreatedAt, RevokedAt: i.RevokedAt}
}

// slugRe is the schema's CHECK on mesh.slug, checked here first for a readable error.
var slugRe = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// CreateMeshParams describes a new mesh.
type CreateMeshParams struct {
	Slug string
	Name string // empty: the slug
	// OwnerPubkey is the owner's ed25519 public key (hex); the owner becomes an admin member.
	OwnerPubkey string
	OwnerName   string // the owner member's display name; empty: DefaultOwnerName
	MaxPeers    int    // 0: the broker's MAX_CONNECTIONS_PER_MESH
}

// CheckSlug returns ErrInvalidSlug unless slug is a valid mesh slug.
func CheckSlug(slug string) error {
	if !slugRe.MatchString(slug) {
		return ErrInvalidSlug
	}
	return nil
}

// CreateMesh registers a mesh with its owner as an admin member.
func (s *Service) CreateMesh(ctx context.Context, p CreateMeshParams) (Mesh, Member, error) {
	if err := CheckSlug(p.Slug); err != nil {
		return Mesh{}, Member{}, fmt.Errorf("create mesh: %w", err)
	}
	owner, err := protocol.NormalizePubkey(p.OwnerPubkey)
	if err != nil {
		return Mesh{}, Member{}, fmt.Errorf("create mesh: owner key: %w", ErrInvalidPubkey)
	}
	if p.MaxPeers < 0 || p.MaxPeers > 1<<30 {
		return Mesh{}, Member{}, fmt.Errorf("create mesh: max peers must be between 0 and %d", 1<<30)
	}
	if p.Name == "" {
		p.Name = p.Slug
	}
	if p.OwnerName == "" {
		p.OwnerName = DefaultOwnerName
	}
	var mesh Mesh
	var member Member
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := db.New(tx)
		m, err := q.MeshInsert(ctx, db.MeshInsertParams{Slug: p.Slug, Name: p.Name, OwnerPubkey: owner, MaxPeers: int32(p.MaxPeers)})
		if isUniqueViolation(err) {
			return ErrMeshExists
		}
		if err != nil {
			return err
		}
		mb, err := q.MemberInsert(ctx, db.MemberInsertParams{MeshID: m.ID, Pubkey: owner, DisplayName: p.OwnerName, Role: protocol.RoleAdmin})
		if err != nil {
			return err
		}
		mesh, member = meshFromDB(m), memberFromDB(mb)
		return audit.Append(ctx, tx, []audit.Entry{
			{MeshID: m.ID, Type: audit.MeshCreated, Actor: audit.ActorOperator, At: m.CreatedAt,
				Data: map[string]any{"slug": m.Slug, "name": m.Name, "owner_pubkey": owner, "max_peers": p.MaxPeers}},
			{MeshID: m.ID, Type: audit.MemberAdded, Actor: audit.ActorOperator, At: mb.CreatedAt,
				Data: map[string]any{"member_id": mb.ID, "pubkey": owner, "role": mb.Role, "display_name": mb.DisplayName}},
		})
	})
	if err != nil {
		return Mesh{}, Member{}, fmt.Errorf("create mesh: %w", err)
	}
	return mesh, member, nil
}

// Meshes lists every mesh, oldest first, with its live member count.
func (s *Service) Meshes(ctx context.Context) ([]Mesh, error) {
	rows, err := db.New(s.pool).MeshList(ctx)
	if err != nil {
		return nil, fmt.Errorf("list meshes: %w", err)
	}
	out := make([]Mesh, len(rows))
	for i, r := range rows {
		out[i] = Mesh{ID: r.ID, Slug: r.Slug, Name: r.Name, OwnerPubkey: r.OwnerPubkey, MaxPeers: int(r.MaxPeers),
			CreatedAt: r.CreatedAt, ArchivedAt: r.ArchivedAt, LiveMembers: int(r.LiveMembers)}
	}
	return out, nil
}

// Mesh finds a mesh by slug or id.
func (s *Service) Mesh(ctx context.Context, ref string) (Mesh, error) {
	m, err := findMesh(ctx, db.New(s.pool), ref)
	if err != nil {
		return Mesh{}, fmt.Errorf("find mesh: %w", err)
	}
	return meshFromDB(m), nil
}

// findMesh resolves a slug, or failing that an id, to a mesh.
func findMesh(ctx context.Context, q *db.Queries, ref string) (db.ClaudemeshMesh, error) {
	m, err := q.MeshBySlug(ctx, ref)
	if errors.Is(db.NotFound(err), db.ErrNotFound) {
		m, err = q.MeshByID(ctx, ref)
	}
	if err = db.NotFound(err); errors.Is(err, db.ErrNotFound) {
		return m, fmt.Errorf("%w: %q", ErrMeshNotFound, ref)
	}
	return m, err
}

// CreateInviteParams describes a new invite.
type CreateInviteParams struct {
	Mesh string // slug or id
	// Key is the mesh's owner key: it signs the payload and supplies the mesh root key.
	Key     *OwnerKey
	MaxUses int           // 0: DefaultInviteUses
	TTL     time.Duration // 0: DefaultInviteTTL
	Role    string        // "": member
	// BrokerURL is where joiners connect (ws:// or wss://, the /ws endpoint); it is signed into
	// the payload.
	BrokerURL string
}

// CreateInvite signs an invite payload with the owner key, stores the invite and returns it
// with its token and ic://join/ link.
func (s *Service) CreateInvite(ctx context.Context, p CreateInviteParams) (Invite, error) {
	if p.Key == nil {
		return Invite{}, fmt.Errorf("create invite: %w: no owner key", ErrInvalidInvite)
	}
	if p.MaxUses == 0 {
		p.MaxUses = DefaultInviteUses
	}
	if p.TTL == 0 {
		p.TTL = DefaultInviteTTL
	}
	if p.Role == "" {
		p.Role = protocol.RoleMember
	}
	switch {
	case p.MaxUses < 0 || p.MaxUses > 1<<30:
		return Invite{}, fmt.Errorf("create invite: %w: uses must be between 1 and %d", ErrInvalidInvite, 1<<30)
	case p.TTL < time.Second:
		return Invite{}, fmt.Errorf("create invite: %w: expiry must be at least 1s", ErrInvalidInvite)
	case p.Role != protocol.RoleAdmin && p.Role != protocol.RoleMember:
		return Invite{}, fmt.Errorf("create invite: %w", ErrInvalidRole)
	}
	if err := checkBrokerURL(p.BrokerURL); err != nil {
		return Invite{}, fmt.Errorf("create invite: %w: broker URL: %v", ErrInvalidInvite, err)
	}

	var out Invite
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := db.New(tx)
		m, err := findMesh(ctx, q, p.Mesh)
		if err != nil {
			return err
		}
		if m.ArchivedAt != nil {
			return ErrMeshArchived
		}
		if !strings.EqualFold(m.OwnerPubkey, p.Key.Pubkey()) {
			return fmt.Errorf("%w (mesh %s is owned by %s, %s holds %s)", ErrOwnerKeyMismatch, m.Slug, m.OwnerPubkey, p.Key.Path, p.Key.Pubkey())
		}
		// Whole seconds: the payload carries Unix seconds and the row must expire with it.
		expires := s.now().Add(p.TTL).Truncate(time.Second)
		var inv db.ClaudemeshInvite
		var token string
		// The payload has no nonce, so two invites alike in mesh, role, broker URL and expiry
		// second would share a token; the later one then expires a second later instead.
		for attempt := 0; ; attempt++ {
			if attempt == maxTokenAttempts {
				return errors.New("could not find a free invite token")
			}
			payload := protocol.InvitePayload{
				V: protocol.InviteVersion, MeshID: m.ID, MeshSlug: m.Slug, BrokerURL: p.BrokerURL,
				ExpiresAt: expires.Unix(), MeshRootKey: p.Key.MeshRootKey, Role: p.Role,
			}
			if err := protocol.SignInvite(p.Key.PrivateKey, &payload); err != nil {
				return err
			}
			if token, err = protocol.EncodeInviteToken(&payload); err != nil {
				return err
			}
			stored := payload
			stored.MeshRootKey = ""
			storedJSON, err := json.Marshal(stored)
			if err != nil {
				return err
			}
			inv, err = q.InviteInsert(ctx, db.InviteInsertParams{
				MeshID: m.ID, Token: tokenHash(token), Payload: storedJSON, Role: p.Role,
				MaxUses: int32(p.MaxUses), ExpiresAt: expires,
			})
			if err = db.NotFound(err); err == nil {
				break
			} else if !errors.Is(err, db.ErrNotFound) {
				return err
			}
			expires = expires.Add(time.Second)
		}
		out = inviteFromDB(inv)
		out.MeshSlug, out.Token, out.Link = m.Slug, token, protocol.InviteLink(token)
		// Never the token: it is a bearer credential and carries the mesh root key.
		return audit.Append(ctx, tx, []audit.Entry{{MeshID: m.ID, Type: audit.InviteCreated, Actor: audit.ActorOperator, At: inv.CreatedAt,
			Data: map[string]any{"invite_id": inv.ID, "role": inv.Role, "max_uses": p.MaxUses, "expires_at": inv.ExpiresAt.Unix()}}})
	})
	if err != nil {
		return Invite{}, fmt.Errorf("create invite: %w", err)
	}
	return out, nil
}

func checkBrokerURL(s string) error {
	if s == "" {
		return errors.New("required")
	}
	u, err := url.Parse(s)
	if err != nil {
		return err
	}
	switch u.Scheme {
	case "ws", "wss", "http", "https":
	default:
		return fmt.Errorf("scheme %q: want ws://, wss://, http:// or https://", u.Scheme)
	}
	if u.Host == "" {
		return errors.New("no host")
	}
	return nil
}

// tokenHash is what invite.token stores and /join looks up: lowercase hex sha256 of the exact
// token string.
func tokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// RevokeInvite revokes an invite named by its id, its token or its ic://join/ link. Revoking
// a revoked invite returns ErrInviteRevoked.
func (s *Service) RevokeInvite(ctx context.Context, ref string) (Invite, error) {
	ref = strings.TrimSpace(ref)
	hash := tokenHash(strings.TrimPrefix(ref, protocol.InviteLinkPrefix))
	var out Invite
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := db.New(tx)
		inv, err := q.InviteForUpdate(ctx, db.InviteForUpdateParams{Token: &hash, ID: &ref})
		if err = db.NotFound(err); errors.Is(err, db.ErrNotFound) {
			return ErrInviteNotFound
		} else if err != nil {
			return err
		}
		if inv.RevokedAt != nil {
			out = inviteFromDB(inv)
			return ErrInviteRevoked
		}
		if inv, err = q.InviteRevoke(ctx, inv.ID); err != nil {
			return err
		}
		out = inviteFromDB(inv)
		return audit.Append(ctx, tx, []audit.Entry{{MeshID: inv.MeshID, Type: audit.InviteRevoked, Actor: audit.ActorOperator,
			At: *inv.RevokedAt, Data: map[string]any{"invite_id": inv.ID, "used_count": int(inv.UsedCount)}}})
	})
	if err != nil {
		return out, fmt.Errorf("revoke invite: %w", err)
	}
	return out, nil
}

// AddMemberParams describes a member added by the operator, without an invite.
type AddMemberParams struct {
	Mesh        string // slug or id
	Pubkey      string // hex, any case
	DisplayName string
	Role        string // "": member
}

// AddMember adds a live member directly (the operator's shortcut past invites).
func (s *Service) AddMember(ctx context.Context, p AddMemberParams) (Member, error) {
	pub, err := protocol.NormalizePubkey(p.Pubkey)
	if err != nil {
		return Member{}, fmt.Errorf("add member: %w", ErrInvalidPubkey)
	}
	if p.Role == "" {
		p.Role = protocol.RoleMember
	}
	if p.Role != protocol.RoleAdmin && p.Role != protocol.RoleMember {
		return Member{}, fmt.Errorf("add member: %w", ErrInvalidRole)
	}
	if len(p.DisplayName) > protocol.MaxDisplayNameLen {
		return Member{}, fmt.Errorf("add member: display name longer than %d bytes", protocol.MaxDisplayNameLen)
	}
	var out Member
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := db.New(tx)
		m, err := findMesh(ctx, q, p.Mesh)
		if err != nil {
			return err
		}
		if m.ArchivedAt != nil {
			return ErrMeshArchived
		}
		// As /join refuses it: a direct send to the key would reach the new member, not the
		// session (a member key is resolved first).
		if bound, err := q.SessionKeyBound(ctx, db.SessionKeyBoundParams{MeshID: m.ID, Pubkey: pub}); err != nil {
			return err
		} else if bound {
			return ErrKeyIsSessionKey
		}
		mb, err := q.MemberInsert(ctx, db.MemberInsertParams{MeshID: m.ID, Pubkey: pub, DisplayName: p.DisplayName, Role: p.Role})
		if isUniqueViolation(err) {
			return ErrMemberExists
		}
		if err != nil {
			return err
		}
		// A revoked key added again is the same member: the session keys it used are still its.
		if err := q.SessionKeysReadmit(ctx, db.SessionKeysReadmitParams{MemberID: mb.ID, MeshID: m.ID, Pubkey: pub}); err != nil {
			return err
		}
		out = memberFromDB(mb)
		return audit.Append(ctx, tx, []audit.Entry{{MeshID: m.ID, Type: audit.MemberAdded, Actor: audit.ActorOperator, At: mb.CreatedAt,
			Data: map[string]any{"member_id": mb.ID, "pubkey": pub, "role": mb.Role, "display_name": mb.DisplayName}}})
	})
	if err != nil {
		return Member{}, fmt.Errorf("add member: %w", err)
	}
	return out, nil
}

// Members lists a mesh's members, revoked ones included, oldest first.
func (s *Service) Members(ctx context.Context, mesh string) ([]Member, error) {
	q := db.New(s.pool)
	m, err := findMesh(ctx, q, mesh)
	if err != nil {
		return nil, fmt.Errorf("list members: %w", err)
	}
	rows, err := q.MemberList(ctx, m.ID)
	if err != nil {
		return nil, fmt.Errorf("list members: %w", err)
	}
	out := make([]Member, len(rows))
	for i, r := range rows {
		out[i] = memberFromDB(r)
	}
	return out, nil
}

// RevokeMember revokes the live member with pubkey in mesh, ends its sessions (their replicas
// are told to close them) and audits it, in one statement that holds the mesh's hello lock for
// its server time only; a later hello answers "revoked".
func (s *Service) RevokeMember(ctx context.Context, mesh, pubkey string) (Member, error) {
	pub, err := protocol.NormalizePubkey(pubkey)
	if err != nil {
		return Member{}, fmt.Errorf("revoke member: %w", ErrInvalidPubkey)
	}
	q := db.New(s.pool)
	m, err := findMesh(ctx, q, mesh)
	if err != nil {
		return Member{}, fmt.Errorf("revoke member: %w", err)
	}
	mb, err := q.RevokeMemberInOneStatement(ctx, db.RevokeMemberInOneStatementParams{Ns: s.busNS, MeshID: m.ID, Pubkey: pub})
	if err = db.NotFound(err); errors.Is(err, db.ErrNotFound) {
		return Member{}, fmt.Errorf("revoke member: %w", ErrMemberNotFound)
	} else if err != nil {
		return Member{}, fmt.Errorf("revoke member: %w", err)
	}
	return memberFromDB(mb), nil
}

// isUniqueViolation reports whether err is Postgres's unique_violation.
func isUniqueViolation(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23505"
}
