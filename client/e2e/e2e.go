// Package e2e is the peers' end-to-end encryption, compatible with claudemesh's clients
// (libsodium): direct messages are NaCl box (X25519, XSalsa20-Poly1305) between the two
// members' ed25519 keys converted to X25519; group and broadcast messages are NaCl secretbox
// under the mesh root key that invites carry. Nonces and ciphertexts travel as standard
// base64 in the envelope's nonce and ciphertext fields; the broker never sees a key.
//
// Nothing here logs or formats key material, nonces or ciphertexts into errors.
package e2e

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha512"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"filippo.io/edwards25519"
	"golang.org/x/crypto/nacl/box"
	"golang.org/x/crypto/nacl/secretbox"
)

// Sizes of the wire values.
const (
	NonceSize   = 24 // box and secretbox nonces
	KeySize     = 32 // X25519 keys, shared keys and the mesh root key
	Overhead    = box.Overhead
	RootKeySize = KeySize
)

var (
	// ErrDecrypt: the ciphertext does not open under the key (wrong key, tampered, or not
	// encrypted for us).
	ErrDecrypt = errors.New("e2e: message does not decrypt")
	// ErrEncoding: the nonce or ciphertext is not base64 of the right length.
	ErrEncoding = errors.New("e2e: malformed nonce or ciphertext")
	// ErrPublicKey: an ed25519 public key that is not a usable curve point (wrong length,
	// not on the curve, or of small order, which would make the shared key predictable).
	ErrPublicKey = errors.New("e2e: unusable ed25519 public key")
	// ErrRootKey: the mesh root key is not 32 bytes of base64url.
	ErrRootKey = errors.New("e2e: mesh root key must be 32 bytes, base64url")
)

// PrivateKeyToX25519 converts an ed25519 private key to the X25519 private key libsodium's
// crypto_sign_ed25519_sk_to_curve25519 derives: the first half of SHA-512 of the seed,
// clamped.
func PrivateKeyToX25519(priv ed25519.PrivateKey) [KeySize]byte {
	h := sha512.Sum512(priv.Seed())
	var out [KeySize]byte
	copy(out[:], h[:KeySize])
	out[0] &= 248
	out[31] &= 127
	out[31] |= 64
	clear(h[:])
	return out
}

// PublicKeyToX25519 converts an ed25519 public key to its X25519 (Montgomery u) form, as
// libsodium's crypto_sign_ed25519_pk_to_curve25519 does. Keys that are not on the curve or of
// small order are refused with ErrPublicKey.
func PublicKeyToX25519(pub ed25519.PublicKey) ([KeySize]byte, error) {
	var out [KeySize]byte
	if len(pub) != ed25519.PublicKeySize {
		return out, ErrPublicKey
	}
	p, err := new(edwards25519.Point).SetBytes(pub)
	if err != nil {
		return out, ErrPublicKey
	}
	if new(edwards25519.Point).MultByCofactor(p).Equal(edwards25519.NewIdentityPoint()) == 1 {
		return out, ErrPublicKey
	}
	copy(out[:], p.BytesMontgomery())
	return out, nil
}

// SharedKey is the precomputed box key between two members: either side derives the same key
// from its own private key and the other's public key. Reuse it for every message of the pair.
type SharedKey struct {
	k [KeySize]byte
}

// NewSharedKey derives the box key between self and peer: box.Precompute on the converted
// keys. PublicKeyToX25519 has refused small-order points, so the X25519 shared secret cannot
// be the all-zero value an attacker could predict.
func NewSharedKey(self ed25519.PrivateKey, peer ed25519.PublicKey) (*SharedKey, error) {
	if len(self) != ed25519.PrivateKeySize {
		return nil, errors.New("e2e: own key must be an ed25519 private key")
	}
	xpub, err := PublicKeyToX25519(peer)
	if err != nil {
		return nil, err
	}
	xpriv := PrivateKeyToX25519(self)
	defer clear(xpriv[:])
	var sk SharedKey
	box.Precompute(&sk.k, &xpub, &xpriv)
	return &sk, nil
}

// Seal encrypts plaintext with a fresh random nonce and returns both as base64.
func (k *SharedKey) Seal(plaintext []byte) (nonce, ciphertext string, err error) {
	var n [NonceSize]byte
	if _, err := rand.Read(n[:]); err != nil {
		return "", "", fmt.Errorf("e2e: nonce: %w", err)
	}
	ct := box.SealAfterPrecomputation(nil, plaintext, &n, &k.k)
	return encode(n[:]), encode(ct), nil
}

// Open decrypts a base64 nonce and ciphertext sealed with the same shared key.
func (k *SharedKey) Open(nonce, ciphertext string) ([]byte, error) {
	n, ct, err := decodeSealed(nonce, ciphertext)
	if err != nil {
		return nil, err
	}
	pt, ok := box.OpenAfterPrecomputation(nil, ct, n, &k.k)
	if !ok {
		return nil, ErrDecrypt
	}
	return pt, nil
}

// SealDirect encrypts a direct message from self to peer.
func SealDirect(self ed25519.PrivateKey, peer ed25519.PublicKey, plaintext []byte) (nonce, ciphertext string, err error) {
	k, err := NewSharedKey(self, peer)
	if err != nil {
		return "", "", err
	}
	return k.Seal(plaintext)
}

// OpenDirect decrypts a direct message that peer sent to self.
func OpenDirect(self ed25519.PrivateKey, peer ed25519.PublicKey, nonce, ciphertext string) ([]byte, error) {
	k, err := NewSharedKey(self, peer)
	if err != nil {
		return nil, err
	}
	return k.Open(nonce, ciphertext)
}

// RootKey is a mesh root key: the secretbox key of the mesh's group and broadcast messages.
type RootKey struct {
	k [RootKeySize]byte
}

// ParseRootKey decodes the mesh_root_key of an invite: 32 bytes, base64url without padding
// (padded and standard-alphabet forms are accepted too).
func ParseRootKey(s string) (*RootKey, error) {
	b, err := decodeAny(strings.TrimSpace(s))
	if err != nil || len(b) != RootKeySize {
		return nil, ErrRootKey
	}
	var rk RootKey
	copy(rk.k[:], b)
	clear(b)
	return &rk, nil
}

// NewRootKey returns a fresh random root key and its invite form (base64url, no padding).
func NewRootKey() (*RootKey, string, error) {
	var rk RootKey
	if _, err := rand.Read(rk.k[:]); err != nil {
		return nil, "", fmt.Errorf("e2e: root key: %w", err)
	}
	return &rk, base64.RawURLEncoding.EncodeToString(rk.k[:]), nil
}

// Seal encrypts a group message with a fresh random nonce.
func (rk *RootKey) Seal(plaintext []byte) (nonce, ciphertext string, err error) {
	var n [NonceSize]byte
	if _, err := rand.Read(n[:]); err != nil {
		return "", "", fmt.Errorf("e2e: nonce: %w", err)
	}
	return encode(n[:]), encode(secretbox.Seal(nil, plaintext, &n, &rk.k)), nil
}

// Open decrypts a group message.
func (rk *RootKey) Open(nonce, ciphertext string) ([]byte, error) {
	n, ct, err := decodeSealed(nonce, ciphertext)
	if err != nil {
		return nil, err
	}
	pt, ok := secretbox.Open(nil, ct, n, &rk.k)
	if !ok {
		return nil, ErrDecrypt
	}
	return pt, nil
}

func encode(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// decodeAny accepts standard or URL base64, padded or not: peers differ in what they write.
func decodeAny(s string) ([]byte, error) {
	encs := []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding}
	var err error
	for _, enc := range encs {
		var b []byte
		if b, err = enc.DecodeString(s); err == nil {
			return b, nil
		}
	}
	return nil, err
}

func decodeSealed(nonce, ciphertext string) (*[NonceSize]byte, []byte, error) {
	nb, err := decodeAny(nonce)
	if err != nil || len(nb) != NonceSize {
		return nil, nil, ErrEncoding
	}
	ct, err := decodeAny(ciphertext)
	if err != nil || len(ct) < Overhead {
		return nil, nil, ErrEncoding
	}
	return (*[NonceSize]byte)(nb), ct, nil
}
