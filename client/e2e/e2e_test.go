package e2e

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"
	"golang.org/x/crypto/nacl/secretbox"

	"github.com/claudemesh/broker/protocol"
)

func newKey(t *testing.T) (ed25519.PublicKey, ed25519.PrivateKey) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	return pub, priv
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	require.NoError(t, err)
	return b
}

// libsodium's own test vector (test/default/ed25519_convert.c and .exp): the keypair from
// this seed converts to these X25519 keys. Matching it means claudemesh's clients, which use
// libsodium's conversions, derive the same keys as we do.
func TestConversionMatchesLibsodiumVector(t *testing.T) {
	t.Parallel()
	priv := ed25519.NewKeyFromSeed(unhex(t, "421151a459faeade3d247115f94aedae42318124095afabe4d1451a559faedee"))
	xpub, err := PublicKeyToX25519(priv.Public().(ed25519.PublicKey))
	require.NoError(t, err)
	require.Equal(t, "f1814f0e8ff1043d8a44d25babff3cedcae6c22c3edaa48f857ae70de2baae50", hex.EncodeToString(xpub[:]))
	xpriv := PrivateKeyToX25519(priv)
	require.Equal(t, "8052030376d47112be7f73ed7a019293dd12ad910b654455798b4667d73de166", hex.EncodeToString(xpriv[:]))
}

// For any key, the converted private key's X25519 public key is the converted public key,
// and our shared key is box.Precompute's.
func TestConversionConsistent(t *testing.T) {
	t.Parallel()
	for range 50 {
		pubA, privA := newKey(t)
		pubB, privB := newKey(t)
		xprivA := PrivateKeyToX25519(privA)
		xpubA, err := PublicKeyToX25519(pubA)
		require.NoError(t, err)
		derived, err := curve25519.X25519(xprivA[:], curve25519.Basepoint)
		require.NoError(t, err)
		require.Equal(t, xpubA[:], derived)

		xpubB, err := PublicKeyToX25519(pubB)
		require.NoError(t, err)
		var want [32]byte
		box.Precompute(&want, &xpubB, &xprivA)
		ab, err := NewSharedKey(privA, pubB)
		require.NoError(t, err)
		ba, err := NewSharedKey(privB, pubA)
		require.NoError(t, err)
		require.Equal(t, want, ab.k)
		require.Equal(t, ab.k, ba.k, "both sides derive the same key")
	}
}

func TestDirectRoundTripBothWays(t *testing.T) {
	t.Parallel()
	pubA, privA := newKey(t)
	pubB, privB := newKey(t)
	for _, msg := range []string{"", "hello bob", strings.Repeat("é", 10000)} {
		n, ct, err := SealDirect(privA, pubB, []byte(msg))
		require.NoError(t, err)
		nb, err := base64.StdEncoding.DecodeString(n)
		require.NoError(t, err)
		require.Len(t, nb, NonceSize)
		pt, err := OpenDirect(privB, pubA, n, ct)
		require.NoError(t, err)
		require.Equal(t, msg, string(pt))

		n, ct, err = SealDirect(privB, pubA, []byte(msg))
		require.NoError(t, err)
		pt, err = OpenDirect(privA, pubB, n, ct)
		require.NoError(t, err)
		require.Equal(t, msg, string(pt))
	}

	// Interoperates with plain nacl/box on the converted keys (what libsodium's
	// crypto_box_easy produces).
	xpubB, _ := PublicKeyToX25519(pubB)
	xprivA := PrivateKeyToX25519(privA)
	var nonce [24]byte
	_, _ = rand.Read(nonce[:])
	ct := box.Seal(nil, []byte("from libsodium"), &nonce, &xpubB, &xprivA)
	pt, err := OpenDirect(privB, pubA, base64.StdEncoding.EncodeToString(nonce[:]), base64.StdEncoding.EncodeToString(ct))
	require.NoError(t, err)
	require.Equal(t, "from libsodium", string(pt))
}

func TestDirectWrongKeyAndTamperFail(t *testing.T) {
	t.Parallel()
	pubA, privA := newKey(t)
	pubB, privB := newKey(t)
	_, privC := newKey(t)
	n, ct, err := SealDirect(privA, pubB, []byte("secret"))
	require.NoError(t, err)

	_, err = OpenDirect(privC, pubA, n, ct)
	require.ErrorIs(t, err, ErrDecrypt, "a third member cannot read it")
	_, err = OpenDirect(privB, pubB, n, ct)
	require.ErrorIs(t, err, ErrDecrypt, "wrong sender key")

	raw, _ := base64.StdEncoding.DecodeString(ct)
	for i := range raw {
		bad := append([]byte(nil), raw...)
		bad[i] ^= 1
		_, err = OpenDirect(privB, pubA, n, base64.StdEncoding.EncodeToString(bad))
		require.ErrorIs(t, err, ErrDecrypt, "byte %d flipped", i)
	}
	rawN, _ := base64.StdEncoding.DecodeString(n)
	rawN[0] ^= 1
	_, err = OpenDirect(privB, pubA, base64.StdEncoding.EncodeToString(rawN), ct)
	require.ErrorIs(t, err, ErrDecrypt, "nonce flipped")

	_, err = OpenDirect(privB, pubA, "short", ct)
	require.ErrorIs(t, err, ErrEncoding)
	_, err = OpenDirect(privB, pubA, n, "!!!")
	require.ErrorIs(t, err, ErrEncoding)
	_, err = OpenDirect(privB, pubA, n, base64.StdEncoding.EncodeToString([]byte("tiny")))
	require.ErrorIs(t, err, ErrEncoding)
}

func TestSmallOrderAndInvalidKeysRefused(t *testing.T) {
	t.Parallel()
	_, priv := newKey(t)
	for name, k := range map[string]string{
		"identity":      "0100000000000000000000000000000000000000000000000000000000000000",
		"order 2":       "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
		"order 4":       "0000000000000000000000000000000000000000000000000000000000000000",
		"not on curve":  "0200000000000000000000000000000000000000000000000000000000000000",
		"non-canonical": "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
	} {
		_, err := NewSharedKey(priv, unhex(t, k))
		require.ErrorIs(t, err, ErrPublicKey, name)
	}
	_, err := NewSharedKey(priv, []byte{1, 2, 3})
	require.ErrorIs(t, err, ErrPublicKey)
}

func TestGroupRoundTripWrongKeyTamper(t *testing.T) {
	t.Parallel()
	rk, enc, err := NewRootKey()
	require.NoError(t, err)
	require.NotContains(t, enc, "=")
	parsed, err := ParseRootKey(enc)
	require.NoError(t, err)
	require.Equal(t, rk.k, parsed.k)

	n, ct, err := rk.Seal([]byte("hello mesh"))
	require.NoError(t, err)
	pt, err := parsed.Open(n, ct)
	require.NoError(t, err)
	require.Equal(t, "hello mesh", string(pt))

	// Interoperates with plain secretbox.
	var nonce [24]byte
	_, _ = rand.Read(nonce[:])
	sealed := secretbox.Seal(nil, []byte("x"), &nonce, &rk.k)
	pt, err = rk.Open(base64.StdEncoding.EncodeToString(nonce[:]), base64.StdEncoding.EncodeToString(sealed))
	require.NoError(t, err)
	require.Equal(t, "x", string(pt))

	other, _, err := NewRootKey()
	require.NoError(t, err)
	_, err = other.Open(n, ct)
	require.ErrorIs(t, err, ErrDecrypt)
	raw, _ := base64.StdEncoding.DecodeString(ct)
	raw[len(raw)-1] ^= 0x80
	_, err = rk.Open(n, base64.StdEncoding.EncodeToString(raw))
	require.ErrorIs(t, err, ErrDecrypt)

	for _, bad := range []string{"", "abc", base64.RawURLEncoding.EncodeToString(make([]byte, 31))} {
		_, err := ParseRootKey(bad)
		require.ErrorIs(t, err, ErrRootKey)
	}
	// Padded and standard-alphabet forms of the same key are accepted.
	for _, form := range []string{base64.URLEncoding.EncodeToString(rk.k[:]), base64.StdEncoding.EncodeToString(rk.k[:])} {
		p, err := ParseRootKey(form)
		require.NoError(t, err)
		require.Equal(t, rk.k, p.k)
	}
}

func TestKeyringOpen(t *testing.T) {
	t.Parallel()
	pubA, privA := newKey(t)
	pubB, privB := newKey(t)
	rk, _, err := NewRootKey()
	require.NoError(t, err)
	alice, bob := NewKeyring(privA, rk), NewKeyring(privB, rk)
	aHex, bHex := protocol.PubkeyHex(pubA), strings.ToUpper(protocol.PubkeyHex(pubB))

	n, ct, err := alice.SealDirect(bHex, []byte("direct"))
	require.NoError(t, err)
	o, err := bob.Open(n, ct, aHex)
	require.NoError(t, err)
	require.Equal(t, Opened{Plaintext: []byte("direct"), Mode: ModeDirect}, o)
	require.True(t, o.Mode.Encrypted())

	// The session key (senderPubkey) may be unknown to us: the member key comes next.
	_, stranger := newKey(t)
	o, err = bob.Open(n, ct, protocol.PubkeyHex(stranger.Public().(ed25519.PublicKey)), aHex)
	require.NoError(t, err)
	require.Equal(t, ModeDirect, o.Mode)

	n, ct, err = alice.SealGroup([]byte("group"))
	require.NoError(t, err)
	o, err = bob.Open(n, ct, aHex)
	require.NoError(t, err)
	require.Equal(t, Opened{Plaintext: []byte("group"), Mode: ModeGroup}, o)

	// Early claudemesh multicast: plain base64, shown but marked.
	o, err = bob.Open("whatever", base64.StdEncoding.EncodeToString([]byte("hi all\n")), aHex)
	require.NoError(t, err)
	require.Equal(t, Opened{Plaintext: []byte("hi all\n"), Mode: ModePlain}, o)
	require.False(t, o.Mode.Encrypted())

	// A group message under another root key is not plain text: refused.
	other, _, _ := NewRootKey()
	n, ct, err = other.Seal([]byte("not for us"))
	require.NoError(t, err)
	_, err = bob.Open(n, ct, aHex)
	require.ErrorIs(t, err, ErrDecrypt)
	_, err = bob.Open(n, base64.StdEncoding.EncodeToString([]byte{0xff, 0xfe, 0}), aHex)
	require.Error(t, err)
	_, err = bob.Open(n, base64.StdEncoding.EncodeToString([]byte("bell\a")), aHex)
	require.Error(t, err, "control characters are not text")

	noRoot := NewKeyring(privB, nil)
	require.False(t, noRoot.HasRootKey())
	_, _, err = noRoot.SealGroup([]byte("x"))
	require.ErrorIs(t, err, ErrNoRootKey)
	_, _, err = alice.SealDirect("zz", []byte("x"))
	require.ErrorIs(t, err, ErrPublicKey)
}

func BenchmarkSealOpenDirectCached(b *testing.B) {
	pubA, privA, _ := ed25519.GenerateKey(rand.Reader)
	pubB, privB, _ := ed25519.GenerateKey(rand.Reader)
	alice, bob := NewKeyring(privA, nil), NewKeyring(privB, nil)
	aHex, bHex := protocol.PubkeyHex(pubA), protocol.PubkeyHex(pubB)
	msg := make([]byte, 256)
	b.ReportAllocs()
	for b.Loop() {
		n, ct, err := alice.SealDirect(bHex, msg)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := bob.Open(n, ct, aHex); err != nil {
			b.Fatal(err)
		}
	}
}
