package broker

import (
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/olahol/melody"
	"golang.org/x/time/rate"
)

// gate bounds what unauthenticated sockets can make a replica hold. A socket is counted from
// before its upgrade until its hello succeeds or it closes: at most maxTotal per replica and
// maxPerSource per client address, and each must finish its hello within timeout. Refusals
// happen before the upgrade, so they cost an HTTP status line and no goroutine.
type gate struct {
	maxTotal, maxPerSource int
	timeout                time.Duration

	mu       sync.Mutex
	total    int
	bySource map[string]int
	pending  map[*conn]struct{}
}

func newGate(maxTotal, maxPerSource int, timeout time.Duration) *gate {
	return &gate{maxTotal: maxTotal, maxPerSource: maxPerSource, timeout: timeout,
		bySource: map[string]int{}, pending: map[*conn]struct{}{}}
}

// admit counts a socket about to be upgraded; "" means admitted, else the refusal reason.
func (g *gate) admit(c *conn) string {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.total >= g.maxTotal {
		return "unauthenticated_limit"
	}
	if g.bySource[c.source] >= g.maxPerSource {
		return "source_limit"
	}
	g.total++
	g.bySource[c.source]++
	c.admitted = time.Now()
	g.pending[c] = struct{}{}
	return ""
}

// attach records c's socket once upgraded, so the deadline can close it.
func (g *gate) attach(c *conn, ms *melody.Session) {
	g.mu.Lock()
	c.ms = ms
	g.mu.Unlock()
}

// release uncounts c (hello succeeded, upgrade failed or socket closed); it is idempotent.
func (g *gate) release(c *conn) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.pending[c]; !ok {
		return
	}
	delete(g.pending, c)
	g.total--
	if n := g.bySource[c.source] - 1; n > 0 {
		g.bySource[c.source] = n
	} else {
		delete(g.bySource, c.source)
	}
}

// expired returns the sockets whose hello deadline passed and uncounts them.
func (g *gate) expired(now time.Time) []*conn {
	g.mu.Lock()
	var out []*conn
	for c := range g.pending {
		if now.Sub(c.admitted) >= g.timeout && c.ms != nil {
			out = append(out, c)
		}
	}
	g.mu.Unlock()
	for _, c := range out {
		g.release(c)
	}
	return out
}

// unauthenticated is the number of sockets counted now (for /health and tests).
func (g *gate) unauthenticated() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.total
}

// clientSource is the address a request's limits are keyed by: the TCP peer, or, behind a
// proxy the operator trusts (TRUSTED_PROXY_HEADER), the client address that proxy reports.
// Trusting a header by default would let any client pick its own key. An IPv6 address is
// keyed by its /64: one host is usually given a whole /64 and can rotate within it at will.
func clientSource(r *http.Request, trustedHeader string) string {
	if trustedHeader != "" {
		// A proxy appends the address it saw to X-Forwarded-For, after whatever the client
		// sent (a list, or several header lines): only the last entry is the proxy's.
		if vs := r.Header.Values(trustedHeader); len(vs) > 0 {
			v := vs[len(vs)-1]
			if i := strings.LastIndexByte(v, ','); i >= 0 {
				v = v[i+1:]
			}
			if a, err := netip.ParseAddr(strings.TrimSpace(v)); err == nil {
				return sourceKey(a)
			}
		}
	}
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		return sourceKey(ap.Addr())
	}
	return r.RemoteAddr
}

// sourceKey is a's limit key: an IPv4 address (IPv4-mapped IPv6 included) whole, an IPv6
// address's /64 prefix.
func sourceKey(a netip.Addr) string {
	a = a.Unmap().WithZone("")
	if a.Is4() {
		return a.String()
	}
	p, _ := a.Prefix(64)
	return p.String()
}

// sampledLog logs refusals an attacker can trigger at will (bad hellos, bad frames, bad hook
// requests) at most burst at once and perSecond after, and says how many it left out, so a
// flood can't fill the disk or drown other lines. Every refusal is still counted in a metric.
type sampledLog struct {
	log        *slog.Logger
	lim        *rate.Limiter
	mu         sync.Mutex
	suppressed int
}

func newSampledLog(log *slog.Logger, perSecond float64, burst int) *sampledLog {
	return &sampledLog{log: log, lim: rate.NewLimiter(rate.Limit(perSecond), burst)}
}

// Info logs msg unless the rate is exceeded; the next logged line carries the count of the
// lines left out since.
func (l *sampledLog) Info(msg string, args ...any) {
	if !l.lim.Allow() {
		l.mu.Lock()
		l.suppressed++
		l.mu.Unlock()
		return
	}
	l.mu.Lock()
	n := l.suppressed
	l.suppressed = 0
	l.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed_since_last", n)
	}
	l.log.Info(msg, args...)
}
