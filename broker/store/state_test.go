package store_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// What the broker checks a set_state value against (protocol.JSONBSize) is what the quota
// counts once Postgres has stored it: numbers written out in every digit, members spaced.
func TestStateSizeIsWhatTheBrokerChecks(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	var mesh string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', $1) RETURNING id`,
		strings.Repeat("0", 64)).Scan(&mesh))

	values := []string{`null`, `true`, `"x,:"`, `[]`, `{}`, `[1,{"a":2,"b":[false,null]}]`, `{"b":1e2,"a":[0.000e-3,-0.0]}`,
		`[1e400,-1E-400,9.999e-3,123.456e1,0.001e2]`}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		var nums []string
		for range 1 + rng.IntN(5) {
			n := fmt.Sprintf("%s%d", []string{"", "-"}[rng.IntN(2)], rng.IntN(1000))
			if rng.IntN(2) == 0 {
				n += "." + strings.Repeat("0", rng.IntN(3)) + fmt.Sprint(rng.IntN(1000))
			}
			if rng.IntN(2) == 0 {
				n += fmt.Sprintf("%s%+d", []string{"e", "E"}[rng.IntN(2)], rng.IntN(2*protocol.MaxNumberExponent+1)-protocol.MaxNumberExponent)
			}
			nums = append(nums, n)
		}
		values = append(values, "["+strings.Join(nums, ",")+"]")
	}
	quota := store.StateQuota{MaxKeys: len(values), MaxBytes: 1 << 30}
	for i, v := range values {
		_, err := st.SetState(ctx, store.StateWrite{MeshID: mesh, Key: fmt.Sprintf("k%03d", i), Value: json.RawMessage(v),
			UpdatedBy: "u", PresenceID: "p", Actor: "a", AuditData: []byte(`{}`), Quota: quota})
		require.NoError(t, err, v)
	}
	entries, err := st.ListState(ctx, mesh, len(values))
	require.NoError(t, err)
	require.Equal(t, len(values)-1, len(entries), "null is no entry: it deletes")
	for _, e := range entries {
		var i int
		_, err := fmt.Sscanf(e.Key, "k%03d", &i)
		require.NoError(t, err)
		require.Equal(t, len(e.Key)+protocol.JSONBSize([]byte(values[i])), e.Size, "%s stored as %s", values[i], e.Value)
	}
}

// A null value deletes the key in the one statement: it frees the key's room even at the key
// quota, tells the other sessions (value null) and is audited; a missing key is no error and
// tells no one.
func TestSetStateNullDeletes(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	url := dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	st := store.New(pool, "t")
	var mesh string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', $1) RETURNING id`,
		strings.Repeat("0", 64)).Scan(&mesh))
	audits := func() (n int) {
		require.NoError(t, pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM claudemesh.audit WHERE mesh_id = $1)
			+ (SELECT count(*) FROM claudemesh.audit_pending WHERE mesh_id = $1)`, mesh).Scan(&n))
		return n
	}

	quota := store.StateQuota{MaxKeys: 2, MaxBytes: 1 << 20}
	set := func(key, value string) error {
		_, err := st.SetState(ctx, store.StateWrite{MeshID: mesh, Key: key, Value: json.RawMessage(value), UpdatedBy: "alice",
			PresenceID: "p1", Actor: "a", AuditData: []byte(`{}`), Quota: quota})
		return err
	}
	require.NoError(t, set("a", `1`))
	require.NoError(t, set("b", `2`))
	require.ErrorIs(t, set("c", `3`), store.ErrQuotaExceeded, "at the key quota")
	before := audits()
	listener := dbtest.ConnFor(t, url)
	_, err := listener.Exec(ctx, `LISTEN t_all`)
	require.NoError(t, err)

	require.NoError(t, set("a", `null`), "a delete at the key quota")
	note := nextStateNote(t, listener)
	require.Equal(t, "a", note.Key)
	require.JSONEq(t, `{"type":"state_change","key":"a","value":null,"updatedBy":"alice"}`, string(note.Change))
	require.Equal(t, before+1, audits(), "the delete is audited")
	_, err = st.GetState(ctx, mesh, "a")
	require.ErrorIs(t, err, store.ErrNotFound)
	require.NoError(t, set("c", `3`), "the deleted key's room is free")
	require.Equal(t, "c", nextStateNote(t, listener).Key)

	// A missing key: no error, no notification, no audit entry.
	before = audits()
	require.NoError(t, set("never", `null`))
	require.NoError(t, set("b", `null`))
	require.Equal(t, "b", nextStateNote(t, listener).Key, "the first notification is b's: the missing key told no one")
	require.Equal(t, before+1, audits())
	entries, err := st.ListState(ctx, mesh, 10)
	require.NoError(t, err)
	require.Len(t, entries, 1)
	require.Equal(t, "c", entries[0].Key)
}

// stateNote is a shared-state line of the bus (set_state's notification).
type stateNote struct {
	Kind   string          `json:"k"`
	Key    string          `json:"y"`
	Change json.RawMessage `json:"x"`
}

// nextStateNote waits for the next shared-state line on conn, which listens on the bus channel.
func nextStateNote(t *testing.T, conn *pgx.Conn) stateNote {
	t.Helper()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		n, err := conn.WaitForNotification(ctx)
		cancel()
		require.NoError(t, err, "no notification within 5 s")
		for _, line := range strings.Split(n.Payload, "\n") {
			var note stateNote
			if json.Unmarshal([]byte(line), &note) == nil && note.Kind == "t" {
				return note
			}
		}
	}
}

// Writers of new keys on several replicas at once never take a mesh past its quota: each
// write's check and insert see the writes that committed before it. Before, every writer
// counted the keys without the others' and all of them were accepted.
func TestSetStateQuotaHoldsUnderConcurrentWriters(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	const writers, rounds = 8, 10
	quota := store.StateQuota{MaxKeys: 2, MaxBytes: 1 << 20}
	for round := range rounds {
		var mesh string
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ($1, 'm', $2) RETURNING id`,
			fmt.Sprintf("m%d", round), strings.Repeat("0", 64)).Scan(&mesh))
		start := make(chan struct{})
		errs := make(chan error, writers)
		for w := range writers {
			go func() {
				<-start
				_, err := st.SetState(ctx, store.StateWrite{MeshID: mesh, Key: fmt.Sprintf("k%d", w), Value: json.RawMessage(`1`),
					UpdatedBy: "u", PresenceID: "p", Actor: "a", AuditData: []byte(`{}`), Quota: quota})
				errs <- err
			}()
		}
		close(start)
		accepted := 0
		for range writers {
			err := <-errs
			if err == nil {
				accepted++
			} else {
				require.ErrorIs(t, err, store.ErrQuotaExceeded)
			}
		}
		var keys int
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.state WHERE mesh_id = $1`, mesh).Scan(&keys))
		require.Equal(t, quota.MaxKeys, keys, "round %d: keys stored in a mesh with a quota of %d", round, quota.MaxKeys)
		require.Equal(t, quota.MaxKeys, accepted, "round %d: writes accepted", round)
	}
}

// What a replica catching up on lost notices reads: the keys of its meshes written or deleted
// since a time (a deletion as null, with who deleted it from which session), each key's writes
// later than the one before even when the clock says otherwise, the newest few per mesh, oldest
// first; a key written again loses its deletion, and deletions are swept after an hour.
func TestStateChangesSince(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	mesh := func(slug string) (id string) {
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ($1, $1, $2) RETURNING id`,
			slug, strings.Repeat("0", 64)).Scan(&id))
		return id
	}
	m1, m2, other := mesh("m1"), mesh("m2"), mesh("other")
	set := func(mesh, key, value, by string) store.StateEntry {
		t.Helper()
		e, err := st.SetState(ctx, store.StateWrite{MeshID: mesh, Key: key, Value: json.RawMessage(value), UpdatedBy: by,
			PresenceID: "p-" + by, Actor: "a", AuditData: []byte(`{}`), Quota: store.StateQuota{MaxKeys: 100, MaxBytes: 1 << 20}})
		require.NoError(t, err)
		return e
	}
	set(m1, "old", `0`, "alice")
	var since time.Time
	require.NoError(t, pool.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&since))
	a := set(m1, "a", `1`, "alice")
	// A clock that stepped back: the key's next write still comes later.
	_, err := pool.Exec(ctx, `UPDATE claudemesh.state SET updated_at = updated_at + interval '1 hour' WHERE mesh_id = $1 AND key = 'a'`, m1)
	require.NoError(t, err)
	a2 := set(m1, "a", `2`, "alice")
	require.Equal(t, a.UpdatedAt.Add(time.Hour+time.Microsecond), a2.UpdatedAt)
	gone := set(m1, "gone", `1`, "bob")
	del := set(m1, "gone", `null`, "bob")
	require.True(t, del.UpdatedAt.After(gone.UpdatedAt))
	set(m1, "back", `1`, "bob")
	set(m1, "back", `null`, "bob")
	set(m1, "back", `3`, "carol")
	set(m2, "x", `"y"`, "carol")
	set(other, "z", `1`, "carol")

	type row struct{ Mesh, Key, Value, By, Presence string }
	read := func(perMesh int) (out []row) {
		t.Helper()
		changes, err := st.StateChangesSince(ctx, []string{m1, m2}, since, perMesh)
		require.NoError(t, err)
		for _, c := range changes {
			out = append(out, row{c.MeshID, c.Key, string(c.Value), c.UpdatedBy, c.PresenceID})
		}
		return out
	}
	mesh1 := []row{{m1, "gone", "null", "bob", "p-bob"}, {m1, "back", "3", "carol", "p-carol"}, {m1, "a", "2", "alice", "p-alice"}}
	mesh2 := []row{{m2, "x", `"y"`, "carol", "p-carol"}}
	byMesh := func(rows ...[]row) (out []row) {
		if m1 > m2 {
			rows[0], rows[1] = rows[1], rows[0]
		}
		for _, r := range rows {
			out = append(out, r...)
		}
		return out
	}
	require.Equal(t, byMesh(mesh1, mesh2), read(10), "by mesh, oldest first; a (an hour ahead) last")
	require.Equal(t, byMesh(mesh1[1:], mesh2), read(2), "each mesh's newest")

	// Deletions are swept an hour after; the key's row is untouched.
	_, err = pool.Exec(ctx, `UPDATE claudemesh.state_deleted SET deleted_at = deleted_at - $1::interval`, store.StateDeletionRetention)
	require.NoError(t, err)
	require.NoError(t, st.DeleteExpired(ctx))
	var left int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.state_deleted`).Scan(&left))
	require.Zero(t, left)
}
