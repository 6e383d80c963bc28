package broker

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
)

// A replica logs the heads that moved every 10 minutes, and a restarted one only records the
// heads it finds (they were logged before). So the heads that moved since a replica's last
// anchor must be logged when it stops: else, after a deploy of a single replica, a mesh that
// goes quiet never has its last entries anchored, and cutting them goes unseen.
func TestSealerLogsTheMovedHeadsWhenItStops(t *testing.T) {
	t.Parallel()
	ctx := dbtest.Context(t)
	pool := dbtest.PoolFor(t, dbtest.URL(t))
	var mesh string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('quiet', 'quiet', $1) RETURNING id`,
		fmt.Sprintf("%064x", 1)).Scan(&mesh))

	var logged bytes.Buffer
	anchors := audit.NewAnchors(slog.New(slog.NewTextHandler(&logged, nil)))
	_, err := anchors.Log(ctx, pool) // the replica's first call: the heads recorded
	require.NoError(t, err)
	s := &sealer{store: store.New(pool, "t"), every: time.Hour, log: slog.New(slog.DiscardHandler), metrics: newMetrics(), anchors: anchors}
	require.NoError(t, s.Start(context.Background()))

	// Entries committed (not yet sealed) shortly before the replica stops.
	require.NoError(t, audit.AppendVia(ctx, pool, []audit.Entry{{MeshID: mesh, Type: audit.MemberAdded, Actor: audit.ActorOperator}}))
	stop, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	require.NoError(t, s.Stop(stop))

	var hash string
	require.NoError(t, pool.QueryRow(ctx, `SELECT hash FROM claudemesh.audit_head WHERE mesh_id = $1 AND seq = 1`, mesh).Scan(&hash),
		"the entries committed before the stop are sealed")
	require.Contains(t, logged.String(), fmt.Sprintf(`msg="audit anchor" mesh=%s seq=1 hash=%s`, mesh, hash))
}
