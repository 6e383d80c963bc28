package broker

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"log/slog"
	"net/http"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// postJoinFrom posts body to /join, from the client address from when the node trusts
// X-Forwarded-For ("" for none), and returns the status, the answer and its Retry-After.
func postJoinFrom(t *testing.T, srv *Server, from string, body []byte) (int, protocol.JoinResponse, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctxT(t), http.MethodPost, "http://"+srv.Addr()+protocol.PathJoin, bytes.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	if from != "" {
		req.Header.Set("X-Forwarded-For", from)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	var out protocol.JoinResponse
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
	return resp.StatusCode, out, resp.Header.Get("Retry-After")
}

// selfSignedJoin is a /join body anyone can make: an invite payload signed by a key of their
// own, for a mesh id that does not exist. It passes every check made before the database.
func selfSignedJoin(t testing.TB) []byte {
	_, owner, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	p := protocol.InvitePayload{MeshID: uuid.NewString(), MeshSlug: "x", BrokerURL: "ws://x/ws", Role: "member",
		ExpiresAt: time.Now().Add(time.Hour).Unix()}
	require.NoError(t, protocol.SignInvite(owner, &p))
	return joinBodyFor(t, "tok", p)
}

// joinBodyFor is a /join body for token and payload with a fresh peer key.
func joinBodyFor(t testing.TB, token string, p protocol.InvitePayload) []byte {
	peer, _, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	b, err := json.Marshal(map[string]any{"invite_token": token, "invite_payload": p, "peer_pubkey": protocol.PubkeyHex(peer)})
	require.NoError(t, err)
	return b
}

// Every refusal a client can cause at will on /join is counted and logged sampled
// (docs/operations.md, "Security model": a burst of 20 lines, then at most 5 a second).
func TestJoinRefusalsAreLoggedSampled(t *testing.T) {
	t.Parallel()
	lines := &logLines{}
	c := newCluster(t, 0, nil)
	srv, err := NewServer(Config{NodeID: "l", Region: "test"}, dbtest.PoolFor(t, c.url),
		slog.New(slog.NewTextHandler(lines, nil)))
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = srv.Stop(ctx)
	})

	const n = 100
	start := time.Now()
	for range n {
		// No payload in the token: refused before any database work.
		code, _, _ := postJoinFrom(t, srv, "", []byte(`{"invite_token":"x"}`))
		require.Equal(t, http.StatusBadRequest, code)
	}
	for range n {
		code, res, _ := postJoinFrom(t, srv, "", selfSignedJoin(t))
		require.Equal(t, http.StatusBadRequest, code)
		require.Equal(t, protocol.JoinErrMeshNotFound, res.Error)
	}
	elapsed := time.Since(start)

	logged := len(lines.matching(`msg="join`))
	t.Logf("%d refused joins in %s logged %d lines", 2*n, elapsed.Round(time.Millisecond), logged)
	require.LessOrEqual(t, logged, 20+5*(int(elapsed.Seconds())+1), "refused joins are logged sampled")
	require.Equal(t, float64(n), testutilCounter(srv.metrics.JoinRequests.WithLabelValues(membership.JoinOutcomeBadRequest)))
	require.Equal(t, float64(n), testutilCounter(srv.metrics.JoinRequests.WithLabelValues(membership.JoinOutcomeRefused)))
}
