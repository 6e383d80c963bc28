package broker

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"golang.org/x/sync/semaphore"
	"golang.org/x/time/rate"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// hookLimiter is a token bucket per key (a client address, a claimed pid + cwd, or a proven
// caller). It is per replica: a hook script hitting several replicas gets up to N× the rate,
// which is harmless for status signals and avoids a database write per request just to count.
//
// It holds at most maxKeys buckets, least recently used first out, and costs O(1) a request.
// A new key in a full store evicts the least recently used bucket, however young: refusing new
// keys instead would let whoever fills the store (100,000 fresh signing keys, or IPv6 /64s, in
// a minute) lock every other caller out, and the evicted owner's fresh allowance is worth
// nothing to such a flooder, who can always mint new keys. An idle key's bucket is full again
// after a minute anyway.
//
// Keys are held as 64-bit hashes under a seed of the process's own: a key can hold a 2 KiB cwd,
// and a hash keeps every bucket small whatever its key, while the seed keeps a client from
// choosing keys that share another's bucket.
type hookLimiter struct {
	mu      sync.Mutex
	perMin  int
	seed    maphash.Seed
	now     func() time.Time // tests move the clock
	buckets *simplelru.LRU[uint64, *hookBucket]
}

type hookBucket struct {
	lim *rate.Limiter
}

// limitVerdict is a hookLimiter's answer.
type limitVerdict int

const (
	limitAllowed limitVerdict = iota
	limitExceeded
)

// hookLimiterKeys bounds each hook limiter's buckets: about 250 bytes each, 25 MB at most.
const hookLimiterKeys = 100_000

func newHookLimiter(perMin, maxKeys int) *hookLimiter {
	lru, err := simplelru.NewLRU[uint64, *hookBucket](maxKeys, nil)
	if err != nil {
		panic(fmt.Sprintf("hook limiter: %v", err)) // maxKeys <= 0: a programming error
	}
	return &hookLimiter{perMin: perMin, seed: maphash.MakeSeed(), now: time.Now, buckets: lru}
}

func (h *hookLimiter) allow(key string) limitVerdict {
	k := maphash.String(h.seed, key)
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	b, ok := h.buckets.Get(k)
	if !ok {
		b = &hookBucket{lim: rate.NewLimiter(rate.Limit(float64(h.perMin)/60), h.perMin)}
		h.buckets.Add(k, b) // evicts the least recently used when full
	}
	if !b.lim.AllowN(now, 1) {
		return limitExceeded
	}
	return limitAllowed
}

// len is the number of buckets held (tests).
func (h *hookLimiter) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.buckets.Len()
}

// hookSlots bounds the hook statements a replica runs at once, so hooks can never take the
// whole database pool from sends and hellos. A request waits up to wait for a slot; beyond
// queue waiting, or after wait, it is refused (503, retryable).
type hookSlots struct {
	sem     *semaphore.Weighted
	waiting atomic.Int64
	queue   int64
	wait    time.Duration
}

func newHookSlots(concurrency, queue int, wait time.Duration) *hookSlots {
	return &hookSlots{sem: semaphore.NewWeighted(int64(concurrency)), queue: int64(queue), wait: wait}
}

// acquire takes a slot; release it with release. false: none within the wait, or the queue full.
func (s *hookSlots) acquire(ctx context.Context) bool {
	if s.sem.TryAcquire(1) {
		return true
	}
	if s.waiting.Add(1) > s.queue {
		s.waiting.Add(-1)
		return false
	}
	defer s.waiting.Add(-1)
	ctx, cancel := context.WithTimeout(ctx, s.wait)
	defer cancel()
	return s.sem.Acquire(ctx, 1) == nil
}

func (s *hookSlots) release() { s.sem.Release(1) }

// handleHook serves POST /hook/set-status. What it trusts: nothing before the client address's
// allowance (HOOK_RATE_LIMIT_PER_SOURCE_PER_MIN) is spent, which bounds what one address (an
// IPv6 /64) can make a replica verify. A signed request proves the member key that signed it
// (checked before any query, and accepted once within the skew window), so it changes that
// member's sessions only, rate-limited per key; a key no live member holds is refused 403 and
// writes nothing (migration 00048). The April clients' unsigned form proves nothing but the
// client address; it is accepted only when the operator allowed it (HOOK_ALLOW_UNSIGNED, or a
// broker listening on loopback only), behind HOOK_TOKEN when set, rate-limited per address
// and per claimed pid + cwd. At most HOOK_CONCURRENCY hook statements run at once.
type hooks struct {
	cfg       Config
	store     *store.Store
	signals   signals
	metrics   *Metrics
	log       *slog.Logger
	refusals  *sampledLog
	perSource *hookLimiter // per client address (IPv6: per /64), before anything else
	perPID    *hookLimiter // per claimed pid + cwd
	callers   *hookLimiter // per proven caller: member key of a signed hook, client address otherwise
	slots     *hookSlots   // hook statements in flight
}

// hookSlotWait is how long a hook waits for a statement slot before it is refused 503.
const hookSlotWait = time.Second

func newHooks(cfg Config, st *store.Store, sig signals, m *Metrics, log *slog.Logger, refusals *sampledLog) *hooks {
	return &hooks{cfg: cfg, store: st, signals: sig, metrics: m, log: log, refusals: refusals,
		perSource: newHookLimiter(cfg.HookRatePerSourceMin, hookLimiterKeys),
		perPID:    newHookLimiter(cfg.HookRatePerMin, hookLimiterKeys),
		callers:   newHookLimiter(cfg.HookRatePerCallerMin, hookLimiterKeys),
		slots:     newHookSlots(cfg.HookConcurrency, 64*cfg.HookConcurrency, hookSlotWait)}
}

// limited answers a request a limiter refused (429); true when it did.
func (s *hooks) limited(w http.ResponseWriter, v limitVerdict, what, source string) bool {
	if v == limitAllowed {
		return false
	}
	s.refusals.Info("hook refused: rate limited", "limiter", what, "source", source)
	s.hookFail(w, http.StatusTooManyRequests, "rate limited", "rate_limited")
	return true
}

// fromWebPage: a browser sends Origin with every cross-origin POST, a "simple" one included
// (text/plain, no preflight, which any page may send to 127.0.0.1), and Sec-Fetch-Site with
// every request; hook scripts and the CLI send neither.
func fromWebPage(r *http.Request) bool {
	site := r.Header.Get("Sec-Fetch-Site")
	return r.Header.Get("Origin") != "" || (site != "" && site != "none")
}

func (s *hooks) handleHook(w http.ResponseWriter, r *http.Request) {
	s.metrics.HookRequests.WithLabelValues("received").Inc()
	source := clientSource(r, s.cfg.TrustedProxyHeader)
	if s.limited(w, s.perSource.allow(source), "per_source", source) {
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, protocol.MaxHookBodyBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			s.refusals.Info("hook refused: body too large", "source", source, "limit", tooLarge.Limit)
			s.hookFail(w, http.StatusRequestEntityTooLarge, "body too large", "too_large")
			return
		}
		s.refusals.Info("hook body not read", "err", err, "source", source)
		s.hookFail(w, http.StatusBadRequest, "could not read body", "bad_request")
		return
	}
	req, err := protocol.ParseHookRequest(body)
	if err != nil {
		s.refusals.Info("bad hook request", "err", err, "source", source)
		msg := err.Error()
		if perr := (*protocol.Error)(nil); errors.As(err, &perr) {
			msg = perr.Message // the field and what is wrong, without the code in front
		}
		s.hookFail(w, http.StatusBadRequest, msg, "bad_request")
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
		if s.limited(w, s.callers.allow("k|"+member), "per_caller", source) {
			return
		}
	} else {
		if fromWebPage(r) {
			s.refusals.Info("unsigned hook refused: sent by a web page", "source", source)
			s.hookFail(w, http.StatusForbidden, "hooks from a web page are refused: an unsigned hook is trusted for coming "+
				"from this machine, and a page open in a browser is on it too; sign hooks (meshctl hook)", "unauthorized")
			return
		}
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
			if !tokenMatches(tok, s.cfg.HookToken) { // hashed first: its length is not timed either
				// A guess at the one secret that reaches every mesh: the operator must see it.
				s.refusals.Info("unsigned hook refused: missing or wrong hook token", "source", source)
				s.hookFail(w, http.StatusUnauthorized, "missing or wrong hook token", "unauthorized")
				return
			}
		}
		if s.limited(w, s.callers.allow("a|"+source), "per_caller", source) {
			return
		}
	}
	if s.limited(w, s.perPID.allow(member+"|"+strconv.Itoa(req.PID)+"|"+req.CWD), "per_pid", source) {
		return
	}
	// Run to its end when the client hangs up, as a join does: a hook script giving up (a short
	// curl timeout against a slow primary) is no failure of the database's, to be logged at Warn
	// and counted unavailable (or busy) as one, and the status it sent is still true. The slots
	// and opTimeout bound it all the same.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), opTimeout)
	defer cancel()
	if !s.slots.acquire(ctx) {
		s.refusals.Info("hook refused: too many in flight", "source", source)
		w.Header().Set("Retry-After", "1")
		s.hookFail(w, http.StatusServiceUnavailable, "broker busy: too many hook requests in flight; retry in a second", "busy")
		return
	}
	o, err := s.store.HookStatus(ctx, store.HookQuery{MemberPubkey: member, SessionID: req.SessionID, CWD: req.CWD, PID: req.PID},
		string(req.Status), s.cfg.HookFreshWindow, signatureOf(req), signatureExpiry(time.UnixMilli(req.Timestamp)))
	s.slots.release()
	switch {
	case err != nil:
		s.metrics.warnRepeated(s.log, "hook could not be applied", "session_id", req.SessionID, "status", req.Status, "err", err)
		s.hookFail(w, http.StatusServiceUnavailable, "broker could not apply the status; retry", "unavailable")
		return
	case o.Replayed:
		s.refusals.Info("hook refused", "reason", "replayed", "source", source)
		s.hookFail(w, http.StatusUnauthorized, "this signed hook was already used: sign a new one", "unauthorized")
		return
	case o.NotMember:
		s.refusals.Info("hook refused", "reason", "not_member", "source", source)
		s.hookFail(w, http.StatusForbidden, "the signing key is no live member's on this broker: join a mesh with it first "+
			"(meshctl join), or it was revoked", "forbidden")
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
