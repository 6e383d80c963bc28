package client

import (
	"errors"
	"math/rand/v2"
	"time"

	"github.com/claudemesh/broker/protocol"
)

// The client never reconnects by itself (see the package comment); these helpers let callers
// that do (the peer CLI's listen) follow the protocol's close-code table.

// ShouldReconnect reports whether a connection that ended with close code and reason may be
// dialled again: not after a refused hello (1008), a kick (4001), a revocation (4002) or a
// newer session taking this one over (1000 session_replaced). Any other end (1001, 1006,
// 1012 draining, 4008 slow consumer, a plain 1000, no close frame) is worth a retry.
func ShouldReconnect(code int, reason string) bool {
	switch code {
	case protocol.CloseHelloRefused, protocol.CloseKicked, protocol.CloseRevoked:
		return false
	case protocol.CloseSessionReplaced:
		return reason != protocol.CloseReasonSessionReplaced
	}
	return true
}

// DialRetryable reports whether a Dial error is transient: a network failure or a broker that
// closed during the handshake for its own reasons (1001 "internal", 1013 "overloaded" or
// "rate_limited", by code when the close frame came too late) is; a refused hello (1008: bad
// credentials, capacity, ...), a revoked member (4002) or an upgrade answered with a status
// no retry mends (404: not a broker's URL) is not.
func DialRetryable(err error) bool {
	var he *HelloError
	if errors.As(err, &he) {
		if he.CloseCode != 0 {
			return ShouldReconnect(he.CloseCode, he.CloseReason)
		}
		switch he.Code {
		// The broker's own trouble or load, answered "retry in a moment" (close 1013).
		case "", "internal", protocol.CodeOverloaded, protocol.CodeRateLimited:
			return true
		}
		return false
	}
	var ue *UpgradeError
	if errors.As(err, &ue) {
		return ue.Retryable()
	}
	return err != nil
}

// Backoff computes jittered exponential reconnect delays: attempt n waits a uniformly random
// duration in [Min/2, min(Max, Min·2ⁿ)], so a fleet of peers cut off at once does not come
// back in lockstep. The zero value uses 250 ms and 30 s. Not safe for concurrent use.
type Backoff struct {
	Min, Max time.Duration
	attempt  int
}

// Next returns the delay before the next attempt and counts it.
func (b *Backoff) Next() time.Duration {
	lo, hi := b.Min, b.Max
	if lo <= 0 {
		lo = 250 * time.Millisecond
	}
	if hi <= 0 {
		hi = 30 * time.Second
	}
	ceil := lo << min(b.attempt, 20)
	if ceil <= 0 || ceil > hi {
		ceil = hi
	}
	b.attempt++
	floor := lo / 2
	if ceil <= floor {
		return ceil
	}
	return floor + rand.N(ceil-floor+1)
}

// Reset starts the sequence over (after a connection that stayed up for a while).
func (b *Backoff) Reset() { b.attempt = 0 }
