package protocol

import (
	"crypto/ed25519"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func newKey(t testing.TB) (ed25519.PublicKey, ed25519.PrivateKey) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(nil)
	require.NoError(t, err)
	return pub, priv
}

func TestNormalizePubkey(t *testing.T) {
	t.Parallel()
	lower := strings.Repeat("0a", 32)
	got, err := NormalizePubkey(strings.ToUpper(lower))
	require.NoError(t, err)
	require.Equal(t, lower, got)
	got, err = NormalizePubkey(lower)
	require.NoError(t, err)
	require.Equal(t, lower, got)

	for _, bad := range []string{"", lower[:62], lower + "00", strings.Repeat("g", 64), strings.Repeat("é", 32), " " + lower[1:]} {
		_, err := NormalizePubkey(bad)
		require.ErrorIs(t, err, ErrMalformedKey, bad)
	}

	sig := strings.Repeat("Ff", 64)
	got, err = NormalizeSignature(sig)
	require.NoError(t, err)
	require.Equal(t, strings.ToLower(sig), got)
	_, err = NormalizeSignature(lower)
	require.ErrorIs(t, err, ErrMalformedSignature)
}

func TestHelloSigning(t *testing.T) {
	t.Parallel()
	pub, priv := newKey(t)
	pubHex := PubkeyHex(pub)
	const ts = int64(1700000000123)

	require.Equal(t, "mesh|member|"+pubHex+"|1700000000123", HelloSigningString("mesh", "member", pubHex, ts))

	sig := SignHello(priv, "mesh", "member", pubHex, ts)
	require.Len(t, sig, 128)
	require.True(t, VerifyHello("mesh", "member", pubHex, ts, sig))
	require.True(t, VerifyHello("mesh", "member", pubHex, ts, strings.ToUpper(sig)), "signature hex is case-insensitive")

	require.False(t, VerifyHello("mesh2", "member", pubHex, ts, sig))
	require.False(t, VerifyHello("mesh", "member2", pubHex, ts, sig))
	require.False(t, VerifyHello("mesh", "member", pubHex, ts+1, sig))
	require.False(t, VerifyHello("mesh", "member", pubHex, ts, sig[:126]))
	require.False(t, VerifyHello("mesh", "member", "zz", ts, sig))

	// The signed pubkey is the wire string as sent: a peer that sends
	// uppercase hex signs uppercase hex, and the lowercase form of the same
	// key does not verify that signature (nor the reverse).
	upper := strings.ToUpper(pubHex)
	sigUpper := SignHello(priv, "mesh", "member", upper, ts)
	require.True(t, VerifyHello("mesh", "member", upper, ts, sigUpper))
	require.False(t, VerifyHello("mesh", "member", pubHex, ts, sigUpper))
	require.False(t, VerifyHello("mesh", "member", upper, ts, sig))

	h := &Hello{MeshID: "mesh", MemberID: "member", Pubkey: pubHex, Timestamp: ts, Signature: sig}
	require.True(t, h.Verify())

	// Another key's signature does not verify.
	_, other := newKey(t)
	require.False(t, VerifyHello("mesh", "member", pubHex, ts, SignHello(other, "mesh", "member", pubHex, ts)))
}

func TestParsePubkey(t *testing.T) {
	t.Parallel()
	pub, _ := newKey(t)
	got, err := ParsePubkey(strings.ToUpper(PubkeyHex(pub)))
	require.NoError(t, err)
	require.Equal(t, pub, got)
	_, err = ParsePubkey("00")
	require.ErrorIs(t, err, ErrMalformedKey)
}
