package broker

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

const testAdminToken = "admin-Secr3t-token-for-tests"

// getStatusPage fetches /status from srv; auth is "" (none), "bearer" or "query".
func getStatusPage(t *testing.T, srv *Server, auth, token string) (int, http.Header, string) {
	t.Helper()
	u := "http://" + srv.Addr() + "/status"
	if auth == "query" {
		u += "?token=" + token
	}
	req, err := http.NewRequest(http.MethodGet, u, nil)
	require.NoError(t, err)
	if auth == "bearer" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, resp.Header, string(body)
}

// pageRow returns the inner HTML of the table row with that id ("" when absent). It works on
// the served HTML and on Chromium's serialized DOM alike.
func pageRow(page, id string) string {
	m := regexp.MustCompile(`(?s)<tr id="` + regexp.QuoteMeta(id) + `"[^>]*>(.*?)</tr>`).FindStringSubmatch(page)
	if m == nil {
		return ""
	}
	return m[1]
}

// pageField returns the text of the element marked data-field=name (or id=name) in html.
func pageField(html, name string) string {
	m := regexp.MustCompile(`(?s)(?:data-field|id)="` + regexp.QuoteMeta(name) + `"[^>]*>([^<]*)<`).FindStringSubmatch(html)
	if m == nil {
		return ""
	}
	return strings.TrimSpace(m[1])
}

func statusPageMeshSlug(t *testing.T, c *testCluster, meshID string) string {
	t.Helper()
	var slug string
	require.NoError(t, c.pool.QueryRow(context.Background(), `SELECT slug FROM claudemesh.mesh WHERE id = $1`, meshID).Scan(&slug))
	return slug
}

func TestStatusPageOffWithoutAdminToken(t *testing.T) {
	t.Parallel()
	srv, err := NewServer(Config{}, dbtest.Pool(t), dbtest.Logger(t))
	require.NoError(t, err)
	for _, target := range []string{"/status", "/status?token=", "/status?token=anything"} {
		rec := httptest.NewRecorder()
		srv.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, target, nil))
		require.Equal(t, http.StatusNotFound, rec.Code, target)
	}
}

func TestStatusPageAuth(t *testing.T) {
	t.Parallel()
	srv, err := NewServer(Config{AdminToken: testAdminToken, NodeID: "auth-node"}, dbtest.Pool(t), dbtest.Logger(t))
	require.NoError(t, err)
	serve := func(target string, header ...string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodGet, target, nil)
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		rec := httptest.NewRecorder()
		srv.Handler().ServeHTTP(rec, req)
		return rec
	}

	for name, rec := range map[string]*httptest.ResponseRecorder{
		"no token":          serve("/status"),
		"empty query token": serve("/status?token="),
		"wrong query token": serve("/status?token=wrong"),
		"token prefix":      serve("/status?token=" + testAdminToken[:len(testAdminToken)-1]),
		"token plus suffix": serve("/status?token=" + testAdminToken + "x"),
		"wrong bearer":      serve("/status", "Authorization", "Bearer wrong"),
		"basic scheme":      serve("/status", "Authorization", "Basic "+testAdminToken),
		"bare token":        serve("/status", "Authorization", testAdminToken),
		// A header, when present, decides: a right query token does not rescue a wrong header.
		"wrong bearer, right query": serve("/status?token="+testAdminToken, "Authorization", "Bearer wrong"),
	} {
		require.Equal(t, http.StatusUnauthorized, rec.Code, name)
		require.Contains(t, rec.Header().Get("WWW-Authenticate"), "Bearer", name)
		require.NotContains(t, rec.Body.String(), testAdminToken, name)
	}

	rec := serve("/status", "Authorization", "bearer "+testAdminToken)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	body := rec.Body.String()
	require.Equal(t, "text/html; charset=utf-8", rec.Header().Get("Content-Type"))
	require.Equal(t, "no-store", rec.Header().Get("Cache-Control"))
	require.Equal(t, "no-referrer", rec.Header().Get("Referrer-Policy"))
	require.Contains(t, rec.Header().Get("Content-Security-Policy"), "default-src 'none'")
	require.Contains(t, body, `<meta http-equiv="refresh" content="5">`, "a header-authenticated page reloads itself as is")
	require.NotContains(t, body, testAdminToken, "the token given in a header never appears in the page")
	require.Equal(t, "auth-node", pageField(body, "self-node"))
	require.NotContains(t, body, "<script", "no script: the page is plain HTML")
	require.NotRegexp(t, `(?i)(src|href)="https?://`, body, "no external assets")

	// A query token must survive the refresh, or the page would 401 after five seconds.
	rec = serve("/status?token=" + testAdminToken)
	require.Equal(t, http.StatusOK, rec.Code)
	require.Contains(t, rec.Body.String(), `<meta http-equiv="refresh" content="5; url=?token=`+testAdminToken+`">`)
	require.Equal(t, 1, strings.Count(rec.Body.String(), testAdminToken), "the token is in the refresh URL and nowhere else")

	// Special characters in a token are escaped both in the URL and in the attribute.
	odd, err := NewServer(Config{AdminToken: `a&b"<c> d+e`}, dbtest.Pool(t), dbtest.Logger(t))
	require.NoError(t, err)
	oddRec := httptest.NewRecorder()
	odd.Handler().ServeHTTP(oddRec, httptest.NewRequest(http.MethodGet, "/status?token=a%26b%22%3Cc%3E+d%2Be", nil))
	require.Equal(t, http.StatusOK, oddRec.Code)
	require.Contains(t, oddRec.Body.String(), `content="5; url=?token=a%26b%22%3Cc%3E&#43;d%2Be"`)

	rec = serve("/status?token="+testAdminToken, "Authorization", "")
	require.Equal(t, http.StatusOK, rec.Code)
	req := httptest.NewRequest(http.MethodPost, "/status?token="+testAdminToken, nil)
	post := httptest.NewRecorder()
	srv.Handler().ServeHTTP(post, req)
	require.Equal(t, http.StatusMethodNotAllowed, post.Code, "read-only")
}

func TestStatusPageShowsCluster(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, func(cfg *Config) { cfg.AdminToken = testAdminToken })
	m := c.mesh(0)
	slug := statusPageMeshSlug(t, c, m.id)
	alice, bob, carol := m.member("alice"), m.member("bob"), m.member("carol")
	a := m.dial(0, alice)
	m.dial(1, bob)
	ctx := ctxT(t)
	// carol is offline: her message waits as a pending delivery.
	_, err := a.Send(ctx, carol.pub, protocol.PriorityNext, "NONCE-must-not-show", "CIPHERTEXT-must-not-show", "")
	require.NoError(t, err)

	var page string
	dbtest.WaitFor(t, 10*time.Second, "status page shows both nodes with a session each and the pending delivery", func() bool {
		code, _, body := getStatusPage(t, c.nodes[1], "bearer", testAdminToken)
		page = body
		return code == http.StatusOK &&
			pageField(pageRow(body, "node-n0"), "sessions") == "1" &&
			pageField(pageRow(body, "node-n1"), "sessions") == "1" &&
			pageField(body, "deliveries-pending") == "1"
	})
	for _, id := range []string{"n0", "n1"} {
		row := pageRow(page, "node-"+id)
		require.Equal(t, "live", pageField(row, "state"), id)
		require.Contains(t, row, "<td>test</td>", "region")
		require.Contains(t, row, "<code>"+Version+"</code>", "version")
		require.Regexp(t, `^\d+\.\ds ago$`, pageField(row, "heartbeat"))
	}
	require.Contains(t, pageRow(page, "node-n1"), "(this replica)")
	require.NotContains(t, pageRow(page, "node-n0"), "(this replica)")
	require.Equal(t, "n1", pageField(page, "self-node"))
	require.Equal(t, "up", pageField(page, "listener"))
	require.Equal(t, "2", pageField(page, "live-nodes"))
	require.Equal(t, "2", pageField(page, "live-sessions"))
	require.Equal(t, "1", pageField(page, "mesh-total"))

	row := pageRow(page, "mesh-"+slug)
	require.NotEmpty(t, row, "mesh %s listed", slug)
	require.Equal(t, "2", pageField(row, "live"))
	require.Equal(t, "0", pageField(row, "grace"))
	require.Equal(t, "2 / 3", pageField(row, "members"), "2 of 3 members online")
	require.Contains(t, row, "alice")
	require.Contains(t, row, "bob")
	require.NotContains(t, row, "carol", "offline members are not listed as peers")
	require.Contains(t, row, alice.pub[:8]+"…")

	// Never whole keys, content or the token.
	for what, secret := range map[string]string{
		"alice's key": alice.pub, "bob's key": bob.pub, "carol's key": carol.pub,
		"ciphertext": "CIPHERTEXT-must-not-show", "nonce": "NONCE-must-not-show", "admin token": testAdminToken,
	} {
		require.NotContains(t, page, secret, what)
	}

	// Replica n0 stops cleanly: it stays listed as stopped, alice's session waits in its grace.
	stopCtx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	require.NoError(t, c.nodes[0].Stop(stopCtx))
	dbtest.WaitFor(t, 10*time.Second, "n0 listed as stopped with alice in grace", func() bool {
		_, _, body := getStatusPage(t, c.nodes[1], "query", testAdminToken)
		page = body
		n0 := pageRow(body, "node-n0")
		return pageField(n0, "state") == "stopped" && pageField(n0, "grace") == "1"
	})
	require.Equal(t, "1", pageField(page, "live-nodes"))
	row = pageRow(page, "mesh-"+slug)
	require.Equal(t, "1", pageField(row, "live"))
	require.Equal(t, "1", pageField(row, "grace"))
	require.Contains(t, row, `<span class="badge grace">grace</span>`)
}

func TestStatusPageWithDatabaseDown(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	srv := startServer(t, Config{AdminToken: testAdminToken, NodeID: "cutoff", Region: "test"}, dbtest.PoolFor(t, proxy.URL(url)), dbtest.Logger(t))
	dbtest.WaitFor(t, 10*time.Second, "listener connected", srv.BusConnected)
	code, _, body := getStatusPage(t, srv, "bearer", testAdminToken)
	require.Equal(t, http.StatusOK, code)
	require.Empty(t, pageField(body, "db-error"))

	// Without Postgres the page still answers, quickly, with what this replica knows.
	proxy.Cut()
	start := time.Now()
	code, _, body = getStatusPage(t, srv, "bearer", testAdminToken)
	require.Less(t, time.Since(start), statusPageTimeout+2*time.Second)
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.Contains(t, pageField(body, "db-error"), "could not be read from Postgres")
	require.Equal(t, "cutoff", pageField(body, "self-node"))
	dbtest.WaitFor(t, 15*time.Second, "listener shown down", func() bool {
		_, _, body := getStatusPage(t, srv, "bearer", testAdminToken)
		return pageField(body, "listener") == "down"
	})

	proxy.Restore()
	dbtest.WaitFor(t, 15*time.Second, "page whole again once Postgres is back", func() bool {
		code, _, body := getStatusPage(t, srv, "bearer", testAdminToken)
		return code == http.StatusOK && pageField(body, "listener") == "up"
	})
}

func TestStatusHumanAge(t *testing.T) {
	t.Parallel()
	for sec, want := range map[float64]string{
		-1: "0.0s", 0.44: "0.4s", 9.96: "9.9s", 12.7: "12s", 312: "5m12s", 3*3600 + 4*60: "3h04m", 51 * 3600: "2d03h",
	} {
		require.Equal(t, want, statusPageAge(sec), "%v s", sec)
	}
	require.True(t, tokenMatches("abc", "abc"))
	require.False(t, tokenMatches("", ""), "an empty token never matches")
	require.False(t, tokenMatches("ab", "abc"))
}
