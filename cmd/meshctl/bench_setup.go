package main

// Bench members are created straight in the broker's database through the membership
// package (the operator's AddMember, as `broker member add` does): going through N invites
// and /join calls would measure the join path, not messaging, and need N owner signatures.
// A throwaway mesh "bench-<random>" is created unless --mesh-slug names an existing one.
// Without access to the database (a deployed cluster, or a broker whose schema this meshctl's
// membership code does not match), --invite makes each member join through /join instead.

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"

	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/client/e2e"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/protocol"
)

type benchMember struct {
	id   string
	name string
	key  ed25519.PrivateKey
	pub  string
}

type benchMesh struct {
	id, slug string
	created  bool
	root     *e2e.RootKey
	members  []benchMember
}

type benchSetup struct {
	dbURL    string
	meshSlug string // existing mesh; "" creates a throwaway one
	ownerKey string // owner key file: its mesh root key encrypts broadcasts
	invite   string // an invite link: members join with it instead of being added in the database
	members  int
	capacity int // max_peers of a throwaway mesh
}

// setupBenchMesh creates the mesh (unless it exists) and the members.
func setupBenchMesh(ctx context.Context, s benchSetup) (*benchMesh, error) {
	if s.invite != "" {
		return joinBenchMesh(ctx, s)
	}
	meshes, err := setupBenchMeshes(ctx, s, 1)
	if err != nil {
		return nil, err
	}
	return meshes[0], nil
}

// setupBenchMeshes creates n throwaway meshes of s.members members and s.capacity live
// sessions each (or, for n = 1, uses the existing --mesh-slug), over one pool.
func setupBenchMeshes(ctx context.Context, s benchSetup, n int) ([]*benchMesh, error) {
	if s.dbURL == "" {
		return nil, errors.New("bench needs the broker's database to create its members: pass --setup-db or set DATABASE_URL")
	}
	if n > 1 && (s.meshSlug != "" || s.invite != "") {
		return nil, errors.New("bench: several meshes are created in the database: drop --mesh-slug and --invite")
	}
	pool, err := db.NewPool(ctx, s.dbURL, db.PoolConfig{MaxConns: 4, AppName: "meshctl-bench"})
	if err != nil {
		return nil, fmt.Errorf("bench setup: %w", err)
	}
	defer pool.Close()
	svc := membership.New(pool, membership.Config{})

	var root *e2e.RootKey
	if s.ownerKey != "" {
		k, err := membership.LoadOwnerKey(s.ownerKey)
		if err != nil {
			return nil, err
		}
		if root, err = e2e.ParseRootKey(k.MeshRootKey); err != nil {
			return nil, fmt.Errorf("owner key %s: %w", s.ownerKey, err)
		}
	} else if root, _, err = e2e.NewRootKey(); err != nil {
		return nil, err
	}
	out := make([]*benchMesh, n)
	for i := range out {
		bm := &benchMesh{root: root}
		if s.meshSlug != "" {
			m, err := svc.Mesh(ctx, s.meshSlug)
			if err != nil {
				return nil, err
			}
			bm.id, bm.slug = m.ID, m.Slug
		} else {
			// The owner of a throwaway mesh never signs anything: its private key is dropped.
			ownerPub, _, err := ed25519.GenerateKey(rand.Reader)
			if err != nil {
				return nil, err
			}
			var suffix [4]byte
			_, _ = rand.Read(suffix[:])
			m, _, err := svc.CreateMesh(ctx, membership.CreateMeshParams{
				Slug: "bench-" + hex.EncodeToString(suffix[:]), OwnerPubkey: protocol.PubkeyHex(ownerPub),
				OwnerName: "bench-owner", MaxPeers: s.capacity,
			})
			if err != nil {
				return nil, err
			}
			bm.id, bm.slug, bm.created = m.ID, m.Slug, true
		}
		if err := bm.addMembers(s.members, func(m *benchMember) (string, error) {
			mb, err := svc.AddMember(ctx, membership.AddMemberParams{Mesh: bm.id, Pubkey: m.pub, DisplayName: m.name})
			return mb.ID, err
		}); err != nil {
			return nil, err
		}
		out[i] = bm
	}
	return out, nil
}

// joinBenchMesh makes the members join the invite's mesh through its broker's /join.
func joinBenchMesh(ctx context.Context, s benchSetup) (*benchMesh, error) {
	token, p, err := protocol.ParseInviteLink(s.invite)
	if err != nil {
		return nil, fmt.Errorf("--invite: %w", err)
	}
	if err := protocol.VerifyInvite(p); err != nil {
		return nil, errors.New("--invite: its signature does not verify (was it altered or truncated?)")
	}
	base, err := httpBaseURL(p.BrokerURL)
	if err != nil {
		return nil, fmt.Errorf("--invite: %w", err)
	}
	bm := &benchMesh{id: p.MeshID, slug: p.MeshSlug}
	if p.MeshRootKey != "" {
		if bm.root, err = e2e.ParseRootKey(p.MeshRootKey); err != nil {
			return nil, fmt.Errorf("--invite: mesh root key: %w", err)
		}
	} else if bm.root, _, err = e2e.NewRootKey(); err != nil {
		return nil, err
	}
	if err := bm.addMembers(s.members, func(m *benchMember) (string, error) {
		res, err := postJoin(ctx, base+protocol.PathJoin, protocol.JoinRequest{
			InviteToken: token, InvitePayload: *p, PeerPubkey: m.pub, DisplayName: m.name,
		})
		return res.MemberID, err
	}); err != nil {
		return nil, err
	}
	return bm, nil
}

// addMembers makes n members with fresh keys and registers each with add, which returns its
// member id.
func (bm *benchMesh) addMembers(n int, add func(*benchMember) (string, error)) error {
	bm.members = make([]benchMember, n)
	for i := range bm.members {
		pub, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return err
		}
		bm.members[i] = benchMember{name: fmt.Sprintf("bench-%d", i), key: priv, pub: protocol.PubkeyHex(pub)}
	}
	// A few at a time: each is one small transaction, and the audit chain serialises them
	// per mesh anyway.
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for w := range errs {
		wg.Go(func() {
			for i := w; i < len(bm.members); i += len(errs) {
				m := &bm.members[i]
				id, err := add(m)
				if err != nil {
					errs[w] = fmt.Errorf("add bench member %d: %w", i, err)
					return
				}
				m.id = id
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}
