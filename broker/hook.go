package broker

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/time/rate"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// hookLimiter is a token bucket per pid+cwd. It is per replica: a hook script hitting
// several replicas gets up to N× the rate, which is harmless for status signals and avoids a
// database write per request just to count.
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

func (s *Server) handleHook(w http.ResponseWriter, r *http.Request) {
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
	req, err := protocol.ParseHookRequest(body)
	if err != nil {
		s.log.Info("bad hook request", "err", err, "remote", r.RemoteAddr)
		s.hookFail(w, http.StatusBadRequest, err.Error(), "bad_request")
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
	if req.Status == protocol.StatusDND {
		s.hookFail(w, http.StatusBadRequest, "status: hooks cannot set dnd (only the peer itself can)", "bad_request")
		return
	}
	if !s.hookLimit.allow(strconv.Itoa(req.PID) + "|" + req.CWD) {
		s.hookFail(w, http.StatusTooManyRequests, "rate limited", "rate_limited")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), opTimeout)
	defer cancel()
	presence, pending, err := s.applyHook(ctx, req)
	if err != nil {
		s.log.Warn("hook could not be applied", "cwd", req.CWD, "session_id", req.SessionID, "status", req.Status, "err", err)
		s.hookFail(w, http.StatusServiceUnavailable, "broker could not apply the status; retry", "unavailable")
		return
	}
	s.metrics.HookRequests.WithLabelValues("ok").Inc()
	if pending {
		writeJSON(w, http.StatusOK, protocol.HookResponse{OK: true, Pending: true})
		return
	}
	writeJSON(w, http.StatusOK, protocol.HookResponse{OK: true, PresenceID: presence})
}

func (s *Server) hookFail(w http.ResponseWriter, code int, msg, label string) {
	s.metrics.HookRequests.WithLabelValues(label).Inc()
	writeJSON(w, code, protocol.HookResponse{OK: false, Error: msg})
}

// applyHook resolves the hook's sessions cluster-wide and applies the status to each (a
// Claude Code session may be in several meshes). With no match yet, the signal waits in
// pending_status for the session's hello (the first-turn race).
func (s *Server) applyHook(ctx context.Context, req protocol.HookRequest) (string, bool, error) {
	var first string
	pending := false
	err := s.inTx(ctx, func(q *db.Queries, o *pgbus.Outbox) ([]audit.Entry, error) {
		ids, err := q.HookTargets(ctx, db.HookTargetsParams{SessionID: req.SessionID, Pid: int32(req.PID), Cwd: req.CWD})
		if err != nil {
			return nil, fmt.Errorf("resolve hook targets: %w", err)
		}
		if len(ids) == 0 {
			pending = true
			var sid *string
			if req.SessionID != "" {
				sid = &req.SessionID
			}
			var pid *int32
			if req.PID != 0 {
				p := int32(req.PID)
				pid = &p
			}
			return nil, q.InsertPendingStatus(ctx, db.InsertPendingStatusParams{Cwd: req.CWD, Pid: pid, SessionID: sid, Status: string(req.Status)})
		}
		first = ids[0]
		for _, id := range ids {
			row, err := q.ApplyStatus(ctx, s.applyStatusParams(id, req.Status, sourceHook))
			if errors.Is(err, pgx.ErrNoRows) {
				continue // dnd: hooks never change it
			}
			if err != nil {
				return nil, fmt.Errorf("apply status: %w", err)
			}
			s.statusChanged(o, statusRow(row))
		}
		return nil, nil
	})
	return first, pending, err
}
