package broker

import (
	"context"
	"net"
	"net/http"
	"sync"
	"time"
)

// maxHeaderBytes bounds a plain request's and an upgrade's request line and headers (net/http
// allows 1 MiB by default). What the broker's clients send (a hook, a join, an upgrade, and what
// a proxy adds) is well under 2 KiB.
const maxHeaderBytes = 16 << 10

// plainConns counts the HTTP connections not upgraded to a WebSocket (hooks, joins, health,
// kept-alive or sending their headers) and closes a new one beyond its limits. The WebSocket
// gate counts only upgrades; without this one client holds as many sockets, and so open
// files, as it opens, and the sessions' share of the open-file limit goes with them.
//
// Per source only where the connection's address is the client's (no TRUSTED_PROXY_HEADER):
// behind a proxy every connection comes from the proxy, and the client's address is in a
// header this layer has not read yet. The replica-wide limit holds either way.
type plainConns struct {
	max, perSource int // perSource 0: not kept per source
	onRefuse       func(source string, replicaWide bool)

	mu       sync.Mutex
	open     int
	bySource map[string]int
	sources  map[net.Conn]string
}

func newPlainConns(max, perSource int, onRefuse func(source string, replicaWide bool)) *plainConns {
	return &plainConns{max: max, perSource: perSource, onRefuse: onRefuse,
		bySource: map[string]int{}, sources: map[net.Conn]string{}}
}

// plainConnLimit is the replica-wide limit: a quarter of the sessions the open-file limit
// allows, between 64 and 1,024 (hook scripts open one connection a call and close it).
func plainConnLimit(sessionCapacity int) int {
	return min(max(sessionCapacity/4, 64), 1024)
}

// track is an http.Server's ConnState. Every connection ends in exactly one of Hijacked (a
// WebSocket, counted by the gate from then on) and Closed.
func (p *plainConns) track(c net.Conn, st http.ConnState) {
	switch st {
	case http.StateNew:
		source := ""
		if p.perSource > 0 {
			source = hostOf(c.RemoteAddr())
		}
		p.mu.Lock()
		p.open++
		p.sources[c] = source
		p.bySource[source]++
		overReplica, overSource := p.open > p.max, p.perSource > 0 && p.bySource[source] > p.perSource
		p.mu.Unlock()
		if overReplica || overSource {
			// Closed before a byte is read: net/http then moves it to StateClosed, which
			// uncounts it.
			_ = c.Close()
			p.onRefuse(source, overReplica)
		}
	case http.StateHijacked, http.StateClosed:
		p.mu.Lock()
		if source, ok := p.sources[c]; ok {
			delete(p.sources, c)
			p.open--
			if p.bySource[source]--; p.bySource[source] == 0 {
				delete(p.bySource, source)
			}
		}
		p.mu.Unlock()
	}
}

func hostOf(a net.Addr) string {
	if host, _, err := net.SplitHostPort(a.String()); err == nil {
		return host
	}
	return a.String()
}

// healthPing shares one database ping among /health requests: at most one in flight, its
// answer reused for healthPingFresh. A flood of /health (unauthenticated, and a load balancer
// asks often) costs the pool one connection now and then, not one per request. The ping does
// not run on a request's context either: a client that hangs up is not the database down.
type healthPing struct {
	ping func(context.Context) error

	mu       sync.Mutex
	at       time.Time
	err      error
	inFlight chan struct{}
}

const (
	healthPingFresh   = time.Second
	healthPingTimeout = 2 * time.Second
)

// result is the latest ping's error, pinging first when it is older than healthPingFresh. It
// waits for a ping in flight, or until ctx ends (then the last answer stands).
func (h *healthPing) result(ctx context.Context) error {
	h.mu.Lock()
	if time.Since(h.at) < healthPingFresh {
		err := h.err
		h.mu.Unlock()
		return err
	}
	wait := h.inFlight
	if wait == nil {
		wait = make(chan struct{})
		h.inFlight = wait
		go func() {
			pctx, cancel := context.WithTimeout(context.Background(), healthPingTimeout)
			err := h.ping(pctx)
			cancel()
			h.mu.Lock()
			h.at, h.err, h.inFlight = time.Now(), err, nil
			h.mu.Unlock()
			close(wait)
		}()
	}
	h.mu.Unlock()
	select {
	case <-wait:
	case <-ctx.Done():
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err
}
