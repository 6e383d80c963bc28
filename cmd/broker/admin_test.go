package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

// runCLI runs the broker command line in-process and returns what it printed on stdout.
func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(io.Discard)
	root.SetArgs(args)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

func mustCLI(t *testing.T, args ...string) string {
	t.Helper()
	out, err := runCLI(t, args...)
	require.NoError(t, err, "broker %s\n%s", strings.Join(args, " "), out)
	return out
}

func cliJSON[T any](t *testing.T, args ...string) T {
	t.Helper()
	out := mustCLI(t, append(args, "--json")...)
	var v T
	require.NoError(t, json.Unmarshal([]byte(out), &v), out)
	return v
}

// The example session of docs/admin.md, end to end against a real database, with /join served
// by the membership handler as the broker mounts it.
func TestAdminSession(t *testing.T) {
	url := dbtest.URL(t)
	t.Setenv("DATABASE_URL", url)
	t.Setenv("LOG_LEVEL", "warn")
	cfgDir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", cfgDir)

	// mesh create: the owner key file is created at the default path, private.
	created := cliJSON[struct {
		Mesh            membership.Mesh   `json:"mesh"`
		Owner           membership.Member `json:"owner"`
		OwnerKeyFile    string            `json:"ownerKeyFile"`
		OwnerKeyCreated bool              `json:"ownerKeyCreated"`
	}](t, "mesh", "create", "--slug", "demo", "--name", "Demo mesh", "--max-peers", "10")
	require.True(t, created.OwnerKeyCreated)
	require.Equal(t, filepath.Join(cfgDir, "claudemesh", "owner-keys", "demo.json"), created.OwnerKeyFile)
	st, err := os.Stat(created.OwnerKeyFile)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	key, err := membership.LoadOwnerKey(created.OwnerKeyFile)
	require.NoError(t, err)
	require.Equal(t, key.Pubkey(), created.Mesh.OwnerPubkey)
	require.Equal(t, protocol.RoleAdmin, created.Owner.Role)

	_, err = runCLI(t, "mesh", "create", "--slug", "demo")
	require.ErrorIs(t, err, membership.ErrMeshExists)

	out := mustCLI(t, "mesh", "list")
	require.Contains(t, out, "SLUG")
	require.Contains(t, out, "demo")
	require.Contains(t, out, "Demo mesh")
	meshes := cliJSON[[]membership.Mesh](t, "mesh", "list")
	require.Len(t, meshes, 1)
	require.Equal(t, 1, meshes[0].LiveMembers)

	// invite create prints a link whose payload is signed by the owner key.
	out = mustCLI(t, "invite", "create", "--mesh", "demo", "--uses", "2", "--expires", "7d", "--broker-url", "wss://broker.example/ws")
	link := strings.SplitN(out, "\n", 2)[0]
	require.True(t, strings.HasPrefix(link, protocol.InviteLinkPrefix), out)
	token, payload, err := protocol.ParseInviteLink(link)
	require.NoError(t, err)
	require.NoError(t, protocol.VerifyInvite(payload))
	require.Equal(t, "wss://broker.example/ws", payload.BrokerURL)
	require.Equal(t, key.MeshRootKey, payload.MeshRootKey)
	require.InDelta(t, time.Now().Add(7*24*time.Hour).Unix(), payload.ExpiresAt, 10)

	// A peer joins with the link's payload; a second /join says alreadyMember.
	pool := dbtest.PoolFor(t, url)
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+protocol.PathJoin, membership.New(pool, membership.Config{Logger: dbtest.Logger(t)}).HandleJoin)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	peer := strings.Repeat("ab", 32)
	body, err := json.Marshal(map[string]any{"invite_token": token, "invite_payload": payload, "peer_pubkey": peer, "display_name": "alice"})
	require.NoError(t, err)
	for i, want := range []string{`"ok":true,"memberId"`, `"alreadyMember":true`} {
		resp, err := http.Post(srv.URL+protocol.PathJoin, "application/json", bytes.NewReader(body))
		require.NoError(t, err)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, "join %d: %s", i, b)
		require.Contains(t, string(b), want)
	}

	members := cliJSON[[]membership.Member](t, "member", "list", "--mesh", "demo")
	require.Len(t, members, 2)
	require.Equal(t, peer, members[1].Pubkey)
	require.Equal(t, "alice", members[1].DisplayName)

	// member add prints the id; revoke; list shows both states.
	carol := strings.Repeat("CD", 32)
	id := strings.TrimSpace(mustCLI(t, "member", "add", "--mesh", "demo", "--pubkey", carol, "--name", "carol", "--role", "admin"))
	require.Len(t, id, 36)
	_, err = runCLI(t, "member", "add", "--mesh", "demo", "--pubkey", carol, "--name", "carol")
	require.ErrorIs(t, err, membership.ErrMemberExists)
	out = mustCLI(t, "member", "revoke", "--mesh", "demo", "--pubkey", carol)
	require.Contains(t, out, id)
	out = mustCLI(t, "member", "list", "--mesh", "demo")
	require.Contains(t, out, "revoked")
	require.Contains(t, out, strings.ToLower(carol))
	// A name chosen by whoever joined can't drive the operator's terminal or fake a row.
	_, err = pool.Exec(context.Background(), `UPDATE claudemesh.member SET display_name = $1 WHERE pubkey = $2`,
		"alice\x1b]0;pwned\x07\nfake\trow", peer)
	require.NoError(t, err)
	out = mustCLI(t, "member", "list", "--mesh", "demo")
	require.Contains(t, out, `alice\x1b]0;pwned\x07\x0afake\x09row`)
	require.NotContains(t, out, "\x1b")

	out = mustCLI(t, "invite", "revoke", "--token", link)
	require.Contains(t, out, "revoked (used 1 of 2)")
	_, err = runCLI(t, "invite", "revoke", "--token", token)
	require.ErrorIs(t, err, membership.ErrInviteRevoked)

	// The audit chain: intact, then broken by editing one row in SQL.
	out = mustCLI(t, "audit", "verify", "--mesh", "demo")
	require.Contains(t, out, "intact: 7 entries", out)
	tail := cliJSON[[]audit.Record](t, "audit", "tail", "--mesh", "demo", "-n", "3")
	require.Len(t, tail, 3)
	require.Equal(t, []string{audit.MemberAdded, audit.MemberRevoked, audit.InviteRevoked}, []string{tail[0].Type, tail[1].Type, tail[2].Type})
	out = mustCLI(t, "audit", "tail", "--mesh", "demo")
	require.Contains(t, out, audit.MemberJoined)
	// Against an anchor (a head a replica logged): still there, then cut off with the head set
	// to match, which only the anchor shows.
	var anchor string
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT seq || ':' || hash FROM claudemesh.audit_head h
		JOIN claudemesh.mesh m ON m.id = h.mesh_id WHERE m.slug = 'demo'`).Scan(&anchor))
	require.Contains(t, mustCLI(t, "audit", "verify", "--mesh", "demo", "--anchor", anchor), "intact: 7 entries")
	_, err = runCLI(t, "audit", "verify", "--mesh", "demo", "--anchor", "7:nothex")
	require.ErrorContains(t, err, "want SEQ:HASH")
	_, err = pool.Exec(context.Background(), `WITH m AS (SELECT id FROM claudemesh.mesh WHERE slug = 'demo'),
		gone AS (DELETE FROM claudemesh.audit a USING m WHERE a.mesh_id = m.id AND a.seq = 7 RETURNING a.mesh_id)
		UPDATE claudemesh.audit_head h SET seq = a.seq, hash = a.hash FROM claudemesh.audit a, m
		WHERE h.mesh_id = m.id AND a.mesh_id = m.id AND a.seq = 6`)
	require.NoError(t, err)
	require.Contains(t, mustCLI(t, "audit", "verify", "--mesh", "demo"), "intact: 6 entries", "without the anchor, the cut is not seen")
	out, err = runCLI(t, "audit", "verify", "--mesh", "demo", "--anchor", anchor)
	var ee exitError
	require.True(t, errors.As(err, &ee), "err: %v", err)
	require.Contains(t, out, "BROKEN at entry 7")

	_, err = pool.Exec(context.Background(), `UPDATE claudemesh.audit SET data = jsonb_set(data, '{role}', '"admin"') WHERE seq = 4`)
	require.NoError(t, err)
	out, err = runCLI(t, "audit", "verify", "--mesh", "demo")
	require.True(t, errors.As(err, &ee), "err: %v", err)
	require.Equal(t, 1, ee.code)
	require.Contains(t, out, "BROKEN at entry 4")
	out, err = runCLI(t, "audit", "verify", "--mesh", "demo", "--json")
	require.True(t, errors.As(err, &ee))
	var res verifyResult
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	require.False(t, res.Intact)
	require.Equal(t, int64(4), *res.BrokenSeq)
	require.NotEmpty(t, res.Reason)
}

func TestAdminErrors(t *testing.T) {
	_, dir := cliEnv(t)

	mustCLI(t, "mesh", "create", "--slug", "one", "--owner-key", filepath.Join(dir, "one.json"))
	mustCLI(t, "mesh", "create", "--slug", "two", "--owner-key", filepath.Join(dir, "two.json"))

	// Signing with another mesh's owner key is refused before anything is stored.
	_, err := runCLI(t, "invite", "create", "--mesh", "one", "--owner-key", filepath.Join(dir, "two.json"))
	require.ErrorIs(t, err, membership.ErrOwnerKeyMismatch)
	// Without --owner-key the default path is used: there is none for "one".
	_, err = runCLI(t, "invite", "create", "--mesh", "one")
	require.ErrorIs(t, err, os.ErrNotExist)
	_, err = runCLI(t, "invite", "create", "--mesh", "nope", "--owner-key", filepath.Join(dir, "one.json"))
	require.ErrorIs(t, err, membership.ErrMeshNotFound)
	_, err = runCLI(t, "invite", "create", "--mesh", "one", "--owner-key", filepath.Join(dir, "one.json"), "--expires", "soon")
	require.ErrorContains(t, err, "--expires")
	_, err = runCLI(t, "invite", "create", "--mesh", "one", "--owner-key", filepath.Join(dir, "one.json"), "--role", "root")
	require.ErrorIs(t, err, membership.ErrInvalidRole)
	_, err = runCLI(t, "invite", "revoke", "--token", "nope")
	require.ErrorIs(t, err, membership.ErrInviteNotFound)
	_, err = runCLI(t, "member", "revoke", "--mesh", "one", "--pubkey", strings.Repeat("0", 64))
	require.ErrorIs(t, err, membership.ErrMemberNotFound)
	_, err = runCLI(t, "member", "add", "--mesh", "one", "--pubkey", "xyz", "--name", "x")
	require.ErrorIs(t, err, membership.ErrInvalidPubkey)
	_, err = runCLI(t, "mesh", "create", "--slug", "Bad Slug", "--owner-key", filepath.Join(dir, "bad.json"))
	require.ErrorIs(t, err, membership.ErrInvalidSlug)
	require.NoFileExists(t, filepath.Join(dir, "bad.json"))
	_, err = runCLI(t, "mesh", "create", "--slug", "one", "--owner-key", filepath.Join(dir, "dup.json"))
	require.ErrorIs(t, err, membership.ErrMeshExists)
	require.NoFileExists(t, filepath.Join(dir, "dup.json"), "a key created for a mesh that failed is removed")
	_, err = runCLI(t, "audit", "verify", "--mesh", "nope")
	require.ErrorIs(t, err, membership.ErrMeshNotFound)
	_, err = runCLI(t, "member", "list")
	require.ErrorContains(t, err, `required flag(s) "mesh" not set`)

	// A fresh mesh's chain verifies.
	out := mustCLI(t, "audit", "verify", "--mesh", "two")
	require.Contains(t, out, "intact: 2 entries")
}

// `invite create --uses 0` is refused: it made a single-use invite (0 read as "the default"),
// so an operator who meant "no limit" shared a link that failed for the second person.
func TestInviteCreateRefusesZeroUses(t *testing.T) {
	url, dir := cliEnv(t)
	createMesh(t, dir, "demo")
	for _, uses := range []string{"0", "-2"} {
		_, err := runCLI(t, "invite", "create", "--mesh", "demo", "--owner-key", filepath.Join(dir, "demo.json"), "--uses", uses)
		require.ErrorContains(t, err, "--uses", uses)
	}
	var n int
	require.NoError(t, dbtest.PoolFor(t, url).QueryRow(context.Background(), `SELECT count(*) FROM claudemesh.invite`).Scan(&n))
	require.Zero(t, n, "no invite stored")
}

func TestParseTTL(t *testing.T) {
	for in, want := range map[string]time.Duration{"24h": 24 * time.Hour, "90m": 90 * time.Minute, "7d": 7 * 24 * time.Hour, "1s": time.Second} {
		got, err := parseTTL(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	// Days whose nanoseconds overflow are refused, not wrapped (200000d came out negative).
	for _, bad := range []string{"", "0d", "-1h", "1.5d", "d", "500ms", "soon", "200000d", "300000d"} {
		_, err := parseTTL(bad)
		require.Error(t, err, bad)
	}
}

// `audit tail` is what an operator reads after a failed verify. A mesh member chooses the
// shared-state keys its entries record: printed raw, a bidi override or a C1 control (CSI)
// rewrites the operator's screen. And a row an attacker edited (a hash cut short) must still
// print, not crash the command.
func TestAuditTailPrintsPeerTextEscapedAndTamperedRows(t *testing.T) {
	url, dir := cliEnv(t)
	meshID := createMesh(t, dir, "tail")

	pool := dbtest.PoolFor(t, url)
	ctx := context.Background()
	key := "notes\u202eevil\u009b2J\x7f"
	require.NoError(t, audit.AppendVia(ctx, pool, []audit.Entry{{MeshID: meshID, Type: audit.StateSet,
		Actor: strings.Repeat("ab", 32), Data: map[string]any{"key": key, "size": 3}}}))

	out := mustCLI(t, "audit", "tail", "--mesh", "tail", "-n", "1")
	require.Contains(t, out, audit.StateSet)
	for _, raw := range []string{"\u202e", "\u009b", "\x7f"} {
		require.NotContains(t, out, raw, "peer text reaches the terminal raw")
	}
	require.Contains(t, out, `notes\u202eevil\x9b2J\x7f`)
	recs := cliJSON[[]audit.Record](t, "audit", "tail", "--mesh", "tail", "-n", "1")
	require.JSONEq(t, `{"key":"`+key+`","size":3}`, string(recs[0].Data), "--json keeps the data as stored")

	_, err := pool.Exec(ctx, `UPDATE claudemesh.audit SET hash = 'x' WHERE mesh_id = $1 AND seq = 3`, meshID)
	require.NoError(t, err)
	out = mustCLI(t, "audit", "tail", "--mesh", "tail", "-n", "1")
	require.Contains(t, out, audit.StateSet)
}

// An anchor mistyped (a hash that is not hex) is an input error, not a false alarm of a
// rewritten chain.
func TestAuditVerifyAnchorMustBeHex(t *testing.T) {
	_, dir := cliEnv(t)
	mustCLI(t, "mesh", "create", "--slug", "anchor", "--owner-key", filepath.Join(dir, "anchor.json"))
	out, err := runCLI(t, "audit", "verify", "--mesh", "anchor", "--anchor", "1:"+strings.Repeat("g", 64))
	require.ErrorContains(t, err, "want SEQ:HASH")
	require.NotContains(t, out, "BROKEN")
}

// The anchors logged after a chain was cut are the cut chain's: checked against the latest
// anchor alone, a cut made before it passes. Every anchor logged since the last check is
// given, in one walk, and the chain must hold each.
func TestAuditVerifyAgainstEveryAnchor(t *testing.T) {
	url, dir := cliEnv(t)
	m := createMesh(t, dir, "anchors")
	pool := dbtest.PoolFor(t, url)
	ctx := context.Background()
	add := func(n int) {
		for range n {
			require.NoError(t, audit.AppendVia(ctx, pool, []audit.Entry{{MeshID: m, Type: audit.StateSet, Actor: "a"}}))
		}
		_, err := audit.Seal(ctx, pool, true)
		require.NoError(t, err)
	}
	head := func() string {
		var h string
		require.NoError(t, pool.QueryRow(ctx, `SELECT seq || ':' || hash FROM claudemesh.audit_head WHERE mesh_id = $1`, m).Scan(&h))
		return h
	}
	add(3) // entries 1-2 (mesh created, owner added), 3-5
	before := head()
	require.True(t, strings.HasPrefix(before, "5:"), before)
	// Entries 4 and 5 cut with the head; the replicas go on sealing, and log the cut chain's head.
	_, err := pool.Exec(ctx, `DELETE FROM claudemesh.audit WHERE mesh_id = $1 AND seq > 3`, m)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `UPDATE claudemesh.audit_head h SET seq = a.seq, hash = a.hash
		FROM claudemesh.audit a WHERE h.mesh_id = $1 AND a.mesh_id = $1 AND a.seq = 3`, m)
	require.NoError(t, err)
	add(4)
	after := head()

	require.Contains(t, mustCLI(t, "audit", "verify", "--mesh", "anchors", "--anchor", after), "intact: 7 entries",
		"the latest anchor is the cut chain's")
	out, err := runCLI(t, "audit", "verify", "--mesh", "anchors", "--anchor", before, "--anchor", after)
	var ee exitError
	require.True(t, errors.As(err, &ee), "err: %v\n%s", err, out)
	require.Contains(t, out, "BROKEN at entry 5")
}

// cliEnv points the CLI at a test database and a config directory of its own, quiet, and
// returns both.
func cliEnv(t *testing.T) (url, dir string) {
	t.Helper()
	url, dir = dbtest.URL(t), t.TempDir()
	t.Setenv("DATABASE_URL", url)
	t.Setenv("LOG_LEVEL", "warn")
	t.Setenv("XDG_CONFIG_HOME", dir)
	return url, dir
}

// createMesh creates a mesh through the CLI, its owner key in dir, and returns its id.
func createMesh(t *testing.T, dir, slug string) string {
	t.Helper()
	return cliJSON[struct {
		Mesh membership.Mesh `json:"mesh"`
	}](t, "mesh", "create", "--slug", slug, "--owner-key", filepath.Join(dir, slug+".json")).Mesh.ID
}
