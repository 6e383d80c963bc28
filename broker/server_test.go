package broker

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/dbtest"
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

func TestHealthDrainingAndNodeStopped(t *testing.T) {
	t.Parallel()
	pool := dbtest.Pool(t)
	srv, err := NewServer(Config{}, pool, dbtest.Logger(t))
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background(), "127.0.0.1:0"))
	dbtest.WaitFor(t, 10*time.Second, "node row registered", func() bool {
		nodes, err := srv.q.NodeListAlive(context.Background())
		return err == nil && len(nodes) == 1 && nodes[0].ID == srv.NodeID()
	})
	require.NoError(t, srv.Stop(context.Background()))
	require.NoError(t, srv.Stop(context.Background()), "stop twice is safe")
	nodes, err := srv.q.NodeList(context.Background())
	require.NoError(t, err)
	require.Len(t, nodes, 1)
	require.NotNil(t, nodes[0].StoppedAt, "clean exit marks the node stopped")
}
