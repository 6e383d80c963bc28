package store_test

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

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

	values := []string{`true`, `"x,:"`, `[]`, `{}`, `[1,{"a":2,"b":[false,null]}]`, `{"b":1e2,"a":[0.000e-3,-0.0]}`,
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
	require.Equal(t, len(values), len(entries))
	for _, e := range entries {
		var i int
		_, err := fmt.Sscanf(e.Key, "k%03d", &i)
		require.NoError(t, err)
		require.Equal(t, len(e.Key)+protocol.JSONBSize([]byte(values[i])), e.Size, "%s stored as %s", values[i], e.Value)
	}
}
