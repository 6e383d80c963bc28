package broker

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/pgbus"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

func getHealth(t *testing.T, addr string) (int, Health) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/health")
	require.NoError(t, err)
	defer resp.Body.Close()
	var h Health
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&h))
	return resp.StatusCode, h
}

func TestHealthFollowsDatabase(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	pool := dbtest.PoolFor(t, proxy.URL(url))
	srv, err := NewServer(Config{Region: "test"}, pool, dbtest.Logger(t))
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = srv.Stop(context.Background()) })

	// 503 until the LISTEN connection is up: a replica that can't hear the bus isn't ready.
	dbtest.WaitFor(t, 10*time.Second, "healthy after start", func() bool {
		code, _ := getHealth(t, srv.Addr())
		return code == http.StatusOK
	})
	code, h := getHealth(t, srv.Addr())
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "ok", h.Status)
	require.Equal(t, "up", h.Listener)
	require.Equal(t, "up", h.DB)
	require.Equal(t, srv.NodeID(), h.NodeID)
	require.Equal(t, Version, h.Version)

	proxy.Cut()
	dbtest.WaitFor(t, 15*time.Second, "health 503 degraded with Postgres cut off", func() bool {
		code, h := getHealth(t, srv.Addr())
		return code == http.StatusServiceUnavailable && h.Status == "degraded" && h.DB == "down"
	})

	proxy.Restore()
	dbtest.WaitFor(t, 15*time.Second, "health 200 again once Postgres is back", func() bool {
		code, h := getHealth(t, srv.Addr())
		return code == http.StatusOK && h.Status == "ok"
	})

	resp, err := http.Get("http://" + srv.Addr() + "/metrics")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.True(t, strings.Contains(string(body), `claudemesh_health_checks_total{status="degraded"}`), "metrics count degraded checks")
}

// A replica whose node row can't be written (here: locked; in life a full disk) while reads
// still work is about to send its sessions away: /health says so before it does, so the load
// balancer stops routing peers to it.
func TestHealthFollowsTheHeartbeat(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	srv, err := NewServer(Config{Region: "test", Heartbeat: 200 * time.Millisecond, NodeDeadAfter: 2 * time.Second},
		pool, dbtest.Logger(t))
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = srv.Stop(context.Background()) })
	dbtest.WaitFor(t, 10*time.Second, "healthy after start", func() bool {
		code, h := getHealth(t, srv.Addr())
		return code == http.StatusOK && h.Heartbeat == "ok"
	})
	ctx := ctxT(t)
	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(context.Background()) }()
	_, err = tx.Exec(ctx, `LOCK TABLE claudemesh.node IN EXCLUSIVE MODE`) // reads pass, writes wait
	require.NoError(t, err)
	dbtest.WaitFor(t, 10*time.Second, "health 503 with the heartbeat failing", func() bool {
		code, h := getHealth(t, srv.Addr())
		return code == http.StatusServiceUnavailable && h.Status == "degraded" && h.Heartbeat == "failing" && h.DB == "up"
	})
	require.NoError(t, tx.Rollback(ctx))
	dbtest.WaitFor(t, 10*time.Second, "health 200 once the heartbeat is written again", func() bool {
		code, h := getHealth(t, srv.Addr())
		return code == http.StatusOK && h.Heartbeat == "ok"
	})
}

// nodeStopped reads whether the node row says it stopped cleanly.
func nodeStopped(t *testing.T, pool *pgxpool.Pool, id string) (alive, stopped bool) {
	t.Helper()
	var stoppedAt *time.Time
	var deadAt *time.Time
	err := pool.QueryRow(context.Background(), `SELECT stopped_at, dead_at FROM claudemesh.node WHERE id = $1`, id).Scan(&stoppedAt, &deadAt)
	if err != nil {
		return false, false
	}
	return stoppedAt == nil && deadAt == nil, stoppedAt != nil
}

func TestHealthDrainingAndNodeStopped(t *testing.T) {
	t.Parallel()
	pool := dbtest.Pool(t)
	srv, err := NewServer(Config{}, pool, dbtest.Logger(t))
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background(), "127.0.0.1:0"))
	dbtest.WaitFor(t, 10*time.Second, "node row registered", func() bool {
		alive, _ := nodeStopped(t, pool, srv.NodeID())
		return alive
	})
	require.NoError(t, srv.Stop(context.Background()))
	require.NoError(t, srv.Stop(context.Background()), "stop twice is safe")
	_, stopped := nodeStopped(t, pool, srv.NodeID())
	require.True(t, stopped, "clean exit marks the node stopped")
}

// A Stop whose deadline has already passed still stops the bus (its LISTEN connection is gone)
// and marks the node stopped, instead of leaving it to be declared dead; goleak in TestMain
// shows no goroutine outlives it.
func TestStopPastItsDeadlineStillStopsBusAndMarksNode(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	srv := c.nodes[0]
	m := c.mesh(0)
	cl := m.dial(0, m.member("alice"))
	listener := func() int {
		var n int
		require.NoError(t, c.pool.QueryRow(context.Background(),
			`SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()`, pgbus.ListenerAppName(srv.NodeID())).Scan(&n))
		return n
	}
	require.Equal(t, 1, listener())
	expired, cancel := context.WithCancel(context.Background())
	cancel()
	_ = srv.Stop(expired)
	_, stopped := nodeStopped(t, c.pool, srv.NodeID())
	require.True(t, stopped, "the node is marked stopped, not left to be declared dead")
	require.False(t, srv.BusConnected())
	dbtest.WaitFor(t, 10*time.Second, "the LISTEN connection closed", func() bool { return listener() == 0 })
	select {
	case <-cl.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the session was not closed by Stop")
	}
}

// A port another process holds is reported with the setting that chose it.
func TestStartNamesThePortSetting(t *testing.T) {
	t.Parallel()
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer taken.Close()
	srv, err := NewServer(Config{}, dbtest.Pool(t), dbtest.Logger(t))
	require.NoError(t, err)
	err = srv.Start(context.Background(), taken.Addr().String())
	require.ErrorContains(t, err, "address already in use")
	require.ErrorContains(t, err, "BROKER_PORT")
	require.NoError(t, srv.Stop(context.Background()))
}
