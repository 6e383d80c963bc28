package pgproxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/claudemesh/broker/db"
)

// Defaults for the zero values of Config.
const (
	// DefaultListen is a free port on the loopback interface.
	DefaultListen = "127.0.0.1:0"
	// DefaultDialTimeout bounds each connection to the server.
	DefaultDialTimeout = 5 * time.Second
	// DefaultPort is used when a database URL names a host without a port.
	DefaultPort = "5432"
)

// queueLimit bounds the bytes waiting out their delay in one direction of one connection. A
// reader that fills it waits, as a full TCP window would make the sender wait.
const queueLimit = 16 << 20

// Config configures a Proxy. Zero values mean the documented defaults.
type Config struct {
	// Target is the server's host:port. Required; TargetFromURL derives it from a database URL.
	Target string
	// Listen is the address the proxy accepts clients on. Default DefaultListen.
	Listen string
	// Delay is added to each direction of every connection, so a round trip grows by 2×Delay.
	// Default 0: bytes pass straight through. SetDelay changes it at run time.
	Delay time.Duration
	// DialTimeout bounds each connection to Target. Default DefaultDialTimeout.
	DialTimeout time.Duration
	// Logger receives failed dials to Target. Default: discard.
	Logger *slog.Logger
}

func (c Config) withDefaults() Config {
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

func (c Config) validate() error {
	var errs []error
	if c.Target == "" {
		errs = append(errs, errors.New("target is empty: set Config.Target to the server's host:port (TargetFromURL reads it from DATABASE_URL)"))
	} else if _, _, err := net.SplitHostPort(c.Target); err != nil {
		errs = append(errs, fmt.Errorf("target %q is not host:port (%v): set Config.Target to the server's host:port", c.Target, err))
	}
	if c.Delay < 0 {
		errs = append(errs, fmt.Errorf("delay %s is negative: use 0 for none", c.Delay))
	}
	if c.DialTimeout < 0 {
		errs = append(errs, fmt.Errorf("dial timeout %s is negative: use 0 for the default %s", c.DialTimeout, DefaultDialTimeout))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("pgproxy config: %w", err)
	}
	return nil
}

// TargetFromURL returns the host:port of a postgres:// database URL, with DefaultPort when
// the URL names none.
func TargetFromURL(dbURL string) (string, error) {
	u, err := url.Parse(dbURL)
	if err != nil {
		// Not %w: url.Error quotes the whole URL, password included.
		return "", fmt.Errorf("parse database url %s: not a valid URL", db.Redact(dbURL))
	}
	if u.Hostname() == "" {
		return "", errors.New("parse database url: no host (a proxy needs a TCP address, not a Unix socket)")
	}
	port := u.Port()
	if port == "" {
		port = DefaultPort
	}
	return net.JoinHostPort(u.Hostname(), port), nil
}

// Proxy forwards TCP connections to a Postgres server, delaying and counting as described in
// the package documentation. It is safe for concurrent use.
type Proxy struct {
	cfg    Config
	delay  atomic.Int64 // time.Duration
	nextID atomic.Uint64
	total  counters // over connections not excluded

	mu      sync.Mutex
	ln      net.Listener
	ctx     context.Context // lives from Start to Stop; dials use it
	cancel  context.CancelFunc
	done    chan struct{} // closed when every goroutine has returned
	stopped bool
	cut     bool
	cutGen  uint64 // incremented by every Cut, so a connection dialled across a Cut is dropped
	conns   map[*conn]struct{}
	wg      sync.WaitGroup
}

// New checks cfg and returns a proxy that is not yet listening.
func New(cfg Config) (*Proxy, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	p := &Proxy{cfg: cfg.withDefaults(), conns: map[*conn]struct{}{}}
	p.delay.Store(int64(cfg.Delay))
	return p, nil
}

// Start listens and begins accepting clients. ctx bounds only the listen call; the proxy runs
// until Stop or Close.
func (p *Proxy) Start(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return errors.New("pgproxy start: stopped (a Proxy runs once: create a new one)")
	}
	if p.ln != nil {
		return errors.New("pgproxy start: already started")
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", p.cfg.Listen)
	if err != nil {
		return fmt.Errorf("pgproxy listen: %w", err)
	}
	p.ln = ln
	p.ctx, p.cancel = context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	p.done = done
	p.wg.Add(1)
	go p.accept(ln)
	go func() { p.wg.Wait(); close(done) }()
	return nil
}

// Stop closes the listener and every connection, then waits for all the proxy's goroutines
// or for ctx. Safe to call twice, and before Start.
func (p *Proxy) Stop(ctx context.Context) error {
	p.mu.Lock()
	if !p.stopped {
		p.stopped = true
		if p.ln != nil {
			_ = p.ln.Close()
			p.cancel()
		}
		for c := range p.conns {
			c.kill()
		}
	}
	done := p.done
	p.mu.Unlock()
	if done == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("pgproxy stop: %w", ctx.Err())
	}
}

// Close is Stop without a deadline: it returns once every goroutine has.
func (p *Proxy) Close() error { return p.Stop(context.Background()) }

// Addr is the address clients connect to; nil before Start.
func (p *Proxy) Addr() net.Addr {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln == nil {
		return nil
	}
	return p.ln.Addr()
}

// URL returns dbURL with its host and port replaced by the proxy's address.
func (p *Proxy) URL(dbURL string) (string, error) {
	addr := p.Addr()
	if addr == nil {
		return "", errors.New("pgproxy url: proxy not started")
	}
	u, err := url.Parse(dbURL)
	if err != nil {
		// Not %w: url.Error quotes the whole URL, password included.
		return "", fmt.Errorf("pgproxy url %s: not a valid URL", db.Redact(dbURL))
	}
	u.Host = addr.String()
	return u.String(), nil
}

// Delay is the delay now added to each direction.
func (p *Proxy) Delay() time.Duration { return time.Duration(p.delay.Load()) }

// SetDelay changes the delay for bytes read from now on. Bytes already waiting keep theirs,
// and order is kept: bytes never overtake bytes read before them.
func (p *Proxy) SetDelay(d time.Duration) { p.delay.Store(int64(max(d, 0))) }

// Cut drops every open connection and refuses new ones until Restore, as if the network to
// the server went away.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = true
	p.cutGen++
	for c := range p.conns {
		c.kill()
	}
}

// Restore accepts connections again after Cut.
func (p *Proxy) Restore() {
	p.mu.Lock()
	p.cut = false
	p.mu.Unlock()
}

// Flights returns the flights counted so far over every connection not excluded. Subtract
// two snapshots to count an operation.
func (p *Proxy) Flights() Flights { return p.total.load() }

// Reset sets the proxy's and every open connection's counters to zero.
func (p *Proxy) Reset() {
	p.total.reset()
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.flights.reset()
	}
}

// ConnStats describes one open connection.
type ConnStats struct {
	ID uint64
	// Client is the client's address as the proxy sees it: the LocalAddr of the client's socket
	// (for pgx: conn.PgConn().Conn().LocalAddr()).
	Client   net.Addr
	Flights  Flights
	Excluded bool
}

// Conns lists the open connections, oldest first.
func (p *Proxy) Conns() []ConnStats {
	p.mu.Lock()
	out := make([]ConnStats, 0, len(p.conns))
	for c := range p.conns {
		out = append(out, c.stats())
	}
	p.mu.Unlock()
	slices.SortFunc(out, func(a, b ConnStats) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// ConnFlights returns the flights of the open connection whose client address is client,
// counted whether or not it is excluded; false if no open connection has that address.
func (p *Proxy) ConnFlights(client net.Addr) (Flights, bool) {
	c := p.find(client)
	if c == nil {
		return Flights{}, false
	}
	return c.flights.load(), true
}

// Exclude stops counting the open connection whose client address is client in Flights,
// from now on (it keeps its own count); false if no open connection has that address.
func (p *Proxy) Exclude(client net.Addr) bool {
	c := p.find(client)
	if c == nil {
		return false
	}
	c.excluded.Store(true)
	return true
}

func (p *Proxy) find(client net.Addr) *conn {
	if client == nil {
		return nil
	}
	want := client.String()
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		if c.client.RemoteAddr().String() == want {
			return c
		}
	}
	return nil
}

func (p *Proxy) accept(ln net.Listener) {
	defer p.wg.Done()
	backoff := 5 * time.Millisecond
	for {
		client, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait a little rather than spin.
			p.cfg.Logger.Warn("pgproxy accept", "error", err)
			select {
			case <-p.ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		p.mu.Lock()
		if p.cut || p.stopped {
			p.mu.Unlock()
			_ = client.Close()
			continue
		}
		gen := p.cutGen
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(client, gen)
	}
}

// serve dials the server for one client and runs the connection until both sides are done.
func (p *Proxy) serve(client net.Conn, gen uint64) {
	defer p.wg.Done()
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.DialTimeout)
	var d net.Dialer
	server, err := d.DialContext(ctx, "tcp", p.cfg.Target)
	cancel()
	if err != nil {
		_ = client.Close()
		if p.ctx.Err() == nil {
			p.cfg.Logger.Warn("pgproxy dial", "target", p.cfg.Target, "error", err)
		}
		return
	}
	c := newConn(p, p.nextID.Add(1), client, server)
	p.mu.Lock()
	if p.cut || p.stopped || p.cutGen != gen {
		p.mu.Unlock()
		c.kill()
		return
	}
	p.conns[c] = struct{}{}
	p.mu.Unlock()
	c.run()
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
}
