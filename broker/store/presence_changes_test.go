package store_test

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
)

// A replica catching up on lost system events reads the presences changed since a time
// (migration 00065): those that connected (live), changed status (live: a status set again to
// what it was is no change, so a hook's refresh is not told as one) or ended, the newest few
// per mesh, oldest first, with what they are now; not those that changed before, nor another
// mesh's.
func TestPresenceChangesSince(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.Pool(t)
	st := store.New(pool, "t")
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now())`)
	require.NoError(t, err)
	mesh := func(slug string) (id string) {
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ($1, $1, $2) RETURNING id`,
			slug, strings.Repeat("0", 64)).Scan(&id))
		return id
	}
	m1, m2, other := mesh("m1"), mesh("m2"), mesh("other")
	connect := func(mesh, id string) {
		t.Helper()
		_, err := pool.Exec(ctx, `INSERT INTO claudemesh.presence (id, mesh_id, member_id, member_pubkey, node_id, session_id, display_name, connected_at)
			VALUES ($2, $1, 'member-' || $2, 'key-' || $2, 'here', $2, 'name-' || $2, clock_timestamp())`, mesh, id)
		require.NoError(t, err)
	}
	setStatus := func(id, status string) {
		t.Helper()
		changed, err := st.SetStatus(ctx, id, status, store.SourceManual, time.Minute)
		require.NoError(t, err)
		require.True(t, changed)
	}
	end := func(id string) {
		t.Helper()
		_, err := pool.Exec(ctx, `UPDATE claudemesh.presence SET ended_at = clock_timestamp() WHERE id = $1`, id)
		require.NoError(t, err)
	}
	for _, id := range []string{"quiet", "refreshed", "changed", "gone", "gone-before"} {
		connect(m1, id)
	}
	connect(other, "elsewhere")
	setStatus("refreshed", "working")
	end("gone-before")
	var since time.Time
	require.NoError(t, pool.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&since))
	setStatus("refreshed", "working") // set again: no change
	setStatus("changed", "dnd")
	connect(m1, "new")
	end("gone")
	connect(m2, "new2")
	setStatus("elsewhere", "dnd")

	type row struct {
		Mesh, Presence, Member, Pubkey, Name, Status string
		Ended                                        bool
	}
	read := func(perMesh int) (out []row) {
		t.Helper()
		changes, err := st.PresenceChangesSince(ctx, []string{m1, m2}, since, perMesh)
		require.NoError(t, err)
		for _, c := range changes {
			require.False(t, c.At.Before(since), "%s", c.PresenceID)
			out = append(out, row{c.MeshID, c.PresenceID, c.MemberID, c.Pubkey, c.DisplayName, c.Status, c.Ended})
		}
		return out
	}
	r := func(mesh, id, status string, ended bool) row {
		return row{mesh, id, "member-" + id, "key-" + id, "name-" + id, status, ended}
	}
	mesh1 := []row{r(m1, "changed", "dnd", false), r(m1, "new", "idle", false), r(m1, "gone", "idle", true)}
	mesh2 := []row{r(m2, "new2", "idle", false)}
	byMesh := func(a, b []row) []row {
		if m1 > m2 {
			a, b = b, a
		}
		return append(append([]row{}, a...), b...)
	}
	require.Equal(t, byMesh(mesh1, mesh2), read(10), "by mesh, oldest first")
	require.Equal(t, byMesh(mesh1[1:], mesh2), read(2), "each mesh's newest")
}
