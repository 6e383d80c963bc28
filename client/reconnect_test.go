package client

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/protocol"
)

func TestShouldReconnect(t *testing.T) {
	for _, tc := range []struct {
		code   int
		reason string
		want   bool
	}{
		{protocol.CloseHelloRefused, "unauthorized", false},
		{protocol.CloseKicked, "", false},
		{protocol.CloseRevoked, "revoked", false},
		{protocol.CloseSessionReplaced, protocol.CloseReasonSessionReplaced, false},
		{protocol.CloseSessionReplaced, "", true},
		{protocol.CloseGoingAway, "", true},
		{protocol.CloseDraining, "draining", true},
		{protocol.CloseSlowConsumer, "", true},
		{1006, "", true},
		{0, "", true},
	} {
		require.Equal(t, tc.want, ShouldReconnect(tc.code, tc.reason), "%d %q", tc.code, tc.reason)
	}
}

func TestDialRetryable(t *testing.T) {
	require.False(t, DialRetryable(nil))
	require.True(t, DialRetryable(errors.New("dial tcp: connection refused")))
	require.False(t, DialRetryable(&HelloError{Code: protocol.CodeUnauthorized, CloseCode: protocol.CloseHelloRefused}))
	require.False(t, DialRetryable(&HelloError{Code: protocol.CodeRevoked, CloseCode: protocol.CloseRevoked}))
	require.False(t, DialRetryable(&HelloError{Code: protocol.CodeCapacity}), "refused, close frame not seen")
	require.True(t, DialRetryable(&HelloError{Code: "internal", CloseCode: protocol.CloseGoingAway}))
	require.True(t, DialRetryable(&HelloError{CloseCode: 1006}))
	require.True(t, DialRetryable(&HelloError{}))
	// Refusals that say "retry shortly" are retried even when their close frame (1013) was
	// not seen before the handshake deadline.
	require.True(t, DialRetryable(&HelloError{Code: protocol.CodeOverloaded}))
	require.True(t, DialRetryable(&HelloError{Code: protocol.CodeRateLimited}))
	require.True(t, DialRetryable(&HelloError{Code: protocol.CodeOverloaded, CloseCode: protocol.CloseTryAgainLater}))
	// An upgrade answered with a status: "later" is retried, a wrong URL or credentials not.
	for status, retry := range map[int]bool{503: true, 502: true, 429: true, 408: true, 404: false, 400: false, 401: false, 403: false} {
		require.Equal(t, retry, DialRetryable(fmt.Errorf("connect: %w", &UpgradeError{Status: status})), "HTTP %d", status)
	}
}

func TestBackoff(t *testing.T) {
	b := Backoff{Min: 100 * time.Millisecond, Max: time.Second}
	for i := range 50 {
		d := b.Next()
		require.GreaterOrEqual(t, d, 50*time.Millisecond)
		ceil := time.Second
		if i < 4 {
			ceil = 100 * time.Millisecond << i
		}
		require.LessOrEqual(t, d, ceil, "attempt %d", i)
	}
	b.Reset()
	require.LessOrEqual(t, b.Next(), 100*time.Millisecond)
	var zero Backoff
	require.LessOrEqual(t, zero.Next(), 250*time.Millisecond)
}
