package broker

import (
	"context"
	"crypto/subtle"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// hookLimiter is a token bucket per key (a claimed pid + cwd, or a proven caller). It is per
// replica: a hook script hitting several replicas gets up to N× the rate, which is harmless
// for status signals and avoids a database write per request just to count.
type hookLimiter struct {
	mu      sync.Mutex
	perMin  int
	buckets map[string]*hookBucket
}

type hookBucket struct {
	lim  *rate.Limiter
	seen time.Time
}

func newHookLimiter(perMin int) *hookLimiter {
	return &hookLimiter{perMin: perMin, buckets: map[string]*hookBucket{}}
}

func (h *hookLimiter) allow(key string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := time.Now()
	b := h.buckets[key]
	if b == nil {
		if len(h.buckets) > 100_000 { // bound memory: forget idle buckets
			for k, v := range h.buckets {
				if now.Sub(v.seen) > time.Minute {
					delete(h.buckets, k)
				}
			}
		}
		b = &hookBucket{lim: rate.NewLimiter(rate.Limit(float64(h.perMin)/60), h.perMin)}
		h.buckets[key] = b
	}
	b.seen = now
	return b.lim.Allow()
}

// handleHook serves POST /hook/set-status. What it trusts: a signed request proves the member
// key that signed it (checked before any query, and accepted once within the skew window),
// so it changes that member's sessions only, rate-limited per key. The April clients' unsigned
// form proves nothing but the client address; it is accepted only when the operator allowed it
// (HOOK_ALLOW_UNSIGNED, or a broker listening on loopback only), behind HOOK_TOKEN when set,
// rate-limited per address and per claimed pid + cwd.
// hooks serves POST /hook/set-status.
type hooks struct {
	cfg      Config
	store    *store.Store
	signals  signals
	metrics  *Metrics
	log      *slog.Logger
	refusals *sampledLog
	perPID   *hookLimiter // per claimed pid + cwd
	callers  *hookLimiter // per proven caller: member key of a signed hook, client address otherwise
}

func (s *hooks) handleHook(w http.ResponseWriter, r *http.Request) {
	s.metrics.HookRequests.WithLabelValues("received").Inc()
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, protocol.MaxHookBodyBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			s.hookFail(w, http.StatusRequestEntityTooLarge, "body too large", "too_large")
			return
		}
		s.hookFail(w, http.StatusBadRequest, "could not read body", "bad_request")
		return
	}
	source := clientSource(r, s.cfg.TrustedProxyHeader)
	req, err := protocol.ParseHookRequest(body)
	if err != nil {
		s.refusals.Info("bad hook request", "err", err, "source", source)
		s.hookFail(w, http.StatusBadRequest, err.Error(), "bad_request")
		return
	}
	if req.Status == protocol.StatusDND {
		s.hookFail(w, http.StatusBadRequest, "status: hooks cannot set dnd (only the peer itself can)", "bad_request")
		return
	}
	var member string // "" for the unsigned form: any session may match
	if req.Signed() {
		if msg := checkSignedHook(&req, time.Now()); msg != "" {
			s.refusals.Info("hook refused", "reason", msg, "source", source)
			s.hookFail(w, http.StatusUnauthorized, msg, "unauthorized")
			return
		}
		member, _ = protocol.NormalizePubkey(req.Pubkey)
		if !s.callers.allow("k|" + member) {
			s.hookFail(w, http.StatusTooManyRequests, "rate limited", "rate_limited")
			return
		}
	} else {
		if !s.cfg.UnsignedHooks() {
			s.refusals.Info("unsigned hook refused", "source", source)
			s.hookFail(w, http.StatusUnauthorized, "hooks must be signed by the member key (meshctl hook signs them); "+
				"this broker does not accept unsigned hooks (HOOK_ALLOW_UNSIGNED)", "unauthorized")
			return
		}
		if s.cfg.HookToken != "" {
			tok := r.Header.Get(protocol.HookTokenHeader)
			if tok == "" {
				tok = req.HookToken
			}
			if subtle.ConstantTimeCompare([]byte(tok), []byte(s.cfg.HookToken)) != 1 {
				s.hookFail(w, http.StatusUnauthorized, "missing or wrong hook token", "unauthorized")
				return
			}
		}
		if !s.callers.allow("a|" + source) {
			s.hookFail(w, http.StatusTooManyRequests, "rate limited", "rate_limited")
			return
		}
	}
	if !s.perPID.allow(member + "|" + strconv.Itoa(req.PID) + "|" + req.CWD) {
		s.hookFail(w, http.StatusTooManyRequests, "rate limited", "rate_limited")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), opTimeout)
	defer cancel()
	o, err := s.store.HookStatus(ctx, store.HookQuery{MemberPubkey: member, SessionID: req.SessionID, CWD: req.CWD, PID: req.PID},
		string(req.Status), s.cfg.HookFreshWindow, signatureOf(req), signatureExpiry(time.UnixMilli(req.Timestamp)))
	if err == nil && o.Replayed {
		s.refusals.Info("hook refused", "reason", "replayed", "source", source)
		s.hookFail(w, http.StatusUnauthorized, "this signed hook was already used: sign a new one", "unauthorized")
		return
	}
	if err != nil {
		s.log.Warn("hook could not be applied", "session_id", req.SessionID, "status", req.Status, "err", err)
		s.hookFail(w, http.StatusServiceUnavailable, "broker could not apply the status; retry", "unavailable")
		return
	}
	s.metrics.HookRequests.WithLabelValues("ok").Inc()
	if o.Pending || len(o.PresenceIDs) == 0 {
		writeJSON(w, http.StatusOK, protocol.HookResponse{OK: true, Pending: true})
		return
	}
	writeJSON(w, http.StatusOK, protocol.HookResponse{OK: true, PresenceID: o.PresenceIDs[0]})
}

// signatureOf is a signed hook's normalized signature, "" for an unsigned one.
func signatureOf(req protocol.HookRequest) string {
	if !req.Signed() {
		return ""
	}
	sig, _ := protocol.NormalizeSignature(req.Signature)
	return sig
}

// checkSignedHook runs the checks of a signed hook that need no database; "" when it passes.
func checkSignedHook(r *protocol.HookRequest, now time.Time) string {
	if skew := now.Sub(time.UnixMilli(r.Timestamp)); skew > helloMaxSkew || skew < -helloMaxSkew {
		return "timestamp is more than 60 s from the broker clock"
	}
	if !protocol.VerifyHook(r) {
		return "signature does not verify"
	}
	return ""
}

func (s *hooks) hookFail(w http.ResponseWriter, code int, msg, label string) {
	s.metrics.HookRequests.WithLabelValues(label).Inc()
	writeJSON(w, code, protocol.HookResponse{OK: false, Error: msg})
}
