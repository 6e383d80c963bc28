package e2e

import (
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/claudemesh/broker/protocol"
)

// Mode says how a received message was protected.
type Mode string

// Modes of an opened message.
const (
	// ModeDirect: NaCl box from the sender to us.
	ModeDirect Mode = "direct"
	// ModeGroup: secretbox under the mesh root key (a group or broadcast message).
	ModeGroup Mode = "group"
	// ModePlain: no encryption at all: claudemesh's early clients sent multicast bodies as
	// plain base64. Show it, but say so.
	ModePlain Mode = "plain"
)

// Encrypted reports whether the mode is end-to-end encrypted.
func (m Mode) Encrypted() bool { return m == ModeDirect || m == ModeGroup }

// maxSharedKeys bounds the keyring's cache; a mesh has far fewer members.
const maxSharedKeys = 4096

// Keyring holds a member's key and its mesh's root key and caches the shared key per peer, so
// that a busy pair pays the X25519 multiplication once. Safe for concurrent use.
type Keyring struct {
	self ed25519.PrivateKey
	root *RootKey // nil when the mesh has none: group messages can then not be sent or read

	mu     sync.Mutex
	shared map[string]*SharedKey // by lowercase hex public key
}

// NewKeyring returns a keyring for self; root may be nil.
func NewKeyring(self ed25519.PrivateKey, root *RootKey) *Keyring {
	return &Keyring{self: self, root: root, shared: make(map[string]*SharedKey)}
}

// HasRootKey reports whether group messages can be sealed and opened.
func (k *Keyring) HasRootKey() bool { return k.root != nil }

// Shared returns the cached shared key with the peer whose hex ed25519 key is given.
func (k *Keyring) Shared(peerHex string) (*SharedKey, error) {
	norm, err := protocol.NormalizePubkey(peerHex)
	if err != nil {
		return nil, ErrPublicKey
	}
	k.mu.Lock()
	sk := k.shared[norm]
	k.mu.Unlock()
	if sk != nil {
		return sk, nil
	}
	pub, _ := protocol.ParsePubkey(norm) // valid: normalised above
	if sk, err = NewSharedKey(k.self, pub); err != nil {
		return nil, err
	}
	k.mu.Lock()
	if len(k.shared) >= maxSharedKeys {
		clear(k.shared)
	}
	k.shared[norm] = sk
	k.mu.Unlock()
	return sk, nil
}

// SealDirect encrypts a direct message to the peer with hex key peerHex.
func (k *Keyring) SealDirect(peerHex string, plaintext []byte) (nonce, ciphertext string, err error) {
	sk, err := k.Shared(peerHex)
	if err != nil {
		return "", "", err
	}
	return sk.Seal(plaintext)
}

// ErrNoRootKey: a group message needs the mesh root key and the keyring has none.
var ErrNoRootKey = errors.New("e2e: no mesh root key for group messages (join again with an invite that carries one)")

// SealGroup encrypts a group or broadcast message under the mesh root key.
func (k *Keyring) SealGroup(plaintext []byte) (nonce, ciphertext string, err error) {
	if k.root == nil {
		return "", "", ErrNoRootKey
	}
	return k.root.Seal(plaintext)
}

// Opened is a received message's plaintext and how it was protected.
type Opened struct {
	Plaintext []byte
	Mode      Mode
}

// Open decrypts a received envelope. The push does not say whether it was direct or
// multicast, so it tries, in order: box from each of the sender keys given (the push's
// senderPubkey, then senderMemberPubkey), secretbox under the root key, and last a plain
// base64 body of valid UTF-8 (early claudemesh multicast), reported as ModePlain. Anything
// else is ErrDecrypt.
func (k *Keyring) Open(nonce, ciphertext string, senderKeys ...string) (Opened, error) {
	var lastErr error = ErrDecrypt
	for _, s := range senderKeys {
		if s == "" {
			continue
		}
		sk, err := k.Shared(s)
		if err != nil {
			continue
		}
		pt, err := sk.Open(nonce, ciphertext)
		if err == nil {
			return Opened{Plaintext: pt, Mode: ModeDirect}, nil
		}
		lastErr = err
	}
	if k.root != nil {
		pt, err := k.root.Open(nonce, ciphertext)
		if err == nil {
			return Opened{Plaintext: pt, Mode: ModeGroup}, nil
		}
		lastErr = err
	}
	if pt, ok := plainBody(ciphertext); ok {
		return Opened{Plaintext: pt, Mode: ModePlain}, nil
	}
	if errors.Is(lastErr, ErrEncoding) {
		return Opened{}, ErrEncoding
	}
	return Opened{}, ErrDecrypt
}

// plainBody decodes an unencrypted body: standard base64 of UTF-8 text.
func plainBody(s string) ([]byte, bool) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, false
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		if b, err = base64.RawStdEncoding.DecodeString(s); err != nil {
			return nil, false
		}
	}
	if !utf8.Valid(b) {
		return nil, false
	}
	// Text, not binary: a failed ciphertext that happens to be valid UTF-8 is still refused.
	for _, r := range string(b) {
		if r < 0x20 && r != '\n' && r != '\r' && r != '\t' || r == 0x7f {
			return nil, false
		}
	}
	return b, true
}
