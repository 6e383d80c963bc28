package store_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
)

// BenchmarkHellos is a connect storm's database side, one replica's statements in a row: new
// sessions of 250 meshes of 40 members, 10 hellos a statement (a replica's batches in a storm
// of 96 dials on 3 replicas). ns/op is per hello, nearly all of it the server's: A/B it against
// a change of the hello function (the audit seal that follows runs elsewhere and is not in it).
//
//	go test -run '^$' -bench Hellos -benchtime 10000x ./broker/store
func BenchmarkHellos(b *testing.B) {
	ctx, pool, st := helloStore(b)
	const meshes, perMesh, batch = 250, 40, 10
	type who struct{ mesh, member, key string }
	var all []who
	for m := range meshes {
		var mesh string
		require.NoError(b, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ($1, $1, $2) RETURNING id`,
			fmt.Sprint("m", m), fmt.Sprintf("%064d", m)).Scan(&mesh))
		rows, err := pool.Query(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey)
			SELECT $1, lpad(to_hex($2 * 1000 + g), 64, '0') FROM generate_series(1, $3) g RETURNING id, pubkey`, mesh, m, perMesh)
		require.NoError(b, err)
		for rows.Next() {
			w := who{mesh: mesh}
			require.NoError(b, rows.Scan(&w.member, &w.key))
			all = append(all, w)
		}
		require.NoError(b, rows.Err())
	}
	_, err := pool.Exec(ctx, `ANALYZE claudemesh.member; ANALYZE claudemesh.mesh`)
	require.NoError(b, err)
	// A storm's order: member i of every mesh, then member i+1 (the dials are spread).
	order := make([]who, 0, len(all))
	for i := range perMesh {
		for m := range meshes {
			order = append(order, all[m*perMesh+i])
		}
	}
	expires := time.Now().Add(time.Hour)
	b.ResetTimer()
	for start := 0; start < b.N; start += batch {
		hs := make([]store.HelloParams, 0, batch)
		for i := start; i < start+batch && i < b.N; i++ {
			w := order[i%len(order)]
			hs = append(hs, store.HelloParams{MeshID: w.mesh, MemberID: w.member, MemberPubkey: w.key,
				SessionID: fmt.Sprint("s", i), Role: "control-plane", PID: 1000 + i%100, CWD: fmt.Sprint("/w/", i),
				Hostname: "h", PeerType: "claude", Channel: "cli", Capabilities: []string{"system_events"},
				Signature: fmt.Sprint("sig-", i), SignatureExpires: expires})
		}
		res, err := st.Hellos(ctx, "here", 1<<20, hs)
		if err != nil {
			b.Fatal(err)
		}
		for i, r := range res {
			if r.Err != nil || r.Refusal != "" {
				b.Fatalf("hello %d: %v %q", start+i, r.Err, r.Refusal)
			}
		}
	}
}
