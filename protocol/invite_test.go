package protocol

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func signedInvite(t testing.TB) *InvitePayload {
	t.Helper()
	_, priv := newKey(t)
	p := &InvitePayload{
		MeshID: "mesh-1", MeshSlug: "team", BrokerURL: "wss://broker.example/ws?a=1&b=<2>",
		ExpiresAt: 1900000000, MeshRootKey: "cm9vdA", Role: RoleMember,
	}
	require.NoError(t, SignInvite(priv, p))
	return p
}

func TestInviteSigningString(t *testing.T) {
	t.Parallel()
	p := &InvitePayload{V: 1, MeshID: "m", MeshSlug: "s", BrokerURL: "ws://h/ws", ExpiresAt: 1700000000,
		MeshRootKey: "k", Role: "admin", OwnerPubkey: "OWNER", Signature: "ignored"}
	require.Equal(t, "1|m|s|ws://h/ws|1700000000|k|admin|OWNER", InviteSigningString(p))
}

func TestInviteSignVerify(t *testing.T) {
	t.Parallel()
	p := signedInvite(t)
	require.Equal(t, 1, p.V)
	require.Len(t, p.OwnerPubkey, 64)
	require.NoError(t, VerifyInvite(p))

	// Uppercase owner key and signature hex still verify when the payload
	// was signed with that exact string.
	_, priv := newKey(t)
	q := *p
	q.OwnerPubkey = strings.ToUpper(PubkeyHex(priv.Public().(ed25519.PublicKey)))
	require.NoError(t, SignInvite(priv, &q))
	q.Signature = strings.ToUpper(q.Signature)
	require.NoError(t, VerifyInvite(&q))

	// A key that is not the owner's cannot sign for it.
	r := *p
	require.Error(t, SignInvite(priv, &r))
}

func TestInviteTamper(t *testing.T) {
	t.Parallel()
	p := signedInvite(t)
	tampers := map[string]func(q *InvitePayload){
		"v":             func(q *InvitePayload) { q.V = 2 },
		"mesh_id":       func(q *InvitePayload) { q.MeshID = "other" },
		"mesh_slug":     func(q *InvitePayload) { q.MeshSlug = "HACKED" },
		"broker_url":    func(q *InvitePayload) { q.BrokerURL = "ws://evil/ws" },
		"expires_at":    func(q *InvitePayload) { q.ExpiresAt++ },
		"mesh_root_key": func(q *InvitePayload) { q.MeshRootKey = "x" },
		"role":          func(q *InvitePayload) { q.Role = RoleAdmin },
		"owner_pubkey":  func(q *InvitePayload) { q.OwnerPubkey = strings.Repeat("0", 64) },
		"signature":     func(q *InvitePayload) { q.Signature = strings.Repeat("0", 128) },
		"bad sig hex":   func(q *InvitePayload) { q.Signature = "zz" },
		"bad owner hex": func(q *InvitePayload) { q.OwnerPubkey = "zz" },
	}
	for name, tamper := range tampers {
		q := *p
		tamper(&q)
		err := VerifyInvite(&q)
		require.ErrorIs(t, err, ErrInviteBadSignature, name)
	}
}

func TestInviteTokenRoundTrip(t *testing.T) {
	t.Parallel()
	p := signedInvite(t)
	token, err := EncodeInviteToken(p)
	require.NoError(t, err)
	require.NotContains(t, token, "=")
	require.NotContains(t, token, "+")
	require.NotContains(t, token, "/")

	raw, err := base64.RawURLEncoding.DecodeString(token)
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(string(raw), `{"v":1,"mesh_id":"mesh-1","mesh_slug":"team","broker_url":"wss://broker.example/ws?a=1&b=<2>"`), string(raw))

	got, err := ParseInviteToken(token)
	require.NoError(t, err)
	require.Equal(t, p, got)
	require.NoError(t, VerifyInvite(got))

	// Links and bare tokens, padding and surrounding space.
	link := InviteLink(token)
	require.Equal(t, "ic://join/"+token, link)
	for _, s := range []string{link, token, " " + link + "\n", token + "=="} {
		tok, q, err := ParseInviteLink(s)
		require.NoError(t, err, s)
		require.Equal(t, token, strings.TrimRight(tok, "="))
		require.Equal(t, p, q)
	}

	// Tampering with the token's JSON is detected by VerifyInvite.
	tampered := strings.Replace(string(raw), `"mesh_slug":"team"`, `"mesh_slug":"HACKED"`, 1)
	q, err := ParseInviteToken(base64.RawURLEncoding.EncodeToString([]byte(tampered)))
	require.NoError(t, err)
	require.ErrorIs(t, VerifyInvite(q), ErrInviteBadSignature)

	// JS-style tokens made with JSON.stringify decode the same.
	js, err := json.Marshal(p)
	require.NoError(t, err)
	q, err = ParseInviteToken(base64.RawURLEncoding.EncodeToString(js))
	require.NoError(t, err)
	require.Equal(t, p, q)
}

func TestParseInviteTokenErrors(t *testing.T) {
	t.Parallel()
	enc := func(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }
	valid := `"v":1,"mesh_id":"m","mesh_slug":"s","broker_url":"u","expires_at":1,"mesh_root_key":"k","role":"member","owner_pubkey":"o","signature":"x"`
	tests := []struct{ name, token, msg string }{
		{"empty", "", "empty"},
		{"not base64", "!!!", "not base64url"},
		{"std base64 chars", "ab+/", "not base64url"},
		{"too long", strings.Repeat("a", MaxInviteTokenLen+1), "too long"},
		{"not json", enc("hello"), "invalid JSON"},
		{"array", enc("[]"), "want a JSON object"},
		{"missing v", enc(`{` + strings.Replace(valid, `"v":1,`, "", 1) + `}`), "v: required integer"},
		{"v 2", enc(`{` + strings.Replace(valid, `"v":1`, `"v":2`, 1) + `}`), "v: unsupported invite version 2"},
		{"v string", enc(`{` + strings.Replace(valid, `"v":1`, `"v":"1"`, 1) + `}`), "v: must be an integer"},
		{"mesh_id empty", enc(`{` + strings.Replace(valid, `"mesh_id":"m"`, `"mesh_id":""`, 1) + `}`), "mesh_id: must not be empty"},
		{"expires float", enc(`{` + strings.Replace(valid, `"expires_at":1`, `"expires_at":1.5`, 1) + `}`), "expires_at: must be an integer"},
		{"role other", enc(`{` + strings.Replace(valid, `"role":"member"`, `"role":"owner"`, 1) + `}`), "role: must be admin or member"},
		{"missing signature", enc(`{` + strings.Replace(valid, `,"signature":"x"`, "", 1) + `}`), "signature: required string"},
		{"owner number", enc(`{` + strings.Replace(valid, `"owner_pubkey":"o"`, `"owner_pubkey":5`, 1) + `}`), "owner_pubkey: must be a string"},
	}
	for _, tt := range tests {
		_, err := ParseInviteToken(tt.token)
		require.Error(t, err, tt.name)
		var pe *Error
		require.True(t, errors.As(err, &pe), tt.name)
		require.Equal(t, CodeBadRequest, pe.Code)
		require.Contains(t, pe.Message, tt.msg, tt.name)
	}
	_, err := ParseInviteToken(enc(`{` + valid + `}`))
	require.NoError(t, err)
}
