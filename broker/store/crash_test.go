package store_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/db/embedded"
)

// An acknowledged send is on disk. With SetPushBeforeFlush (PUSH_BEFORE_FLUSH) a send commits
// without waiting for its WAL flush, so that the other replicas push it at once, and is
// acknowledged only once a second transaction in the same flight has had its own commit
// flushed (flushBehind). Postgres is crashed right
// after the acks (an immediate stop: its shared memory, unwritten WAL included, is gone) with
// its WAL writer made to wait 10 s, so only that confirmation can have put the sends on disk:
// every acknowledged send is there after recovery. Its own cluster: the crash would end every
// other test's database.
func TestAcknowledgedSendsSurviveACrashOfPostgres(t *testing.T) {
	ctx := dbtest.Context(t)
	pg, cfg := dbtest.PrivateCluster(t)
	admin, err := pgx.Connect(ctx, pg.URL())
	require.NoError(t, err)
	_, err = admin.Exec(ctx, `ALTER SYSTEM SET wal_writer_delay = '10s'`)
	require.NoError(t, err)
	_, err = admin.Exec(ctx, `SELECT pg_reload_conf()`)
	require.NoError(t, err)
	key := func(c byte) string { return strings.Repeat(string(c), 64) }
	var mesh, sender string
	require.NoError(t, admin.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('m', 'm', $1) RETURNING id`, key('0')).Scan(&mesh))
	_, err = admin.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('here', now())`)
	require.NoError(t, err)
	require.NoError(t, admin.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2) RETURNING id`, mesh, key('a')).Scan(&sender))
	_, err = admin.Exec(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey) VALUES ($1, $2)`, mesh, key('b'))
	require.NoError(t, err)
	require.NoError(t, admin.Close(ctx))

	pool, err := db.NewPool(ctx, pg.URL(), db.PoolConfig{MaxConns: 2, AppName: "claudemesh-test", Named: store.NamedSQL()})
	require.NoError(t, err)
	st := store.New(pool, "t")
	st.SetPushBeforeFlush(true)
	var acked []string
	for i := range 20 {
		e := directEnvelope(mesh, sender, key('a'), key('b'), "now", []byte(`{"n":`+strconv.Itoa(i)+`}`))
		sent, _, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{e})
		require.NoError(t, err)
		require.True(t, sent[0].Queued)
		acked = append(acked, e.ID)
	}

	pidFile, err := os.ReadFile(filepath.Join(cfg.DataDir, "postmaster.pid"))
	require.NoError(t, err)
	pid, err := strconv.Atoi(strings.SplitN(string(pidFile), "\n", 2)[0])
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(pid, syscall.SIGQUIT)) // immediate shutdown: no flush, no checkpoint
	select {
	case <-pg.Died():
	case <-time.After(30 * time.Second):
		t.Fatal("postgres did not stop after SIGQUIT")
	}
	pool.Close()

	pg2, err := embedded.Start(ctx, cfg) // crash recovery replays what reached the disk
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, pg2.Stop(context.Background())) })
	conn, err := pgx.Connect(ctx, pg2.URL())
	require.NoError(t, err)
	defer conn.Close(context.Background())
	var stored int
	require.NoError(t, conn.QueryRow(ctx, `SELECT count(*) FROM claudemesh.envelope WHERE id = ANY($1)`, acked).Scan(&stored))
	require.Equal(t, len(acked), stored, "acknowledged sends lost in a crash of Postgres")
}
