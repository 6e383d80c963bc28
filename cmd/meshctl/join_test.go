package main

import (
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/protocol"
)

// A broker with too many joins in flight answers 503 + Retry-After before running the join:
// meshctl tries again and joins. A refusal (400, 429) is not retried; a broker busy every
// time is given up on after a few tries, with its answer.
func TestJoinRetriesWhenTheBrokerIsBusy(t *testing.T) {
	t.Parallel()
	serve := func(answers ...int) (*httptest.Server, *atomic.Int32) {
		var calls atomic.Int32
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			code := answers[min(int(calls.Add(1))-1, len(answers)-1)]
			w.Header().Set("Retry-After", "0") // at once (postJoin waits 100 ms; a second without the header)
			w.WriteHeader(code)
			res := protocol.JoinResponse{OK: code == http.StatusOK, Error: "busy; retry"}
			if res.OK {
				res = protocol.JoinResponse{OK: true, MemberID: "m1"}
			}
			_ = json.NewEncoder(w).Encode(res)
		}))
		t.Cleanup(srv.Close)
		return srv, &calls
	}
	busy, refused, rateLimited := http.StatusServiceUnavailable, http.StatusBadRequest, http.StatusTooManyRequests

	srv, calls := serve(busy, busy, http.StatusOK)
	res, err := postJoin(context.Background(), srv.URL+protocol.PathJoin, protocol.JoinRequest{})
	require.NoError(t, err)
	require.Equal(t, "m1", res.MemberID)
	require.Equal(t, int32(3), calls.Load())

	for _, code := range []int{refused, rateLimited} {
		srv, calls = serve(code)
		_, err = postJoin(context.Background(), srv.URL+protocol.PathJoin, protocol.JoinRequest{})
		require.Error(t, err)
		require.Equal(t, int32(1), calls.Load(), "HTTP %d is not retried", code)
	}

	srv, calls = serve(busy)
	_, err = postJoin(context.Background(), srv.URL+protocol.PathJoin, protocol.JoinRequest{})
	require.ErrorContains(t, err, "HTTP 503")
	require.Equal(t, int32(joinAttempts), calls.Load())
}

// An invite that names a mesh already joined, at another broker, is a lure meshctl refuses
// before sending anything: accepted, it moved every later command (and this identity's signed
// hellos) to that broker. --replace joins it; the same invite again is harmless.
func TestJoinRefusesAMeshIDAlreadyJoinedElsewhere(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1, nil)
	link := e.invite(2)
	alice := newCLI(t)
	alice.must("init", "--name", "alice")
	alice.must("join", link)
	require.Contains(t, alice.must("join", link), "already a member", "the same invite again")

	var calls atomic.Int32
	lure := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		calls.Add(1)
		_ = json.NewEncoder(w).Encode(protocol.JoinResponse{OK: true, MemberID: "m-lure"})
	}))
	t.Cleanup(lure.Close)
	_, real, err := protocol.ParseInviteLink(link)
	require.NoError(t, err)
	fake := *real
	fake.BrokerURL = "ws" + strings.TrimPrefix(lure.URL, "http") + "/ws"
	pub, priv, err := ed25519.GenerateKey(nil)
	require.NoError(t, err)
	fake.OwnerPubkey = hex.EncodeToString(pub)
	require.NoError(t, protocol.SignInvite(priv, &fake))
	token, err := protocol.EncodeInviteToken(&fake)
	require.NoError(t, err)
	before, err := os.ReadFile(filepath.Join(alice.home, "meshes.json"))
	require.NoError(t, err)

	_, _, err = alice.run("", "join", protocol.InviteLink(token))
	require.ErrorContains(t, err, "you are already in mesh demo")
	require.ErrorContains(t, err, "--replace")
	require.Zero(t, calls.Load(), "nothing sent to the lure")
	after, err := os.ReadFile(filepath.Join(alice.home, "meshes.json"))
	require.NoError(t, err)
	require.Equal(t, string(before), string(after), "meshes.json untouched")

	require.Contains(t, alice.must("join", "--replace", protocol.InviteLink(token)), "m-lure")
	require.EqualValues(t, 1, calls.Load())
}

// Joining a mesh again through --broker is the user's own choice of broker, not the invite's:
// it is not refused as a lure, and the broker given is stored, as docs/meshctl.md says. The same
// broker spelled another way (http://host for ws://host/ws) is no other broker either.
func TestJoinAgainThroughBroker(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 2, nil)
	link := e.invite(5)
	bob := newCLI(t)
	bob.must("init", "--name", "bob")
	require.Contains(t, bob.must("join", link), "joined mesh demo as bob")
	// The invite's broker (replica 0, ws://host/ws), spelled as its HTTP base.
	require.Contains(t, bob.must("--broker", e.httpURL(0), "join", link), "already a member")
	// Another replica, named with --broker: stored from now on.
	out := bob.must("--broker", e.httpURL(1), "join", link)
	require.Contains(t, out, "already a member")
	require.Contains(t, out, "broker: "+e.httpURL(1))
	require.Contains(t, bob.must("--broker", e.httpURL(1), "join", link), "already a member")
	// An invite naming another root key is still refused, --broker or not.
	_, real, err := protocol.ParseInviteLink(link)
	require.NoError(t, err)
	fake := *real
	fake.MeshRootKey = strings.Repeat("A", len(real.MeshRootKey))
	pub, priv, err := ed25519.GenerateKey(nil)
	require.NoError(t, err)
	fake.OwnerPubkey = hex.EncodeToString(pub)
	require.NoError(t, protocol.SignInvite(priv, &fake))
	token, err := protocol.EncodeInviteToken(&fake)
	require.NoError(t, err)
	_, _, err = bob.run("", "--broker", e.httpURL(1), "join", protocol.InviteLink(token))
	require.ErrorContains(t, err, "with another root key")
}
