package membership

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/claudemesh/broker/protocol"
)

// OwnerKeyVersion is the owner key file format version.
const OwnerKeyVersion = 1

// MeshRootKeySize is the size of a mesh root key in bytes.
const MeshRootKeySize = 32

// OwnerKey is a mesh owner's secrets, kept in a file on the operator's machine and never in the
// database: the ed25519 key that signs invites and the mesh root key that invites hand to
// members (clients encrypt group messages with it). The database holds only the public key.
type OwnerKey struct {
	// Path is the file the key was loaded from or written to.
	Path       string
	PrivateKey ed25519.PrivateKey
	// MeshRootKey is 32 random bytes, base64url without padding, exactly as invites carry it.
	MeshRootKey string
	CreatedAt   time.Time
}

// ownerKeyFile is the on-disk form. The secret key is the 64-byte ed25519 private key in hex
// (seed then public key), the form libsodium and claudemesh's scripts use.
type ownerKeyFile struct {
	Version     int       `json:"version"`
	OwnerPubkey string    `json:"owner_pubkey"`
	OwnerSecret string    `json:"owner_secret_key"`
	MeshRootKey string    `json:"mesh_root_key"`
	CreatedAt   time.Time `json:"created_at"`
}

// Pubkey is the owner's public key, lowercase hex.
func (k *OwnerKey) Pubkey() string {
	return protocol.PubkeyHex(k.PrivateKey.Public().(ed25519.PublicKey))
}

// NewOwnerKey generates a fresh owner key and mesh root key (not yet written anywhere).
func NewOwnerKey() (*OwnerKey, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate owner key: %w", err)
	}
	root := make([]byte, MeshRootKeySize)
	if _, err := rand.Read(root); err != nil {
		return nil, fmt.Errorf("generate mesh root key: %w", err)
	}
	return &OwnerKey{
		PrivateKey:  priv,
		MeshRootKey: base64.RawURLEncoding.EncodeToString(root),
		CreatedAt:   time.Now().UTC().Truncate(time.Second),
	}, nil
}

// LoadOrCreateOwnerKey loads the owner key file at path, or creates it (mode 0600, parent
// directories 0700) with a fresh key when it does not exist. created reports which happened.
func LoadOrCreateOwnerKey(path string) (key *OwnerKey, created bool, err error) {
	key, err = LoadOwnerKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return key, false, err
	}
	key, err = NewOwnerKey()
	if err != nil {
		return nil, false, err
	}
	if err := key.write(path); err != nil {
		if errors.Is(err, fs.ErrExist) { // another process created it meanwhile: use theirs
			key, err = LoadOwnerKey(path)
			return key, false, err
		}
		return nil, false, err
	}
	return key, true, nil
}

// LoadOwnerKey reads and checks an owner key file. It refuses a file other users can read,
// as ssh does with private keys.
func LoadOwnerKey(path string) (*OwnerKey, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load owner key: %w", err)
	}
	defer f.Close()
	if runtime.GOOS != "windows" {
		st, err := f.Stat()
		if err != nil {
			return nil, fmt.Errorf("load owner key: %w", err)
		}
		if st.Mode().Perm()&0o077 != 0 {
			return nil, fmt.Errorf("load owner key: %w: %s has mode %04o; run `chmod 600 %s`",
				ErrOwnerKeyNotSecret, path, st.Mode().Perm(), path)
		}
	}
	var kf ownerKeyFile
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&kf); err != nil {
		return nil, fmt.Errorf("load owner key: %w: %s: %v", ErrInvalidOwnerKey, path, err)
	}
	key, err := kf.key()
	if err != nil {
		return nil, fmt.Errorf("load owner key: %w: %s: %v", ErrInvalidOwnerKey, path, err)
	}
	key.Path = path
	return key, nil
}

func (kf *ownerKeyFile) key() (*OwnerKey, error) {
	if kf.Version != OwnerKeyVersion {
		return nil, fmt.Errorf("unsupported version %d", kf.Version)
	}
	secret, err := hex.DecodeString(kf.OwnerSecret)
	if err != nil || len(secret) != ed25519.PrivateKeySize {
		return nil, errors.New("owner_secret_key: want 128 hex characters")
	}
	// Rebuild from the seed so a file whose public half was altered cannot sign as another key.
	priv := ed25519.NewKeyFromSeed(secret[:ed25519.SeedSize])
	key := &OwnerKey{PrivateKey: priv, MeshRootKey: kf.MeshRootKey, CreatedAt: kf.CreatedAt}
	if pub, err := protocol.NormalizePubkey(kf.OwnerPubkey); err != nil || pub != key.Pubkey() ||
		hex.EncodeToString(secret[ed25519.SeedSize:]) != pub {
		return nil, errors.New("owner_pubkey does not match owner_secret_key")
	}
	root, err := base64.RawURLEncoding.DecodeString(kf.MeshRootKey)
	if err != nil || len(root) != MeshRootKeySize {
		return nil, fmt.Errorf("mesh_root_key: want %d bytes, base64url without padding", MeshRootKeySize)
	}
	return key, nil
}

// write creates path exclusively with mode 0600; it never overwrites an existing key.
func (k *OwnerKey) write(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("write owner key: %w", err)
	}
	b, err := json.MarshalIndent(ownerKeyFile{
		Version:     OwnerKeyVersion,
		OwnerPubkey: k.Pubkey(),
		OwnerSecret: hex.EncodeToString(k.PrivateKey),
		MeshRootKey: k.MeshRootKey,
		CreatedAt:   k.CreatedAt,
	}, "", "  ")
	if err != nil {
		return fmt.Errorf("write owner key: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("write owner key: %w", err)
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path) // a half-written key is worse than none
		return fmt.Errorf("write owner key: %w", err)
	}
	k.Path = path
	return nil
}
