package membership_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/protocol"
)

type joinReply struct {
	status int
	body   map[string]any
}

func postJoin(t testing.TB, url string, body []byte) joinReply {
	t.Helper()
	resp, err := http.Post(url+protocol.PathJoin, "application/json", bytes.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	var out map[string]any
	require.NoError(t, json.Unmarshal(raw, &out), string(raw))
	return joinReply{resp.StatusCode, out}
}

// The /join endpoint as a peer sees it, mounted the way the server mounts it.
func TestHandleJoin(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	_, key := f.mesh("demo")
	inv := f.invite("demo", key, 1, "")
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+protocol.PathJoin, f.svc.HandleJoin)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	req := joinRequest(t, inv.Link, newPubkey(t), "alice")
	r := postJoin(t, srv.URL, joinBody(t, req))
	require.Equal(t, http.StatusOK, r.status)
	require.Equal(t, true, r.body["ok"])
	memberID, _ := r.body["memberId"].(string)
	require.NotEmpty(t, memberID)
	require.NotContains(t, r.body, "alreadyMember", "a fresh join does not say alreadyMember")

	r = postJoin(t, srv.URL, joinBody(t, req))
	require.Equal(t, http.StatusOK, r.status)
	require.Equal(t, map[string]any{"ok": true, "memberId": memberID, "alreadyMember": true}, r.body)
	require.Equal(t, 1, f.usedCount(inv.ID))

	// Refusals carry the protocol code.
	r = postJoin(t, srv.URL, joinBody(t, joinRequest(t, inv.Link, newPubkey(t), "bob")))
	require.Equal(t, http.StatusBadRequest, r.status)
	require.Equal(t, map[string]any{"ok": false, "error": protocol.JoinErrInviteExhausted}, r.body)

	tampered := joinRequest(t, f.invite("demo", key, 1, "").Link, newPubkey(t), "eve")
	tampered.InvitePayload.Role = protocol.RoleAdmin
	r = postJoin(t, srv.URL, joinBody(t, tampered))
	require.Equal(t, http.StatusBadRequest, r.status)
	require.Equal(t, protocol.JoinErrInviteBadSignature, r.body["error"])

	// Malformed bodies: 400 with a message naming the field.
	for name, body := range map[string]string{
		"not json":        `{`,
		"array":           `[]`,
		"no token":        `{"peer_pubkey":"` + newPubkey(t) + `"}`,
		"bad pubkey":      strings.Replace(string(joinBody(t, req)), req.PeerPubkey, "xyz", 1),
		"payload type":    `{"invite_token":"abc","invite_payload":5,"peer_pubkey":"` + newPubkey(t) + `"}`,
		"trailing":        string(joinBody(t, req)) + `{}`,
		"token not b64":   `{"invite_token":"!!!","peer_pubkey":"` + newPubkey(t) + `"}`,
		"wrong role type": strings.Replace(string(joinBody(t, req)), `"role":"member"`, `"role":1`, 1),
	} {
		r := postJoin(t, srv.URL, []byte(body))
		require.Equal(t, http.StatusBadRequest, r.status, name)
		require.Equal(t, false, r.body["ok"], name)
		require.NotEmpty(t, r.body["error"], name)
	}

	// The payload may also come only as the token, as some peers send it.
	only := joinRequest(t, f.invite("demo", key, 1, "").Link, newPubkey(t), "carol")
	r = postJoin(t, srv.URL, []byte(`{"invite_token":"`+only.InviteToken+`","peer_pubkey":"`+only.PeerPubkey+`","display_name":"carol"}`))
	require.Equal(t, http.StatusOK, r.status, r.body)

	// Too large: 413.
	big := `{"invite_token":"` + strings.Repeat("a", protocol.MaxJoinBodyBytes) + `"}`
	r = postJoin(t, srv.URL, []byte(big))
	require.Equal(t, http.StatusRequestEntityTooLarge, r.status)
	require.Equal(t, false, r.body["ok"])

	// Only POST.
	rec := httptest.NewRecorder()
	f.svc.HandleJoin(rec, httptest.NewRequest(http.MethodGet, protocol.PathJoin, nil))
	require.Equal(t, http.StatusMethodNotAllowed, rec.Code)
}

// The database failing is a 500 that reveals nothing, not a 400.
func TestHandleJoinDatabaseDown(t *testing.T) {
	t.Parallel()
	f := newFixture(t, membership.Config{})
	_, key := f.mesh("demo")
	inv := f.invite("demo", key, 1, "")
	body := joinBody(t, joinRequest(t, inv.Link, newPubkey(t), "alice"))
	f.pool.Close()
	rec := httptest.NewRecorder()
	f.svc.HandleJoin(rec, httptest.NewRequest(http.MethodPost, protocol.PathJoin, bytes.NewReader(body)))
	require.Equal(t, http.StatusInternalServerError, rec.Code)
	require.JSONEq(t, `{"ok":false,"error":"internal error"}`, rec.Body.String())
}

// FuzzJoinBody feeds arbitrary bodies to POST /join. It must never panic, answer only 200, 400
// or 413 with a JSON body whose ok matches the status, and a 200 must name a member.
func FuzzJoinBody(f *testing.F) {
	// f.Log may not be called from the fuzz function, so the service logs nowhere.
	fx := newFixture(f, membership.Config{Logger: slog.New(slog.DiscardHandler)})
	_, key := fx.mesh("demo")
	inv := fx.invite("demo", key, 1000, "")
	req := joinRequest(f, inv.Link, newPubkey(f), "seed")
	f.Add(joinBody(f, req))
	f.Add([]byte(`{"invite_token":"` + req.InviteToken + `","peer_pubkey":"` + req.PeerPubkey + `"}`))
	f.Add([]byte(`{"invite_token":"x","invite_payload":"` + inv.Link + `","peer_pubkey":"` + req.PeerPubkey + `"}`))
	f.Add([]byte(`{"invite_token":"x","invite_payload":{"v":1},"peer_pubkey":1}`))
	f.Add([]byte(`{"invite_token":null}`))
	f.Add([]byte(`[`))
	f.Add([]byte(``))
	f.Add([]byte(`{"a":{"b":{"c":[[[[[[[[[[]]]]]]]]]]}}}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		rec := httptest.NewRecorder()
		fx.svc.HandleJoin(rec, httptest.NewRequest(http.MethodPost, protocol.PathJoin, bytes.NewReader(body)))
		var out protocol.JoinResponse
		require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &out), rec.Body.String())
		switch rec.Code {
		case http.StatusOK:
			require.True(t, out.OK)
			require.NotEmpty(t, out.MemberID)
		case http.StatusBadRequest, http.StatusRequestEntityTooLarge:
			require.False(t, out.OK)
			require.NotEmpty(t, out.Error)
		default:
			t.Fatalf("status %d: %s", rec.Code, rec.Body.String())
		}
	})
}

// A client that hangs up while its join runs does not fail the join: the join completes (the
// client, retrying, is told it is a member) and nothing is logged as a broker error.
func TestHandleJoinCompletesWhenTheClientHangsUp(t *testing.T) {
	t.Parallel()
	var logged bytes.Buffer
	var mu sync.Mutex
	f := newFixture(t, membership.Config{Logger: slog.New(slog.NewTextHandler(lockedWriter{&mu, &logged}, nil))})
	_, key := f.mesh("demo")
	inv := f.invite("demo", key, 1, "")
	req := joinRequest(t, inv.Link, newPubkey(t), "alice")

	ctx, cancel := context.WithCancel(context.Background())
	cancel() // gone before the statements run
	rec := httptest.NewRecorder()
	f.svc.HandleJoin(rec, httptest.NewRequestWithContext(ctx, http.MethodPost, protocol.PathJoin, bytes.NewReader(joinBody(t, req))))
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Equal(t, 1, f.usedCount(inv.ID), "the join completed")
	mu.Lock()
	defer mu.Unlock()
	require.NotContains(t, logged.String(), "level=ERROR")
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// slowSlot is a JoinBounds whose slot frees a moment after it is asked for, as when the
// replica's join statements are all taken.
type slowSlot struct{}

func (slowSlot) Allow(r *http.Request) (string, bool) { return r.RemoteAddr, true }
func (slowSlot) Acquire(ctx context.Context) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(20 * time.Millisecond):
		return true
	}
}
func (slowSlot) Release() {}

// A client that hangs up while its join waits for a statement slot is not told (nor counted,
// nor logged) busy: its join completes, as one whose client hangs up while it runs.
func TestHandleJoinWaitingForASlotCompletesWhenTheClientHangsUp(t *testing.T) {
	t.Parallel()
	var outcomes []string
	f := newFixture(t, membership.Config{JoinBounds: slowSlot{}, CountJoin: func(o string) { outcomes = append(outcomes, o) }})
	_, key := f.mesh("demo")
	inv := f.invite("demo", key, 1, "")
	req := joinRequest(t, inv.Link, newPubkey(t), "alice")

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	rec := httptest.NewRecorder()
	f.svc.HandleJoin(rec, httptest.NewRequestWithContext(ctx, http.MethodPost, protocol.PathJoin, bytes.NewReader(joinBody(t, req))))
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Equal(t, 1, f.usedCount(inv.ID), "the join completed")
	require.Equal(t, []string{membership.JoinOutcomeOK}, outcomes)
}
