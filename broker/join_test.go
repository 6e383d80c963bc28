package broker

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// postJoinFrom posts body to /join, from the client address from when the node trusts
// X-Forwarded-For ("" for none), and returns the status, the answer and its Retry-After.
func postJoinFrom(t *testing.T, srv *Server, from string, body []byte) (int, protocol.JoinResponse, string) {
	t.Helper()
	var out protocol.JoinResponse
	code, retry := postJSONFrom(t, srv, protocol.PathJoin, from, body, &out)
	return code, out, retry
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

// A flood of joins that reach the database holds at most joinConcurrency of the pool's
// connections: the excess is refused 503 with a retryable error, and a member's hello during
// the flood goes through. Each join of this flood stops in Postgres (the test holds its
// invite's row lock), so without the bound the flood would hold the whole pool.
func TestJoinFloodIsRefusedAndHellosGetThrough(t *testing.T) {
	// Each request from an address of its own: the bound in flight is what is tested here.
	c := newCluster(t, 1, func(cfg *Config) { cfg.TrustedProxyHeader = "X-Forwarded-For" })
	srv := c.nodes[0]
	m := c.mesh(0)
	alice := m.member("alice")

	key, _, err := membership.LoadOrCreateOwnerKey(filepath.Join(t.TempDir(), "owner.json"))
	require.NoError(t, err)
	_, _, err = srv.Members().CreateMesh(ctxT(t), membership.CreateMeshParams{Slug: "flood", OwnerPubkey: key.Pubkey()})
	require.NoError(t, err)
	inv, err := srv.Members().CreateInvite(ctxT(t), membership.CreateInviteParams{Mesh: "flood", Key: key, MaxUses: 1000,
		BrokerURL: "ws://x/ws"})
	require.NoError(t, err)
	token, payload, err := protocol.ParseInviteLink(inv.Link)
	require.NoError(t, err)
	tx, err := c.pool.Begin(ctxT(t))
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(context.Background()) }()
	_, err = tx.Exec(ctxT(t), `SELECT 1 FROM claudemesh.invite WHERE id = $1 FOR UPDATE`, inv.ID)
	require.NoError(t, err)
	waitingClaims := func() int {
		var n int
		require.NoError(t, c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
			AND wait_event_type = 'Lock' AND query LIKE '%used_count = used_count + 1%'`).Scan(&n))
		return n
	}

	// More flooders than the pool has connections, and than joins may run and wait.
	const flooders = 48
	ctx, cancel := context.WithCancel(context.Background())
	tr := &http.Transport{MaxIdleConnsPerHost: flooders}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // before the wait: the flood stops however the test ends
	type refusal struct {
		retry string
		body  protocol.JoinResponse
	}
	var busy atomic.Int64
	var first atomic.Pointer[refusal]
	for i := range flooders {
		wg.Go(func() {
			for n := 0; ctx.Err() == nil; n++ {
				// A fresh key each time: a member's key would be answered before the claim.
				peer, _, _ := ed25519.GenerateKey(rand.Reader)
				body, _ := json.Marshal(map[string]any{"invite_token": token, "invite_payload": payload,
					"peer_pubkey": protocol.PubkeyHex(peer)})
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+srv.Addr()+protocol.PathJoin,
					bytes.NewReader(body))
				req.Header.Set("X-Forwarded-For", fmt.Sprintf("10.%d.%d.%d", i, n>>8&255, n&255))
				resp, err := hc.Do(req)
				if err != nil {
					continue
				}
				var out protocol.JoinResponse
				_ = json.NewDecoder(resp.Body).Decode(&out)
				_, _ = io.Copy(io.Discard, resp.Body)
				_ = resp.Body.Close()
				if resp.StatusCode == http.StatusServiceUnavailable {
					busy.Add(1)
					first.CompareAndSwap(nil, &refusal{resp.Header.Get("Retry-After"), out})
				}
			}
		})
	}
	// The flood is at its height: joins wait on the lock and the rest are refused, or (without
	// the bound) the flood holds every pool connection.
	dbtest.WaitFor(t, 10*time.Second, "joins waiting in Postgres and the excess refused, or the pool held", func() bool {
		st := srv.pool.Stat()
		return waitingClaims() > 0 && (busy.Load() > 0 || st.AcquiredConns() == st.MaxConns())
	})

	_, dialErr := m.tryDial(0, alice)
	require.NoError(t, dialErr, "a member's hello during a /join flood")
	require.LessOrEqual(t, waitingClaims(), joinConcurrency, "joins hold at most joinConcurrency pool connections")
	cancel()
	wg.Wait()

	r := first.Load()
	require.NotNil(t, r, "the joins beyond the bound are refused busy")
	require.Equal(t, "1", r.retry)
	require.False(t, r.body.OK)
	require.Contains(t, r.body.Error, "retry")
	require.GreaterOrEqual(t, testutilCounter(srv.metrics.JoinRequests.WithLabelValues(membership.JoinOutcomeBusy)), 1.0)

	// The lock gone, the joins in flight complete and free their slots: a join succeeds. The
	// flood's queued joins (detached from their clients) may still take the slots a moment, so
	// a client told busy comes back, as Retry-After says (from another address each time: the
	// per-address limit is not what this is about).
	require.NoError(t, tx.Rollback(ctxT(t)))
	attempt := 0
	var last protocol.JoinResponse
	dbtest.WaitForExplained(t, 10*time.Second, "a join served after the flood", func() bool {
		attempt++
		code, res, _ := postJoinFrom(t, srv, fmt.Sprintf("192.0.2.%d", attempt%250+1), joinBodyFor(t, token, *payload))
		last = res
		require.Contains(t, []int{http.StatusOK, http.StatusServiceUnavailable}, code, res.Error)
		return code == http.StatusOK
	}, func() string { return fmt.Sprintf("%d attempts, the last answered %+v", attempt, last) })
	require.True(t, last.OK)
}

// One address gets JOIN_RATE_LIMIT_PER_SOURCE_PER_MIN joins at once, whatever it sends,
// checked before the body is read; another address is served meanwhile.
func TestJoinFloodFromOneAddressIsLimited(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.TrustedProxyHeader = "X-Forwarded-For"; cfg.JoinRatePerSourceMin = 5 })
	srv := c.nodes[0]
	limited := 0
	for range 15 {
		code, res, _ := postJoinFrom(t, srv, "203.0.113.7", []byte(`{}`))
		if code == http.StatusTooManyRequests {
			require.False(t, res.OK)
			require.Contains(t, res.Error, "rate limited")
			limited++
		} else {
			require.Equal(t, http.StatusBadRequest, code)
		}
	}
	// 5 at once, and one more a minute / 5 later at the most.
	require.GreaterOrEqual(t, limited, 9, "the flood is limited by its address")
	require.GreaterOrEqual(t, testutilCounter(srv.metrics.JoinRequests.WithLabelValues(membership.JoinOutcomeRateLimited)), 9.0)
	code, _, _ := postJoinFrom(t, srv, "203.0.113.7", selfSignedJoin(t))
	require.Equal(t, http.StatusTooManyRequests, code, "a well-formed join from the address is refused too")

	code, res, _ := postJoinFrom(t, srv, "203.0.113.8", selfSignedJoin(t))
	require.Equal(t, http.StatusBadRequest, code, "another address is served meanwhile")
	require.Equal(t, protocol.JoinErrMeshNotFound, res.Error)
}

// Every refusal a client can cause at will on /join is counted and logged sampled
// (docs/operations.md, "Security model": a burst of 20 lines, then at most 5 a second).
func TestJoinRefusalsAreLoggedSampled(t *testing.T) {
	t.Parallel()
	lines := &logLines{}
	c := newCluster(t, 0, nil)
	// Each request from an address of its own: the limit per address is not what is tested here.
	srv := startServer(t, Config{NodeID: "l", Region: "test", TrustedProxyHeader: "X-Forwarded-For"}, dbtest.PoolFor(t, c.url),
		slog.New(slog.NewTextHandler(lines, nil)))

	const n = 100
	start := time.Now()
	for i := range n {
		// No payload in the token: refused before any database work.
		code, _, _ := postJoinFrom(t, srv, fmt.Sprintf("198.51.100.%d", i), []byte(`{"invite_token":"x"}`))
		require.Equal(t, http.StatusBadRequest, code)
	}
	for i := range n {
		code, res, _ := postJoinFrom(t, srv, fmt.Sprintf("192.0.2.%d", i), selfSignedJoin(t))
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

// A join by a key that is already a member changes nothing and can be sent again at will, by
// anyone holding the (even used up) invite and any member's public key: its line is sampled as
// refusals are. Before, each logged a line of its own. A join that enrolls is always logged.
func TestRepeatedJoinsOfAMemberAreLoggedSampled(t *testing.T) {
	t.Parallel()
	lines := &logLines{}
	c := newCluster(t, 0, nil)
	srv := startServer(t, Config{NodeID: "l", Region: "test", TrustedProxyHeader: "X-Forwarded-For"}, dbtest.PoolFor(t, c.url),
		slog.New(slog.NewTextHandler(lines, nil)))
	key, _, err := membership.LoadOrCreateOwnerKey(filepath.Join(t.TempDir(), "owner.json"))
	require.NoError(t, err)
	_, _, err = srv.Members().CreateMesh(ctxT(t), membership.CreateMeshParams{Slug: "demo", OwnerPubkey: key.Pubkey()})
	require.NoError(t, err)
	inv, err := srv.Members().CreateInvite(ctxT(t), membership.CreateInviteParams{Mesh: "demo", Key: key, BrokerURL: "ws://x/ws"})
	require.NoError(t, err)
	token, payload, err := protocol.ParseInviteLink(inv.Link)
	require.NoError(t, err)
	body := joinBodyFor(t, token, *payload)

	code, res, _ := postJoinFrom(t, srv, "192.0.2.1", body)
	require.Equal(t, http.StatusOK, code)
	require.False(t, res.AlreadyMember)
	require.Len(t, lines.matching("already_member=false"), 1, "the join that enrolled is logged")
	const n = 100
	start := time.Now()
	for i := range n {
		code, res, _ := postJoinFrom(t, srv, fmt.Sprintf("198.51.100.%d", i), body)
		require.Equal(t, http.StatusOK, code)
		require.True(t, res.AlreadyMember)
	}
	elapsed := time.Since(start)
	logged := len(lines.matching("already_member=true"))
	t.Logf("%d joins of a member in %s logged %d lines", n, elapsed.Round(time.Millisecond), logged)
	require.LessOrEqual(t, logged, 20+5*(int(elapsed.Seconds())+1), "logged sampled")
}

// A frame over MAX_MESSAGE_BYTES closes its socket 1009; any client can send one, before any
// hello, so the line it logs is sampled like every refusal a client causes at will.
func TestOversizedFramesAreLoggedSampled(t *testing.T) {
	t.Parallel()
	lines := &logLines{}
	c := newCluster(t, 0, nil)
	srv := startServer(t, Config{NodeID: "f", Region: "test", MaxMessageBytes: 4096}, dbtest.PoolFor(t, c.url),
		slog.New(slog.NewTextHandler(lines, nil)))

	const n = 60
	start := time.Now()
	big := strings.Repeat("x", 8192)
	for range n {
		ws, resp, err := websocket.DefaultDialer.Dial("ws://"+srv.Addr()+protocol.PathWS, nil)
		require.NoError(t, err)
		resp.Body.Close()
		require.NoError(t, ws.WriteMessage(websocket.TextMessage, []byte(big)))
		_, _, err = ws.ReadMessage()
		var ce *websocket.CloseError
		require.ErrorAs(t, err, &ce)
		require.Equal(t, websocket.CloseMessageTooBig, ce.Code)
		ws.Close()
	}
	elapsed := time.Since(start)
	logged := len(lines.matching(`msg="frame too large`))
	t.Logf("%d oversized frames in %s logged %d lines", n, elapsed.Round(time.Millisecond), logged)
	require.LessOrEqual(t, logged, 20+5*(int(elapsed.Seconds())+1), "oversized frames are logged sampled")
}
