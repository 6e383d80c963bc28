package membership_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

func TestOwnerKeyFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "keys", "owner.json")
	key, created, err := membership.LoadOrCreateOwnerKey(path)
	require.NoError(t, err)
	require.True(t, created)
	st, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	require.Len(t, key.Pubkey(), 64)
	require.Len(t, key.MeshRootKey, 43, "32 bytes, base64url without padding")

	again, created, err := membership.LoadOrCreateOwnerKey(path)
	require.NoError(t, err)
	require.False(t, created, "an existing key is loaded, never replaced")
	require.Equal(t, key.Pubkey(), again.Pubkey())
	require.Equal(t, key.MeshRootKey, again.MeshRootKey)

	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Contains(t, string(raw), `"owner_pubkey": "`+key.Pubkey()+`"`)

	require.NoError(t, os.Chmod(path, 0o644))
	_, err = membership.LoadOwnerKey(path)
	require.ErrorIs(t, err, membership.ErrOwnerKeyNotSecret)
	require.NoError(t, os.Chmod(path, 0o600))

	// A file whose public key was swapped for another cannot sign as that key.
	other := newPubkey(t)
	require.NoError(t, os.WriteFile(path, []byte(strings.Replace(string(raw), key.Pubkey(), other, 1)), 0o600))
	_, err = membership.LoadOwnerKey(path)
	require.ErrorIs(t, err, membership.ErrInvalidOwnerKey)

	_, err = membership.LoadOwnerKey(filepath.Join(t.TempDir(), "missing.json"))
	require.ErrorIs(t, err, os.ErrNotExist)
}

func TestCreateAndListMeshes(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	m, key := f.mesh("demo")
	require.Equal(t, "demo", m.Name, "the name defaults to the slug")
	require.Equal(t, key.Pubkey(), m.OwnerPubkey)

	_, _, err := f.svc.CreateMesh(f.ctx, membership.CreateMeshParams{Slug: "demo", OwnerPubkey: key.Pubkey()})
	require.ErrorIs(t, err, membership.ErrMeshExists)
	_, _, err = f.svc.CreateMesh(f.ctx, membership.CreateMeshParams{Slug: "Not A Slug", OwnerPubkey: key.Pubkey()})
	require.ErrorIs(t, err, membership.ErrInvalidSlug)
	_, _, err = f.svc.CreateMesh(f.ctx, membership.CreateMeshParams{Slug: "x", OwnerPubkey: "abc"})
	require.ErrorIs(t, err, membership.ErrInvalidPubkey)

	// An uppercase owner key is stored lowercase.
	_, key2 := f.mesh("second")
	m2, owner, err := f.svc.CreateMesh(f.ctx, membership.CreateMeshParams{Slug: "third", Name: "Third", OwnerPubkey: strings.ToUpper(key2.Pubkey()), MaxPeers: 5})
	require.NoError(t, err)
	require.Equal(t, key2.Pubkey(), m2.OwnerPubkey)
	require.Equal(t, protocol.RoleAdmin, owner.Role)
	require.Equal(t, membership.DefaultOwnerName, owner.DisplayName)

	meshes, err := f.svc.Meshes(f.ctx)
	require.NoError(t, err)
	require.Len(t, meshes, 3)
	require.Equal(t, []string{"demo", "second", "third"}, []string{meshes[0].Slug, meshes[1].Slug, meshes[2].Slug})
	require.Equal(t, 1, meshes[2].LiveMembers)
	require.Equal(t, 5, meshes[2].MaxPeers)

	byID, err := f.svc.Mesh(f.ctx, m2.ID)
	require.NoError(t, err)
	require.Equal(t, "third", byID.Slug)
	_, err = f.svc.Mesh(f.ctx, "nope")
	require.ErrorIs(t, err, membership.ErrMeshNotFound)

	members, err := f.svc.Members(f.ctx, "demo")
	require.NoError(t, err)
	require.Len(t, members, 1)
	require.Equal(t, key.Pubkey(), members[0].Pubkey)
	require.Equal(t, protocol.RoleAdmin, members[0].Role)

	n, err := audit.Verify(f.ctx, f.pool, m.ID)
	require.NoError(t, err)
	require.Equal(t, 2, n, "mesh_created and the owner's member_added")
	tail, err := audit.Tail(f.ctx, f.pool, m.ID, 10)
	require.NoError(t, err)
	require.Equal(t, audit.MeshCreated, tail[0].Type)
	require.Equal(t, audit.MemberAdded, tail[1].Type)
}

func TestJoinEnrollsThenAlreadyMember(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	m, key := f.mesh("demo")
	inv := f.invite("demo", key, 1, protocol.RoleAdmin)
	require.True(t, strings.HasPrefix(inv.Link, "ic://join/"))
	pub := newPubkey(t)

	res, err := f.svc.Join(f.ctx, joinRequest(t, inv.Link, pub, "alice"))
	require.NoError(t, err)
	require.False(t, res.AlreadyMember)
	require.Equal(t, m.ID, res.MeshID)
	require.Equal(t, 1, f.usedCount(inv.ID))

	// Same key again, in uppercase, on the now exhausted invite: a member, and no use taken.
	again, err := f.svc.Join(f.ctx, joinRequest(t, inv.Link, strings.ToUpper(pub), "alice"))
	require.NoError(t, err)
	require.True(t, again.AlreadyMember)
	require.Equal(t, res.MemberID, again.MemberID)
	require.Equal(t, 1, f.usedCount(inv.ID))

	members, err := f.svc.Members(f.ctx, "demo")
	require.NoError(t, err)
	require.Len(t, members, 2)
	joined := members[1]
	require.Equal(t, pub, joined.Pubkey)
	require.Equal(t, "alice", joined.DisplayName)
	require.Equal(t, protocol.RoleAdmin, joined.Role, "the payload's role")
	require.Equal(t, inv.ID, joined.InviteID)

	n, err := audit.Verify(f.ctx, f.pool, m.ID)
	require.NoError(t, err)
	require.Equal(t, 4, n)
	tail, err := audit.Tail(f.ctx, f.pool, m.ID, 1)
	require.NoError(t, err)
	require.Equal(t, audit.MemberJoined, tail[0].Type)
	require.Equal(t, pub, tail[0].Actor)
	require.Contains(t, string(tail[0].Data), inv.ID)
}

// A session's key, which every member sees in list_peers, can't be taken as a member key by
// whoever holds an invite: direct sends to that key would reach the newcomer instead of the
// session. The join is refused and the invite's use is not taken.
func TestJoinRefusesASessionKey(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	m, key := f.mesh("demo")
	owner, err := f.svc.Members(f.ctx, "demo")
	require.NoError(t, err)
	sessionKey := newPubkey(t)
	_, err = f.pool.Exec(f.ctx, `INSERT INTO claudemesh.session_key (mesh_id, session_pubkey, member_id) VALUES ($1, $2, $3)`,
		m.ID, sessionKey, owner[0].ID)
	require.NoError(t, err)
	inv := f.invite("demo", key, 1, "")
	_, err = f.svc.Join(f.ctx, joinRequest(t, inv.Link, strings.ToUpper(sessionKey), "mallory"))
	var je *membership.JoinError
	require.ErrorAs(t, err, &je)
	require.Equal(t, protocol.JoinErrMemberInsertFailed, je.Code)
	require.Equal(t, 0, f.usedCount(inv.ID))
	_, err = f.svc.Join(f.ctx, joinRequest(t, inv.Link, newPubkey(t), "carol"))
	require.NoError(t, err, "another key joins on the same invite")
}

// The operator's `member add` refuses a session key as /join does: asked to add "my key" by a
// member who gave another's session key (shown to every member by list_peers), it made that
// key a member's, and direct sends meant for the session went to the new member instead.
func TestAddMemberRefusesASessionKey(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	m, _ := f.mesh("demo")
	owner, err := f.svc.Members(f.ctx, "demo")
	require.NoError(t, err)
	sessionKey := newPubkey(t)
	_, err = f.pool.Exec(f.ctx, `INSERT INTO claudemesh.session_key (mesh_id, session_pubkey, member_id) VALUES ($1, $2, $3)`,
		m.ID, sessionKey, owner[0].ID)
	require.NoError(t, err)
	_, err = f.svc.AddMember(f.ctx, membership.AddMemberParams{Mesh: "demo", Pubkey: strings.ToUpper(sessionKey), DisplayName: "mallory"})
	require.ErrorIs(t, err, membership.ErrKeyIsSessionKey)
	members, err := f.svc.Members(f.ctx, "demo")
	require.NoError(t, err)
	require.Len(t, members, 1, "nobody added")

	// A member's own key, which it used as its session key too, is no other's: once revoked,
	// the operator adds it again.
	own := newPubkey(t)
	carol, err := f.svc.AddMember(f.ctx, membership.AddMemberParams{Mesh: "demo", Pubkey: own, DisplayName: "carol"})
	require.NoError(t, err)
	_, err = f.pool.Exec(f.ctx, `INSERT INTO claudemesh.session_key (mesh_id, session_pubkey, member_id) VALUES ($1, $2, $3)`,
		m.ID, own, carol.ID)
	require.NoError(t, err)
	_, err = f.svc.RevokeMember(f.ctx, "demo", own)
	require.NoError(t, err)
	_, err = f.svc.AddMember(f.ctx, membership.AddMemberParams{Mesh: "demo", Pubkey: own, DisplayName: "carol"})
	require.NoError(t, err)
}

// Every /join refusal, each from the state that causes it.
func TestJoinErrors(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	m, key := f.mesh("demo")
	inv := f.invite("demo", key, 1, protocol.RoleMember)
	valid := joinRequest(t, inv.Link, newPubkey(t), "bob")

	// resign re-signs a modified payload with the owner key, so only the field under test is wrong.
	resign := func(req protocol.JoinRequest, k *membership.OwnerKey, edit func(*protocol.InvitePayload)) protocol.JoinRequest {
		edit(&req.InvitePayload)
		req.InvitePayload.OwnerPubkey = k.Pubkey()
		require.NoError(t, protocol.SignInvite(k.PrivateKey, &req.InvitePayload))
		return req
	}
	tamper := func(edit func(*protocol.InvitePayload)) protocol.JoinRequest {
		req := valid
		edit(&req.InvitePayload)
		return req
	}

	t.Run("tampered payload", func(t *testing.T) {
		for name, req := range map[string]protocol.JoinRequest{
			"role":          tamper(func(p *protocol.InvitePayload) { p.Role = protocol.RoleAdmin }),
			"expires_at":    tamper(func(p *protocol.InvitePayload) { p.ExpiresAt += 3600 }),
			"mesh_root_key": tamper(func(p *protocol.InvitePayload) { p.MeshRootKey = flipFirst(p.MeshRootKey) }),
			"broker_url":    tamper(func(p *protocol.InvitePayload) { p.BrokerURL = "wss://evil.example/ws" }),
			"owner_pubkey":  tamper(func(p *protocol.InvitePayload) { p.OwnerPubkey = newPubkey(t) }),
			"signature":     tamper(func(p *protocol.InvitePayload) { p.Signature = strings.Repeat("ab", 64) }),
			"bad hex":       tamper(func(p *protocol.InvitePayload) { p.Signature = "zz" }),
		} {
			t.Run(name, func(t *testing.T) {
				_, err := f.svc.Join(f.ctx, req)
				requireJoinError(t, err, protocol.JoinErrInviteBadSignature)
			})
		}
		// Uppercase hex verifies: the owner key is signed as written and compared
		// case-insensitively with the mesh's.
		up := valid
		up.InvitePayload.OwnerPubkey = strings.ToUpper(key.Pubkey())
		require.NoError(t, protocol.SignInvite(key.PrivateKey, &up.InvitePayload))
		up.InvitePayload.Signature = strings.ToUpper(up.InvitePayload.Signature)
		_, err := f.svc.Join(f.ctx, up)
		require.NoError(t, err)
	})

	t.Run("mesh_not_found", func(t *testing.T) {
		req := resign(valid, key, func(p *protocol.InvitePayload) { p.MeshID = "00000000-0000-0000-0000-000000000000" })
		_, err := f.svc.Join(f.ctx, req)
		requireJoinError(t, err, protocol.JoinErrMeshNotFound)

		a, akey := f.mesh("archived")
		ainv := f.invite("archived", akey, 5, "")
		_, err = f.pool.Exec(f.ctx, `UPDATE claudemesh.mesh SET archived_at = now() WHERE id = $1`, a.ID)
		require.NoError(t, err)
		_, err = f.svc.Join(f.ctx, joinRequest(t, ainv.Link, newPubkey(t), "x"))
		requireJoinError(t, err, protocol.JoinErrMeshNotFound)
	})

	t.Run("invite_owner_mismatch", func(t *testing.T) {
		other, err := membership.NewOwnerKey()
		require.NoError(t, err)
		req := resign(valid, other, func(*protocol.InvitePayload) {})
		_, err = f.svc.Join(f.ctx, req)
		requireJoinError(t, err, protocol.JoinErrInviteOwnerMismatch)
	})

	t.Run("invite_not_found", func(t *testing.T) {
		req := valid
		req.InviteToken += "x"
		_, err := f.svc.Join(f.ctx, req)
		requireJoinError(t, err, protocol.JoinErrInviteNotFound)
	})

	t.Run("invite_mesh_mismatch", func(t *testing.T) {
		// A second mesh owned by the same key: its invite's token with the first mesh's payload.
		_, _, err := f.svc.CreateMesh(f.ctx, membership.CreateMeshParams{Slug: "sibling", OwnerPubkey: key.Pubkey()})
		require.NoError(t, err)
		sib := f.invite("sibling", key, 5, "")
		req := valid
		req.InviteToken = strings.TrimPrefix(sib.Link, protocol.InviteLinkPrefix)
		_, err = f.svc.Join(f.ctx, req)
		requireJoinError(t, err, protocol.JoinErrInviteMeshMismatch)
	})

	t.Run("invite_revoked", func(t *testing.T) {
		rinv := f.invite("demo", key, 5, "")
		_, err := f.svc.RevokeInvite(f.ctx, rinv.Link)
		require.NoError(t, err)
		_, err = f.svc.Join(f.ctx, joinRequest(t, rinv.Link, newPubkey(t), "x"))
		requireJoinError(t, err, protocol.JoinErrInviteRevoked)
	})

	t.Run("invite_expired", func(t *testing.T) {
		past := membership.New(f.pool, membership.Config{Now: func() time.Time { return time.Now().Add(-48 * time.Hour) }})
		einv, err := past.CreateInvite(f.ctx, membership.CreateInviteParams{Mesh: "demo", Key: key, BrokerURL: testBrokerURL})
		require.NoError(t, err)
		require.True(t, einv.ExpiresAt.Before(time.Now()))
		_, err = f.svc.Join(f.ctx, joinRequest(t, einv.Link, newPubkey(t), "x"))
		requireJoinError(t, err, protocol.JoinErrInviteExpired)
	})

	// A token is bound to the payload its invite was created with: another invite's payload,
	// though validly signed by the owner, does not ride on it.
	t.Run("invite_payload_mismatch", func(t *testing.T) {
		member := f.invite("demo", key, 5, protocol.RoleMember)
		admin := f.invite("demo", key, 5, protocol.RoleAdmin)
		past := membership.New(f.pool, membership.Config{Now: func() time.Time { return time.Now().Add(-48 * time.Hour) }})
		expired, err := past.CreateInvite(f.ctx, membership.CreateInviteParams{Mesh: "demo", Key: key, BrokerURL: testBrokerURL})
		require.NoError(t, err)
		for name, pair := range map[string][2]membership.Invite{
			"member token, admin payload": {member, admin},
			"live token, expired payload": {member, expired},
			"admin token, member payload": {admin, member},
		} {
			t.Run(name, func(t *testing.T) {
				mixed := joinRequest(t, pair[1].Link, newPubkey(t), "x")
				mixed.InviteToken = strings.TrimPrefix(pair[0].Link, protocol.InviteLinkPrefix)
				_, err := f.svc.Join(f.ctx, mixed)
				requireJoinError(t, err, protocol.JoinErrInvitePayloadMismatch)
			})
		}
		require.Equal(t, 0, f.usedCount(member.ID), "no use taken")
		_, err = f.svc.Join(f.ctx, joinRequest(t, admin.Link, newPubkey(t), "x"))
		require.NoError(t, err, "the admin invite still works with its own payload")
	})

	t.Run("invite_exhausted", func(t *testing.T) {
		xinv := f.invite("demo", key, 2, "")
		for range 2 {
			_, err := f.svc.Join(f.ctx, joinRequest(t, xinv.Link, newPubkey(t), "x"))
			require.NoError(t, err)
		}
		_, err := f.svc.Join(f.ctx, joinRequest(t, xinv.Link, newPubkey(t), "x"))
		requireJoinError(t, err, protocol.JoinErrInviteExhausted)
		require.Equal(t, 2, f.usedCount(xinv.ID))
	})

	t.Run("member_insert_failed", func(t *testing.T) {
		// A trigger makes the insert fail for one display name; the use must be given back.
		_, err := f.pool.Exec(f.ctx, `
			CREATE FUNCTION claudemesh.test_fail_insert() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN RAISE EXCEPTION 'insert refused by test'; END $$;
			CREATE TRIGGER test_fail_insert BEFORE INSERT ON claudemesh.member
			FOR EACH ROW WHEN (NEW.display_name = 'fail-me') EXECUTE FUNCTION claudemesh.test_fail_insert();`)
		require.NoError(t, err)
		finv := f.invite("demo", key, 1, "")
		_, err = f.svc.Join(f.ctx, joinRequest(t, finv.Link, newPubkey(t), "fail-me"))
		requireJoinError(t, err, protocol.JoinErrMemberInsertFailed)
		require.Equal(t, 0, f.usedCount(finv.ID), "a failed insert does not use the invite")
		_, err = f.svc.Join(f.ctx, joinRequest(t, finv.Link, newPubkey(t), "ok"))
		require.NoError(t, err)
	})

	t.Run("mesh_missing_owner_key", func(t *testing.T) {
		// The schema forbids an empty owner key; drop the check in this test's database to reach
		// the code path a legacy or hand-edited row would take.
		om, okey := f.mesh("ownerless")
		oinv := f.invite("ownerless", okey, 1, "")
		_, err := f.pool.Exec(f.ctx, `ALTER TABLE claudemesh.mesh DROP CONSTRAINT mesh_owner_pubkey_check;
			UPDATE claudemesh.mesh SET owner_pubkey = '' WHERE id = '`+om.ID+`'`)
		require.NoError(t, err)
		_, err = f.svc.Join(f.ctx, joinRequest(t, oinv.Link, newPubkey(t), "x"))
		requireJoinError(t, err, protocol.JoinErrMeshMissingOwnerKey)
	})

	n, err := audit.Verify(f.ctx, f.pool, m.ID)
	require.NoError(t, err)
	require.Positive(t, n)
}

// Checks run in protocol.md's order: with several faults, the first one is reported.
func TestJoinCheckOrder(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	_, key := f.mesh("demo")
	inv := f.invite("demo", key, 1, "")
	_, err := f.svc.RevokeInvite(f.ctx, inv.ID)
	require.NoError(t, err)
	req := joinRequest(t, inv.Link, newPubkey(t), "x")

	// Revoked invite and unknown token: the token is looked up first.
	unknown := req
	unknown.InviteToken = "nope"
	_, err = f.svc.Join(f.ctx, unknown)
	requireJoinError(t, err, protocol.JoinErrInviteNotFound)

	// Revoked invite and bad signature: the signature comes first.
	bad := req
	bad.InvitePayload.Role = protocol.RoleAdmin
	_, err = f.svc.Join(f.ctx, bad)
	requireJoinError(t, err, protocol.JoinErrInviteBadSignature)

	// A live member joining with a revoked invite is still refused: revocation is checked first.
	members, err := f.svc.Members(f.ctx, "demo")
	require.NoError(t, err)
	owner := req
	owner.PeerPubkey = members[0].Pubkey
	_, err = f.svc.Join(f.ctx, owner)
	requireJoinError(t, err, protocol.JoinErrInviteRevoked)
}

func TestConcurrentJoinsOnSingleUseInvite(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	m, key := f.mesh("demo")
	inv := f.invite("demo", key, 1, "")

	const n = 20
	var wg sync.WaitGroup
	results := make([]error, n)
	start := make(chan struct{})
	for i := range n {
		req := joinRequest(t, inv.Link, newPubkey(t), "racer")
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			_, results[i] = f.svc.Join(f.ctx, req)
		}()
	}
	close(start)
	wg.Wait()
	wins := 0
	for _, err := range results {
		if err == nil {
			wins++
			continue
		}
		requireJoinError(t, err, protocol.JoinErrInviteExhausted)
	}
	require.Equal(t, 1, wins)
	require.Equal(t, 1, f.usedCount(inv.ID))
	members, err := f.svc.Members(f.ctx, "demo")
	require.NoError(t, err)
	require.Len(t, members, 2, "the owner and the one winner")
	_, err = audit.Verify(f.ctx, f.pool, m.ID)
	require.NoError(t, err)
}

// The same key joining many times at once: one member, one use, everyone told the same id.
func TestConcurrentJoinsSameKey(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	_, key := f.mesh("demo")
	inv := f.invite("demo", key, 10, "")
	req := joinRequest(t, inv.Link, newPubkey(t), "twin")

	const n = 10
	var wg sync.WaitGroup
	ids := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := f.svc.Join(f.ctx, req)
			ids[i], errs[i] = res.MemberID, err
		}()
	}
	wg.Wait()
	for i := range n {
		require.NoError(t, errs[i])
		require.Equal(t, ids[0], ids[i])
	}
	require.Equal(t, 1, f.usedCount(inv.ID))
}

// A join retried while its first attempt is still in flight (the client timed out, or hung up
// and tried again) on a single-use invite: the first takes the last use and the retry, which
// waited for it on the invite's row, is told it is a member. Before, it was told
// invite_exhausted, for a join that had succeeded.
func TestJoinRetriedInFlightOnTheLastUse(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	_, key := f.mesh("demo")
	inv := f.invite("demo", key, 1, "")
	req := joinRequest(t, inv.Link, newPubkey(t), "twin")

	// Hold the invite's row so that both attempts are past their member check and wait to take
	// the use, as two attempts in flight together do.
	hold, err := f.pool.Begin(f.ctx)
	require.NoError(t, err)
	defer func() { _ = hold.Rollback(f.ctx) }()
	_, err = hold.Exec(f.ctx, `SELECT 1 FROM claudemesh.invite WHERE id = $1 FOR UPDATE`, inv.ID)
	require.NoError(t, err)

	const n = 2
	var wg sync.WaitGroup
	ids := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			res, err := f.svc.Join(f.ctx, req)
			ids[i], errs[i] = res.MemberID, err
		})
	}
	require.Eventually(t, func() bool {
		var waiting int
		err := f.pool.QueryRow(f.ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%InviteClaim%'`).Scan(&waiting)
		return err == nil && waiting == n
	}, 10*time.Second, 10*time.Millisecond, "both attempts wait on the invite's row")
	require.NoError(t, hold.Rollback(f.ctx))
	wg.Wait()

	for i := range n {
		require.NoError(t, errs[i], "attempt %d", i)
		require.Equal(t, ids[0], ids[i])
	}
	require.Equal(t, 1, f.usedCount(inv.ID))
}

func TestMembersAddRevoke(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	m, key := f.mesh("demo")
	pub := newPubkey(t)

	mb, err := f.svc.AddMember(f.ctx, membership.AddMemberParams{Mesh: "demo", Pubkey: strings.ToUpper(pub), DisplayName: "carol"})
	require.NoError(t, err)
	require.Equal(t, pub, mb.Pubkey)
	require.Equal(t, protocol.RoleMember, mb.Role)
	_, err = f.svc.AddMember(f.ctx, membership.AddMemberParams{Mesh: "demo", Pubkey: pub, DisplayName: "carol"})
	require.ErrorIs(t, err, membership.ErrMemberExists)
	_, err = f.svc.AddMember(f.ctx, membership.AddMemberParams{Mesh: "demo", Pubkey: "xyz"})
	require.ErrorIs(t, err, membership.ErrInvalidPubkey)
	_, err = f.svc.AddMember(f.ctx, membership.AddMemberParams{Mesh: "demo", Pubkey: newPubkey(t), Role: "root"})
	require.ErrorIs(t, err, membership.ErrInvalidRole)
	_, err = f.svc.AddMember(f.ctx, membership.AddMemberParams{Mesh: "nope", Pubkey: newPubkey(t)})
	require.ErrorIs(t, err, membership.ErrMeshNotFound)

	// A member added by the operator who then follows an invite is already a member.
	inv := f.invite("demo", key, 1, "")
	res, err := f.svc.Join(f.ctx, joinRequest(t, inv.Link, pub, "carol"))
	require.NoError(t, err)
	require.True(t, res.AlreadyMember)
	require.Equal(t, mb.ID, res.MemberID)

	out, err := f.svc.RevokeMember(f.ctx, "demo", pub)
	require.NoError(t, err)
	require.NotNil(t, out.RevokedAt)
	require.Equal(t, mb.ID, out.ID)
	var audited int
	require.NoError(t, f.pool.QueryRow(f.ctx, `SELECT count(*) FROM claudemesh.audit_pending
		WHERE mesh_id = $1 AND event_type = 'member_revoked' AND actor = 'operator' AND data = $2`,
		m.ID, fmt.Sprintf(`{"member_id":%q,"pubkey":%q}`, mb.ID, pub)).Scan(&audited))
	require.Equal(t, 1, audited, "the revocation is audited in its statement")
	_, err = f.svc.RevokeMember(f.ctx, "demo", pub)
	require.ErrorIs(t, err, membership.ErrMemberNotFound)

	members, err := f.svc.Members(f.ctx, "demo")
	require.NoError(t, err)
	require.Len(t, members, 2, "a revoked member stays listed")
	require.NotNil(t, members[1].RevokedAt)

	// A revoked key is not readmitted by an invite (TestRevokedKeyCannotJoinAgain); the
	// operator adds it again as a new member.
	_, err = f.svc.Join(f.ctx, joinRequest(t, inv.Link, pub, "carol"))
	requireJoinError(t, err, protocol.JoinErrMemberRevoked)
	again, err := f.svc.AddMember(f.ctx, membership.AddMemberParams{Mesh: "demo", Pubkey: pub, DisplayName: "carol"})
	require.NoError(t, err)
	require.NotEqual(t, mb.ID, again.ID)
	res, err = f.svc.Join(f.ctx, joinRequest(t, inv.Link, pub, "carol"))
	require.NoError(t, err)
	require.True(t, res.AlreadyMember)
	require.Equal(t, again.ID, res.MemberID)
	require.Equal(t, 0, f.usedCount(inv.ID))

	n, err := audit.Verify(f.ctx, f.pool, m.ID)
	require.NoError(t, err)
	require.Equal(t, 6, n) // created, owner added, carol added, invite, revoked, carol added again
}

// A member revoked by the operator or banned by an admin can't join again with an invite it
// still holds (or any other): before, it did, as a new member, which made the ban meaningless
// and let a revoked (compromised) key back in past the rule that only the operator lifts an
// operator's revocation. The invite's use is not taken. An unban readmits the key.
func TestRevokedKeyCannotJoinAgain(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	m, key := f.mesh("demo")
	inv := f.invite("demo", key, 10, "")
	owner, err := f.svc.Members(f.ctx, "demo")
	require.NoError(t, err)

	revoked, banned := newPubkey(t), newPubkey(t)
	for _, pub := range []string{revoked, banned} {
		_, err := f.svc.Join(f.ctx, joinRequest(t, inv.Link, pub, "x"))
		require.NoError(t, err)
	}
	_, err = f.svc.RevokeMember(f.ctx, "demo", revoked)
	require.NoError(t, err)
	var code string // the statement a ban over the WebSocket runs, by the owner
	require.NoError(t, f.pool.QueryRow(f.ctx, `SELECT code FROM claudemesh.ban('test', $1, $2, $3, $4)`,
		m.ID, owner[0].ID, owner[0].Pubkey, banned).Scan(&code))
	require.Empty(t, code)

	for _, pub := range []string{revoked, strings.ToUpper(banned)} {
		_, err := f.svc.Join(f.ctx, joinRequest(t, inv.Link, pub, "x"))
		requireJoinError(t, err, protocol.JoinErrMemberRevoked)
		fresh := f.invite("demo", key, 1, "")
		_, err = f.svc.Join(f.ctx, joinRequest(t, fresh.Link, pub, "x"))
		requireJoinError(t, err, protocol.JoinErrMemberRevoked)
		require.Zero(t, f.usedCount(fresh.ID), "a refused join takes no use")
	}
	require.Equal(t, 2, f.usedCount(inv.ID))

	// The owner's unban lifts the ban: the key is a member again, as before.
	require.NoError(t, f.pool.QueryRow(f.ctx, `SELECT code FROM claudemesh.unban($1, $2, $3, $4)`,
		m.ID, owner[0].ID, owner[0].Pubkey, banned).Scan(&code))
	require.Empty(t, code)
	res, err := f.svc.Join(f.ctx, joinRequest(t, inv.Link, banned, "x"))
	require.NoError(t, err)
	require.True(t, res.AlreadyMember)
}

func TestInvites(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	m, key := f.mesh("demo")

	inv := f.invite("demo", key, 0, "")
	require.Equal(t, membership.DefaultInviteUses, inv.MaxUses)
	require.Equal(t, protocol.RoleMember, inv.Role)
	require.WithinDuration(t, time.Now().Add(membership.DefaultInviteTTL), inv.ExpiresAt, 5*time.Second)

	token, p, err := protocol.ParseInviteLink(inv.Link)
	require.NoError(t, err)
	require.Equal(t, inv.Token, token)
	require.NoError(t, protocol.VerifyInvite(p))
	require.Equal(t, m.ID, p.MeshID)
	require.Equal(t, "demo", p.MeshSlug)
	require.Equal(t, testBrokerURL, p.BrokerURL)
	require.Equal(t, key.MeshRootKey, p.MeshRootKey)
	require.Equal(t, key.Pubkey(), p.OwnerPubkey)
	require.Equal(t, inv.ExpiresAt.Unix(), p.ExpiresAt)

	// Neither the token nor the mesh root key is stored anywhere in the database.
	var stored, payload string
	require.NoError(t, f.pool.QueryRow(f.ctx, `SELECT token, payload::text FROM claudemesh.invite WHERE id = $1`, inv.ID).Scan(&stored, &payload))
	require.NotEqual(t, token, stored)
	require.NotContains(t, payload, key.MeshRootKey)
	var leaks int
	require.NoError(t, f.pool.QueryRow(f.ctx, `SELECT (SELECT count(*) FROM claudemesh.audit WHERE data::text LIKE '%' || $1 || '%' OR data::text LIKE '%' || $2 || '%')
		+ (SELECT count(*) FROM claudemesh.audit_pending WHERE data LIKE '%' || $1 || '%' OR data LIKE '%' || $2 || '%')`,
		key.MeshRootKey, token[:40]).Scan(&leaks))
	require.Zero(t, leaks)

	// Revoke by link, by token, by id.
	for _, ref := range []func(membership.Invite) string{
		func(i membership.Invite) string { return i.Link },
		func(i membership.Invite) string { return i.Token },
		func(i membership.Invite) string { return i.ID },
	} {
		i := f.invite("demo", key, 3, "")
		out, err := f.svc.RevokeInvite(f.ctx, ref(i))
		require.NoError(t, err)
		require.Equal(t, i.ID, out.ID)
		require.NotNil(t, out.RevokedAt)
		_, err = f.svc.RevokeInvite(f.ctx, ref(i))
		require.ErrorIs(t, err, membership.ErrInviteRevoked)
	}
	_, err = f.svc.RevokeInvite(f.ctx, "no-such-invite")
	require.ErrorIs(t, err, membership.ErrInviteNotFound)

	// Parameter checks.
	other, err := membership.NewOwnerKey()
	require.NoError(t, err)
	for name, tc := range map[string]struct {
		p    membership.CreateInviteParams
		want error
	}{
		"foreign key":    {membership.CreateInviteParams{Mesh: "demo", Key: other, BrokerURL: testBrokerURL}, membership.ErrOwnerKeyMismatch},
		"no key":         {membership.CreateInviteParams{Mesh: "demo", BrokerURL: testBrokerURL}, membership.ErrInvalidInvite},
		"bad role":       {membership.CreateInviteParams{Mesh: "demo", Key: key, Role: "root", BrokerURL: testBrokerURL}, membership.ErrInvalidRole},
		"bad uses":       {membership.CreateInviteParams{Mesh: "demo", Key: key, MaxUses: -1, BrokerURL: testBrokerURL}, membership.ErrInvalidInvite},
		"no broker url":  {membership.CreateInviteParams{Mesh: "demo", Key: key}, membership.ErrInvalidInvite},
		"bad broker url": {membership.CreateInviteParams{Mesh: "demo", Key: key, BrokerURL: "ftp://x"}, membership.ErrInvalidInvite},
		"unknown mesh":   {membership.CreateInviteParams{Mesh: "nope", Key: key, BrokerURL: testBrokerURL}, membership.ErrMeshNotFound},
	} {
		_, err := f.svc.CreateInvite(f.ctx, tc.p)
		require.ErrorIs(t, err, tc.want, name)
	}

	n, err := audit.Verify(f.ctx, f.pool, m.ID)
	require.NoError(t, err)
	require.Equal(t, 2+1+3*2, n) // mesh + owner, one invite, three created and revoked
}

// flipFirst changes the first character, always (a fixed replacement would be a no-op
// whenever the random value already started with it).
func flipFirst(v string) string {
	if v[0] == 'x' {
		return "y" + v[1:]
	}
	return "x" + v[1:]
}

// The notice that closes a revoked member's sessions is part of the revocation: when it can't
// be sent, nothing is revoked and the operator is told, instead of a revocation whose sessions
// stay open. (A bus namespace too long for a channel name makes the notice fail.)
func TestRevocationFailsWithItsNotice(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{BusNamespace: strings.Repeat("n", 80)})
	m, _ := f.mesh("demo")
	pub := newPubkey(t)
	mb, err := f.svc.AddMember(f.ctx, membership.AddMemberParams{Mesh: "demo", Pubkey: pub, DisplayName: "carol"})
	require.NoError(t, err)
	// A live session of carol's on some replica: the revocation must tell it to close.
	_, err = f.pool.Exec(f.ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id)
		VALUES ($1, $2, $3, 'n1', 's1')`, m.ID, mb.ID, pub)
	require.NoError(t, err)
	_, err = f.svc.RevokeMember(f.ctx, "demo", pub)
	require.ErrorContains(t, err, "channel name too long")
	members, err := f.svc.Members(f.ctx, "demo")
	require.NoError(t, err)
	for _, m := range members {
		if m.Pubkey == pub {
			require.Nil(t, m.RevokedAt, "still a member")
		}
	}
}

// `broker member revoke` runs the revocation, its sessions' end and its audit entry as one
// statement: the mesh's hello lock, which every hello of the mesh waits for, is held for that
// statement's server time, never across a round trip to the operator's machine (it took seven
// flights, the lock held for five of them).
func TestRevokeHoldsTheHelloLockForOneStatement(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	f.mesh("demo")
	url := f.pool.Config().ConnString()
	proxy := dbtest.NewProxy(t, url)
	pool, err := db.NewPool(f.ctx, proxy.URL(url), db.PoolConfig{MaxConns: 1})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	svc := membership.New(pool, membership.Config{Logger: dbtest.Logger(t)})
	keys := []string{newPubkey(t), newPubkey(t)}
	for i, k := range keys {
		_, err := f.svc.AddMember(f.ctx, membership.AddMemberParams{Mesh: "demo", Pubkey: k, DisplayName: fmt.Sprint("m", i)})
		require.NoError(t, err)
	}
	_, err = svc.RevokeMember(f.ctx, "demo", keys[0]) // prepares its statements on the connection
	require.NoError(t, err)
	n := proxy.Count(func() {
		_, err = svc.RevokeMember(f.ctx, "demo", keys[1])
	})
	require.NoError(t, err)
	require.EqualValues(t, 2, n.Statement, "the mesh's look-up, then the revocation")
}
