package membership_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

const testBrokerURL = "ws://127.0.0.1:7900/ws"

type fixture struct {
	t    testing.TB
	ctx  context.Context
	pool *pgxpool.Pool
	svc  *membership.Service
	dir  string
}

func newFixture(t testing.TB, cfg membership.Config) *fixture {
	t.Helper()
	pool := dbtest.Pool(t)
	if cfg.Logger == nil {
		cfg.Logger = dbtest.Logger(t)
	}
	return &fixture{t: t, ctx: dbtest.Context(t), pool: pool, svc: membership.New(pool, cfg), dir: t.TempDir()}
}

// mesh creates a mesh with a fresh owner key file.
func (f *fixture) mesh(slug string) (membership.Mesh, *membership.OwnerKey) {
	f.t.Helper()
	key, created, err := membership.LoadOrCreateOwnerKey(filepath.Join(f.dir, slug+".json"))
	require.NoError(f.t, err)
	require.True(f.t, created)
	m, _, err := f.svc.CreateMesh(f.ctx, membership.CreateMeshParams{Slug: slug, OwnerPubkey: key.Pubkey()})
	require.NoError(f.t, err)
	return m, key
}

func (f *fixture) invite(mesh string, key *membership.OwnerKey, uses int, role string) membership.Invite {
	f.t.Helper()
	inv, err := f.svc.CreateInvite(f.ctx, membership.CreateInviteParams{Mesh: mesh, Key: key, MaxUses: uses, Role: role, BrokerURL: testBrokerURL})
	require.NoError(f.t, err)
	return inv
}

// joinRequest is what a claudemesh peer sends for the link with a fresh key.
func joinRequest(t testing.TB, link, pubkey, name string) protocol.JoinRequest {
	t.Helper()
	token, p, err := protocol.ParseInviteLink(link)
	require.NoError(t, err)
	return protocol.JoinRequest{InviteToken: token, InvitePayload: *p, PeerPubkey: pubkey, DisplayName: name}
}

// joinBody is the JSON body claudemesh's CLI posts to /join: the payload as an object.
func joinBody(t testing.TB, req protocol.JoinRequest) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{
		"invite_token": req.InviteToken, "invite_payload": req.InvitePayload,
		"peer_pubkey": req.PeerPubkey, "display_name": req.DisplayName,
	})
	require.NoError(t, err)
	return b
}

func newPubkey(t testing.TB) string {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	return protocol.PubkeyHex(pub)
}

func (f *fixture) usedCount(inviteID string) int {
	f.t.Helper()
	var n int
	require.NoError(f.t, f.pool.QueryRow(f.ctx, `SELECT used_count FROM claudemesh.invite WHERE id = $1`, inviteID).Scan(&n))
	return n
}

func requireJoinError(t testing.TB, err error, code string) {
	t.Helper()
	var je *membership.JoinError
	require.ErrorAs(t, err, &je)
	require.Equal(t, code, je.Code)
}
