package broker

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"
)

// maxHeaderBytes bounds a plain request's and an upgrade's request line and headers (net/http
// allows 1 MiB by default). What the broker's clients send (a hook, a join, an upgrade, and what
// a proxy adds) is well under 2 KiB.
const maxHeaderBytes = 16 << 10

// plainConns counts the HTTP connections not upgraded to a WebSocket (hooks, joins, health,
// kept-alive or sending their headers). The WebSocket gate counts only upgrades; without this
// one client holds as many sockets, and so open files, as it opens, and the sessions' share of
// the open-file limit goes with them.
//
// Per source (an IPv6 /64, as every per-address limit here) a new connection beyond the limit
// is closed unread. At the replica's limit the connection that has waited longest without a
// request being served (still sending its headers, or kept alive between requests) is closed
// to make room: many sources holding idle connections can't keep a new client, a health
// check or an upgrade out, since a request is served in milliseconds and what waits longest is
// theirs. Only with every connection in a request is the new one closed.
//
// Per source only where the connection's address is the client's (no TRUSTED_PROXY_HEADER):
// behind a proxy every connection comes from the proxy, and the client's address is in a
// header this layer has not read yet. The replica-wide limit holds either way.
//
// Past max, the replica's limit grows to the session slots not in use (room), up to ceiling:
// every session connects through this state, so a replica taking over a dead one's sessions
// (thousands at once, each waiting here until the replica reads its upgrade) must not close
// them as if they held open files the sessions need: they are those sessions. The ceiling is
// max plus what the WebSocket gate lets wait for a hello (MAX_UNAUTHENTICATED_SOCKETS): a
// storm's sockets pass the gate anyway, and many sources must not hold a connection's memory
// for every open file the limit allows. One source may hold a quarter of the limit.
type plainConns struct {
	max, perSource int        // perSource 0: not kept per source
	ceiling        int        // the most room may raise the limit to
	room           func() int // session slots not in use; nil: max and perSource as given
	onRefuse       func(source string, replicaWide bool, limit int)

	mu       sync.Mutex
	bySource map[string]int
	conns    map[net.Conn]*plainConn
}

type plainConn struct {
	source  string
	waiting bool      // StateNew or StateIdle: no request being served
	since   time.Time // when it began waiting
}

func newPlainConns(max, perSource, ceiling int, room func() int, onRefuse func(source string, replicaWide bool, limit int)) *plainConns {
	return &plainConns{max: max, perSource: perSource, ceiling: ceiling, room: room, onRefuse: onRefuse,
		bySource: map[string]int{}, conns: map[net.Conn]*plainConn{}}
}

// limits are the replica's and one source's limits for the count'th connection, or for
// source's n'th (perSource: the configured one). The room is asked only past the floor's
// share, so a replica's usual hooks and health checks never take the hub's and gate's locks.
func (p *plainConns) limits(count, n int) (replica, source int) {
	if p.room == nil {
		return p.max, p.perSource
	}
	replica = p.max
	if count > p.max || (p.perSource > 0 && n > perSourceLimit(p.perSource, p.max)) {
		replica = min(max(p.max, p.room()), max(p.ceiling, p.max))
	}
	return replica, perSourceLimit(p.perSource, replica)
}

// plainConnLimit is the replica-wide limit's floor: a quarter of the sessions the open-file
// limit allows, between 64 and 1,024 (hook scripts open one connection a call and close it).
func plainConnLimit(sessionCapacity int) int {
	return min(max(sessionCapacity/4, 64), 1024)
}

// perSourceLimit keeps one source's share below the replica's: a few sources can't fill it.
func perSourceLimit(configured, replicaWide int) int {
	return min(configured, max(replicaWide/4, 1))
}

// track is an http.Server's ConnState. Every connection ends in exactly one of Hijacked (a
// WebSocket, counted by the gate from then on) and Closed.
func (p *plainConns) track(c net.Conn, st http.ConnState) {
	switch st {
	case http.StateNew:
		source := ""
		if p.perSource > 0 {
			source = addrSource(c.RemoteAddr())
		}
		p.mu.Lock()
		p.conns[c] = &plainConn{source: source, waiting: true, since: time.Now()}
		p.bySource[source]++
		count, n := len(p.conns), p.bySource[source]
		p.mu.Unlock()
		// Asked outside the lock: room takes the hub's and the gate's.
		maxReplica, maxSource := p.limits(count, n)
		p.mu.Lock()
		var evict net.Conn
		overSource := p.perSource > 0 && p.bySource[source] > maxSource
		overReplica := !overSource && len(p.conns) > maxReplica
		evictedSource := ""
		if overReplica {
			if evict = p.longestWaiting(c); evict != nil {
				evictedSource = p.conns[evict].source
			}
		}
		p.mu.Unlock()
		switch {
		case overSource || (overReplica && evict == nil):
			// Closed before a byte is read: net/http then moves it to StateClosed, which
			// uncounts it.
			_ = c.Close()
			if overReplica {
				p.onRefuse(source, true, maxReplica)
			} else {
				p.onRefuse(source, false, maxSource)
			}
		case evict != nil:
			_ = evict.Close()
			p.onRefuse(evictedSource, true, maxReplica)
		}
	case http.StateActive, http.StateIdle:
		p.mu.Lock()
		if pc := p.conns[c]; pc != nil {
			pc.waiting = st == http.StateIdle
			pc.since = time.Now()
		}
		p.mu.Unlock()
	case http.StateHijacked, http.StateClosed:
		p.mu.Lock()
		if pc, ok := p.conns[c]; ok {
			delete(p.conns, c)
			if p.bySource[pc.source]--; p.bySource[pc.source] == 0 {
				delete(p.bySource, pc.source)
			}
		}
		p.mu.Unlock()
	}
}

// longestWaiting is the connection other than skip that has waited longest without a request
// being served, or nil. A walk of at most the replica's limit (its ceiling), only when it is
// reached.
func (p *plainConns) longestWaiting(skip net.Conn) net.Conn {
	var oldest net.Conn
	var at time.Time
	for c, pc := range p.conns {
		if c != skip && pc.waiting && (oldest == nil || pc.since.Before(at)) {
			oldest, at = c, pc.since
		}
	}
	return oldest
}

// addrSource is a connection's per-source key, as clientSource keys a request's.
func addrSource(a net.Addr) string {
	if ap, err := netip.ParseAddrPort(a.String()); err == nil {
		return sourceKey(ap.Addr())
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
