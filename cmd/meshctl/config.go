package main

// The config directory: identity.json (the ed25519 key) and meshes.json (one entry per joined
// mesh, with its mesh root key). Both hold secrets: files are 0600 in a 0700 directory,
// written atomically, and refused when other users can read them, as ssh does.

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/claudemesh/broker/protocol"
)

const (
	identityFileName = "identity.json"
	meshesFileName   = "meshes.json"
	configVersion    = 1
)

// errNoIdentity: the config directory holds no identity yet.
var errNoIdentity = errors.New("no identity yet: run `meshctl init` first")

// homeDir returns the config directory.
func (a *app) homeDir() (string, error) {
	if a.home != "" {
		return a.home, nil
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		return "", fmt.Errorf("no config directory: set MESHCTL_HOME or --home (%w)", err)
	}
	return filepath.Join(dir, "meshctl"), nil
}

// Identity is the peer's ed25519 key. The secret is the 64-byte private key (seed then
// public key) in hex, the form libsodium and claudemesh use.
type Identity struct {
	Version     int       `json:"version"`
	Pubkey      string    `json:"pubkey"`
	SecretKey   string    `json:"secret_key"`
	DisplayName string    `json:"display_name,omitempty"`
	CreatedAt   time.Time `json:"created_at"`

	key ed25519.PrivateKey
}

// PrivateKey is the identity's signing key.
func (id *Identity) PrivateKey() ed25519.PrivateKey { return id.key }

func newIdentity(name string) (*Identity, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate identity: %w", err)
	}
	return &Identity{
		Version: configVersion, Pubkey: protocol.PubkeyHex(pub), SecretKey: hex.EncodeToString(priv),
		DisplayName: name, CreatedAt: time.Now().UTC().Truncate(time.Second), key: priv,
	}, nil
}

func (a *app) identityPath() (string, error) {
	home, err := a.homeDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(home, identityFileName), nil
}

func (a *app) loadIdentity() (*Identity, error) {
	path, err := a.identityPath()
	if err != nil {
		return nil, err
	}
	b, err := readSecretFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, errNoIdentity
	}
	if err != nil {
		return nil, err
	}
	var id Identity
	if err := json.Unmarshal(b, &id); err != nil {
		return nil, fmt.Errorf("identity %s: %w", path, err)
	}
	if id.Version != configVersion {
		return nil, fmt.Errorf("identity %s: unsupported version %d", path, id.Version)
	}
	secret, err := hex.DecodeString(id.SecretKey)
	if err != nil || len(secret) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("identity %s: secret_key must be 128 hex characters", path)
	}
	// Rebuilt from the seed, so an edited public half cannot make us sign as another key.
	id.key = ed25519.NewKeyFromSeed(secret[:ed25519.SeedSize])
	clear(secret)
	if pub := protocol.PubkeyHex(id.key.Public().(ed25519.PublicKey)); !strings.EqualFold(pub, id.Pubkey) {
		return nil, fmt.Errorf("identity %s: pubkey does not match secret_key", path)
	}
	id.Pubkey = strings.ToLower(id.Pubkey)
	return &id, nil
}

func (a *app) saveIdentity(id *Identity) (string, error) {
	path, err := a.identityPath()
	if err != nil {
		return "", err
	}
	b, err := json.MarshalIndent(id, "", "  ")
	if err != nil {
		return "", err
	}
	return path, writeSecretFile(path, append(b, '\n'))
}

// MeshEntry is one joined mesh. MeshRootKey is a secret: never printed.
type MeshEntry struct {
	MeshID      string    `json:"mesh_id"`
	Slug        string    `json:"slug"`
	MemberID    string    `json:"member_id"`
	BrokerURL   string    `json:"broker_url"`
	MeshRootKey string    `json:"mesh_root_key,omitempty"`
	Role        string    `json:"role,omitempty"`
	DisplayName string    `json:"display_name,omitempty"`
	JoinedAt    time.Time `json:"joined_at"`
}

type meshesDoc struct {
	Version int         `json:"version"`
	Meshes  []MeshEntry `json:"meshes"`
}

func (a *app) meshesPath() (string, error) {
	home, err := a.homeDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(home, meshesFileName), nil
}

// loadMeshes returns the joined meshes; none when the file does not exist yet.
func (a *app) loadMeshes() ([]MeshEntry, error) {
	path, err := a.meshesPath()
	if err != nil {
		return nil, err
	}
	b, err := readSecretFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var doc meshesDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if doc.Version != configVersion {
		return nil, fmt.Errorf("%s: unsupported version %d", path, doc.Version)
	}
	return doc.Meshes, nil
}

// meshByID returns the joined mesh with that id, or nil.
func (a *app) meshByID(id string) (*MeshEntry, error) {
	meshes, err := a.loadMeshes()
	if err != nil {
		return nil, err
	}
	for i := range meshes {
		if meshes[i].MeshID == id {
			return &meshes[i], nil
		}
	}
	return nil, nil
}

// saveMesh adds e, replacing an entry of the same mesh.
func (a *app) saveMesh(e MeshEntry) error {
	meshes, err := a.loadMeshes()
	if err != nil {
		return err
	}
	replaced := false
	for i := range meshes {
		if meshes[i].MeshID == e.MeshID {
			meshes[i], replaced = e, true
		}
	}
	if !replaced {
		meshes = append(meshes, e)
	}
	path, err := a.meshesPath()
	if err != nil {
		return err
	}
	b, err := json.MarshalIndent(meshesDoc{Version: configVersion, Meshes: meshes}, "", "  ")
	if err != nil {
		return err
	}
	return writeSecretFile(path, append(b, '\n'))
}

// selectMesh picks the mesh a command talks to: --mesh (slug or id), else the only one.
func (a *app) selectMesh() (*MeshEntry, error) {
	meshes, err := a.loadMeshes()
	if err != nil {
		return nil, err
	}
	if a.meshRef != "" {
		for i := range meshes {
			if meshes[i].Slug == a.meshRef || meshes[i].MeshID == a.meshRef {
				return &meshes[i], nil
			}
		}
		return nil, fmt.Errorf("not a member of mesh %q (see `meshctl meshes`)", a.meshRef)
	}
	switch len(meshes) {
	case 0:
		return nil, errors.New("not in any mesh yet: run `meshctl join <invite link>`")
	case 1:
		return &meshes[0], nil
	}
	slugs := make([]string, len(meshes))
	for i, m := range meshes {
		slugs[i] = m.Slug
	}
	return nil, fmt.Errorf("you joined several meshes (%s): choose one with --mesh", strings.Join(slugs, ", "))
}

// readSecretFile reads a file that must not be readable by other users.
func readSecretFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if runtime.GOOS != "windows" {
		st, err := f.Stat()
		if err != nil {
			return nil, err
		}
		if st.Mode().Perm()&0o077 != 0 {
			return nil, fmt.Errorf("%s has mode %04o and holds secrets: run `chmod 600 %s`", path, st.Mode().Perm(), path)
		}
	}
	b, err := readAllLimit(f, 16<<20)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return b, nil
}

// writeSecretFile replaces path atomically with a 0600 file, creating its directory 0700.
func writeSecretFile(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*") // 0600
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	name := tmp.Name()
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(0o600)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(name, path)
	}
	if err != nil {
		_ = os.Remove(name)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
