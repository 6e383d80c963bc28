package broker

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// postHookFrom posts a hook as if from the client address from (the test replicas trust
// X-Forwarded-For): the status code, the answer and its Retry-After.
func postHookFrom(t *testing.T, srv *Server, from string, body []byte) (int, protocol.HookResponse, string) {
	t.Helper()
	var out protocol.HookResponse
	code, retry := postJSONFrom(t, srv, protocol.PathHookState, from, body, &out)
	return code, out, retry
}

// postJSONFrom posts body to path as if from the client address from ("" for none, else in
// X-Forwarded-For), decodes the JSON answer into out and returns its status and Retry-After.
func postJSONFrom(t *testing.T, srv *Server, path, from string, body []byte, out any) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctxT(t), http.MethodPost, "http://"+srv.Addr()+path, bytes.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	if from != "" {
		req.Header.Set("X-Forwarded-For", from)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	require.NoError(t, json.NewDecoder(resp.Body).Decode(out))
	return resp.StatusCode, resp.Header.Get("Retry-After")
}

// signedHook is a hook signed now by key.
func signedHook(t *testing.T, key ed25519.PrivateKey, req protocol.HookRequest) []byte {
	t.Helper()
	protocol.SignHook(key, &req, time.Now())
	b, err := json.Marshal(req)
	require.NoError(t, err)
	return b
}

func hookRows(t *testing.T, c *testCluster) (sigs, pending int) {
	t.Helper()
	require.NoError(t, c.pool.QueryRow(ctxT(t), `SELECT (SELECT count(*) FROM claudemesh.seen_signature),
		(SELECT count(*) FROM claudemesh.pending_status)`).Scan(&sigs, &pending))
	return sigs, pending
}

// Anyone can make an ed25519 key: a valid signature by a fresh key per request proves nothing
// and must cost the broker no write and buy no fresh allowance in the database. A member's
// hook is served as before.
func TestHookOfARandomKeyIsRefusedAndWritesNothing(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	bob := m.member("bob")
	hook := protocol.HookRequest{CWD: "/repo/bob", PID: 77, Status: protocol.StatusWorking, SessionID: "claude-1"}
	for i := range 20 {
		_, key, err := ed25519.GenerateKey(rand.Reader)
		require.NoError(t, err)
		code, res, _ := postHookFrom(t, c.nodes[0], "", signedHook(t, key, hook))
		require.Equal(t, http.StatusForbidden, code, "hook %d of a fresh key", i)
		require.False(t, res.OK)
		require.Contains(t, res.Error, "no live member")
	}
	sigs, pending := hookRows(t, c)
	require.Zero(t, sigs, "no signature of a stranger remembered")
	require.Zero(t, pending, "no pending signal of a stranger kept")

	// Bob has no session yet: his signal waits for his hello, and then applies.
	code, res, _ := postHookFrom(t, c.nodes[0], "", signedHook(t, bob.key, hook))
	require.Equal(t, http.StatusOK, code)
	require.True(t, res.OK && res.Pending)
	b := m.dial(0, bob, func(o *client.Options) { o.SessionID = "claude-1"; o.CWD = "/repo/bob"; o.PID = 77 })
	peers, err := b.ListPeers(ctxT(t))
	require.NoError(t, err)
	require.Equal(t, protocol.StatusWorking, peers[0].Status, "the waiting signal applied at hello")
	code, res, _ = postHookFrom(t, c.nodes[0], "", signedHook(t, bob.key, protocol.HookRequest{CWD: "/repo/bob", PID: 77,
		Status: protocol.StatusIdle, SessionID: "claude-1"}))
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, b.HelloAck().PresenceID, res.PresenceID)

	// Revoked, bob is a stranger again.
	_, err = c.pool.Exec(ctxT(t), `UPDATE claudemesh.member SET revoked_at = now() WHERE id = $1`, bob.id)
	require.NoError(t, err)
	code, _, _ = postHookFrom(t, c.nodes[0], "", signedHook(t, bob.key, hook))
	require.Equal(t, http.StatusForbidden, code)
}

// One address gets HOOK_RATE_LIMIT_PER_SOURCE_PER_MIN requests, whatever they carry (fresh
// keys, garbage), checked before anything else; another address is served meanwhile. An IPv6
// client is one /64.
func TestHookFloodFromOneAddressIsLimited(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.TrustedProxyHeader = "X-Forwarded-For"; cfg.HookRatePerSourceMin = 5 })
	m := c.mesh(0)
	bob := m.member("bob")
	hook := protocol.HookRequest{CWD: "/repo/bob", PID: 77, Status: protocol.StatusWorking}
	for _, tc := range []struct{ flood, same, other string }{
		{"203.0.113.7", "203.0.113.7", "203.0.113.8"},
		{"2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:3::1"},
	} {
		t.Run(tc.flood, func(t *testing.T) {
			limited := 0
			for range 12 {
				_, key, err := ed25519.GenerateKey(rand.Reader)
				require.NoError(t, err)
				code, res, _ := postHookFrom(t, c.nodes[0], tc.flood, signedHook(t, key, hook))
				if code == http.StatusTooManyRequests {
					require.Equal(t, "rate limited", res.Error)
					limited++
				} else {
					require.Equal(t, http.StatusForbidden, code)
				}
			}
			// 5 at once, and one more a minute / 5 later at the most.
			require.GreaterOrEqual(t, limited, 6, "the flood is limited by its address")
			code, _, _ := postHookFrom(t, c.nodes[0], tc.same, []byte("not json"))
			require.Equal(t, http.StatusTooManyRequests, code, "refused before the body is read, from anywhere in the address's /64")

			code, res, _ := postHookFrom(t, c.nodes[0], tc.other, signedHook(t, bob.key, hook))
			require.Equal(t, http.StatusOK, code, "another address is served meanwhile")
			require.True(t, res.OK)
		})
	}
}

// A replica runs at most HOOK_CONCURRENCY hook statements at once: beyond, after a second's
// wait, a hook is refused 503 with a retryable error, and the database pool stays free for
// sends and hellos.
func TestHookStatementsInFlightAreBounded(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.HookConcurrency = 1 })
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)

	// Bob's first hook stops in Postgres: another transaction is inserting its signature.
	first := protocol.HookRequest{CWD: "/repo/bob", PID: 1, Status: protocol.StatusWorking}
	protocol.SignHook(bob.key, &first, time.Now())
	body, err := json.Marshal(first)
	require.NoError(t, err)
	tx, err := c.pool.Begin(ctxT(t))
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(ctxT(t)) }()
	_, err = tx.Exec(ctxT(t), `INSERT INTO claudemesh.seen_signature (signature, expires_at) VALUES ($1, now() + interval '1 minute')`,
		first.Signature)
	require.NoError(t, err)
	var wg sync.WaitGroup
	var firstCode int
	var firstErr error
	wg.Go(func() {
		resp, err := http.Post("http://"+c.nodes[0].Addr()+protocol.PathHookState, "application/json", bytes.NewReader(body))
		if firstErr = err; err == nil {
			firstCode = resp.StatusCode
			_ = resp.Body.Close()
		}
	})
	dbtest.WaitFor(t, 10*time.Second, "the first hook waiting in Postgres", func() bool {
		var n int
		_ = c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%hook_status%'`).Scan(&n)
		return n == 1
	})

	code, res, retry := postHookFrom(t, c.nodes[0], "", signedHook(t, bob.key, protocol.HookRequest{CWD: "/repo/bob", PID: 2,
		Status: protocol.StatusWorking}))
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.False(t, res.OK)
	require.Contains(t, res.Error, "retry")
	require.Equal(t, "1", retry)
	// Sends still go through: hooks hold one connection at most.
	_, err = a.Send(ctxT(t), bob.pub, protocol.PriorityNow, "n", "c", "")
	require.NoError(t, err)

	require.NoError(t, tx.Rollback(ctxT(t)))
	wg.Wait()
	require.NoError(t, firstErr)
	require.Equal(t, http.StatusOK, firstCode, "the first hook, let through, is applied")
	code, _, _ = postHookFrom(t, c.nodes[0], "", signedHook(t, bob.key, protocol.HookRequest{CWD: "/repo/bob", PID: 3,
		Status: protocol.StatusWorking}))
	require.Equal(t, http.StatusOK, code, "the slot is free again")
}

// The limiter's store never holds more than its cap and costs O(1) a request. A flood of new
// keys (fresh signing keys, IPv6 /64s) does not lock anyone out: a new key in a full store
// evicts the least recently used bucket, so a caller that keeps calling keeps its bucket (and
// stays limited), and one the flood evicted starts again with a full one.
func TestHookLimiterStaysBounded(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_000_000, 0)
	l := newHookLimiter(3, 100)
	l.now = func() time.Time { return now }
	for i := range 100 {
		require.Equal(t, limitAllowed, l.allow(fmt.Sprint("k", i)))
	}
	require.Equal(t, limitAllowed, l.allow("hot"))
	require.Equal(t, limitAllowed, l.allow("hot"))
	require.Equal(t, limitAllowed, l.allow("hot"))
	for i := range 1000 {
		require.Equal(t, limitAllowed, l.allow(fmt.Sprint("flood", i)), "a new key is served, the store full or not")
		require.Equal(t, 100, l.len())
		if i%50 == 0 {
			require.Equal(t, limitExceeded, l.allow("hot"), "a caller that keeps calling keeps its (empty) bucket")
		}
	}
	for range 3 {
		require.Equal(t, limitAllowed, l.allow("k1"), "evicted by the flood: a full bucket again")
	}
	require.Equal(t, limitExceeded, l.allow("k1"))
}

// Per-address limits key on the client: the TCP peer, or the address a trusted proxy appended
// (never one the client wrote itself); an IPv6 client by its /64, within which it could take a
// new address per request.
func TestClientSource(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, remote, header string
		xff                  []string
		want                 string
	}{
		{"IPv4 peer", "198.51.100.4:5000", "", nil, "198.51.100.4"},
		{"IPv6 peer, by /64", "[2001:db8:a:b:1:2:3:4]:5000", "", nil, "2001:db8:a:b::/64"},
		{"IPv6 peer, elsewhere in the /64", "[2001:db8:a:b:ffff::1]:5000", "", nil, "2001:db8:a:b::/64"},
		{"IPv4-mapped IPv6 peer", "[::ffff:198.51.100.4]:5000", "", nil, "198.51.100.4"},
		{"header not trusted", "198.51.100.4:5000", "", []string{"203.0.113.9"}, "198.51.100.4"},
		{"trusted proxy", "10.0.0.2:5000", "X-Forwarded-For", []string{"203.0.113.9"}, "203.0.113.9"},
		{"client's own entry first", "10.0.0.2:5000", "X-Forwarded-For", []string{"1.2.3.4, 203.0.113.9"}, "203.0.113.9"},
		{"client's own header line first", "10.0.0.2:5000", "X-Forwarded-For", []string{"1.2.3.4", "203.0.113.9"}, "203.0.113.9"},
		{"trusted proxy, IPv6 client", "10.0.0.2:5000", "X-Forwarded-For", []string{"2001:db8::7"}, "2001:db8::/64"},
		{"garbage from the proxy", "10.0.0.2:5000", "X-Forwarded-For", []string{"unknown"}, "10.0.0.2"},
		{"header missing", "10.0.0.2:5000", "Fly-Client-IP", nil, "10.0.0.2"},
	} {
		r := httptest.NewRequest(http.MethodPost, "/hook/set-status", nil)
		r.RemoteAddr = tc.remote
		for _, v := range tc.xff {
			name := tc.header
			if name == "" {
				name = "X-Forwarded-For"
			}
			r.Header.Add(name, v)
		}
		require.Equal(t, tc.want, clientSource(r, tc.header), tc.name)
	}
}

func TestBadHookBodyNamesTheFieldAndWritesNothing(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	for body, want := range map[string]string{
		`{"cwd":"/repo","pid":"12","status":"idle"}`: "pid: ",
		`{"cwd":"/repo","status":"asleep"}`:          "status: ",
		`{"pid":12,"status":"idle"}`:                 "cwd: ",
	} {
		code, res, _ := postHookFrom(t, c.nodes[0], "", []byte(body))
		require.Equal(t, http.StatusBadRequest, code, body)
		require.False(t, res.OK)
		require.True(t, strings.HasPrefix(res.Error, want), "%s: %q", body, res.Error)
	}
	sigs, pending := hookRows(t, c)
	require.Zero(t, sigs+pending)
}

// A cwd is stored and indexed as given (a session's, a waiting hook signal's): the longest the
// protocol accepts must fit Postgres's index even when it does not compress, or the hook was
// answered 503 "retry" forever and the hello "internal" (reconnect) forever.
func TestLongestCWDIsStored(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	bob := m.member("bob")
	raw := make([]byte, protocol.MaxCWDLen)
	_, _ = rand.Read(raw)
	cwd := ("/" + base64.RawURLEncoding.EncodeToString(raw))[:protocol.MaxCWDLen] // does not compress

	hook := protocol.HookRequest{CWD: cwd, PID: 7, Status: protocol.StatusWorking, SessionID: "claude-long"}
	code, res, _ := postHookFrom(t, c.nodes[0], "", signedHook(t, bob.key, hook))
	require.Equal(t, http.StatusOK, code, res.Error)
	require.True(t, res.OK && res.Pending, "kept for the session's hello")

	b := m.dial(0, bob, func(o *client.Options) { o.SessionID = "claude-long"; o.CWD = cwd; o.PID = 7 })
	peers, err := b.ListPeers(ctxT(t))
	require.NoError(t, err)
	require.Equal(t, cwd, peers[0].CWD)
	require.Equal(t, protocol.StatusWorking, peers[0].Status, "the waiting signal applied at hello")

	hook.SessionID, hook.Status = "", protocol.StatusIdle // found by pid + cwd
	code, res, _ = postHookFrom(t, c.nodes[0], "", signedHook(t, bob.key, hook))
	require.Equal(t, http.StatusOK, code, res.Error)
	require.Equal(t, b.HelloAck().PresenceID, res.PresenceID)

	hook.CWD = cwd + "x"
	code, res, _ = postHookFrom(t, c.nodes[0], "", signedHook(t, bob.key, hook))
	require.Equal(t, http.StatusBadRequest, code)
	require.Contains(t, res.Error, "cwd: too long")
}

// A hook whose client has hung up by the time its statement runs (a hook script's short
// timeout against a slow primary) is applied all the same, as a join is: its status is still
// true, and a client giving up is no database failure to be logged at Warn and counted
// unavailable.
func TestHookCompletesWhenItsClientHungUp(t *testing.T) {
	t.Parallel()
	lines := &logLines{}
	c := newCluster(t, 0, nil)
	srv := startServer(t, Config{NodeID: "hang", Region: "test"}, dbtest.PoolFor(t, c.url),
		slog.New(slog.NewTextHandler(lines, nil)))
	c.nodes = append(c.nodes, srv)
	m := c.mesh(0)
	bob := m.member("bob")
	hook := protocol.HookRequest{CWD: "/repo/hang", PID: 9, Status: protocol.StatusWorking}

	ctx, hangUp := context.WithCancel(ctxT(t))
	hangUp()
	req := httptest.NewRequestWithContext(ctx, http.MethodPost, protocol.PathHookState, bytes.NewReader(signedHook(t, bob.key, hook)))
	rec := httptest.NewRecorder()
	srv.Handler().ServeHTTP(rec, req)

	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Empty(t, lines.matching("hook could not be applied"))
	require.Zero(t, testutilCounter(srv.metrics.HookRequests.WithLabelValues("unavailable")))
	_, pending := hookRows(t, c)
	require.Equal(t, 1, pending, "the signal is kept for bob's hello")
}
