package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
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
