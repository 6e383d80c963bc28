package dbtest

import (
	"context"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/db/pgproxy"
)

// Proxy is a pgproxy.Proxy in front of Postgres for one test. A test cuts and restores it to
// show what a replica does when it loses its database while the server stays up for everyone
// else, delays it to put the replica a region away, and counts its flights to see how many
// round trips an operation costs (see the pgproxy package documentation for what counts).
type Proxy struct {
	t testing.TB
	p *pgproxy.Proxy
}

// NewProxy listens on a free loopback port and forwards to the host:port of dbURL. It stops
// when the test ends.
func NewProxy(t testing.TB, dbURL string) *Proxy {
	t.Helper()
	return NewProxyWith(t, dbURL, pgproxy.Config{})
}

// NewProxyWith is NewProxy with a config, for example a Delay from the first connection on.
// The Target comes from dbURL and the Logger from the test unless cfg sets them.
func NewProxyWith(t testing.TB, dbURL string, cfg pgproxy.Config) *Proxy {
	t.Helper()
	if cfg.Target == "" {
		target, err := pgproxy.TargetFromURL(dbURL)
		if err != nil {
			t.Fatalf("proxy: %v", err)
		}
		cfg.Target = target
	}
	if cfg.Logger == nil {
		cfg.Logger = Logger(t) // failed dials show in a failing test's output
	}
	p, err := pgproxy.New(cfg)
	if err != nil {
		t.Fatalf("proxy: %v", err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatalf("proxy: %v", err)
	}
	pr := &Proxy{t: t, p: p}
	t.Cleanup(pr.Close)
	return pr
}

// URL returns dbURL rewritten to go through the proxy.
func (p *Proxy) URL(dbURL string) string {
	u, _ := url.Parse(dbURL)
	u.Host = p.p.Addr().String()
	return u.String()
}

// Cut drops every open connection and refuses new ones until Restore.
func (p *Proxy) Cut() { p.p.Cut() }

// Restore lets connections through again.
func (p *Proxy) Restore() { p.p.Restore() }

// Close stops the proxy and waits for its goroutines.
func (p *Proxy) Close() {
	if err := p.p.Close(); err != nil {
		p.t.Errorf("proxy: %v", err)
	}
}

// SetDelay adds d to each direction of every connection from now on: a round trip grows by
// 2d. Setting it after the fixtures are in place keeps their setup fast.
func (p *Proxy) SetDelay(d time.Duration) { p.p.SetDelay(d) }

// Flights is a snapshot of the flights counted so far over the connections not excluded.
func (p *Proxy) Flights() pgproxy.Flights { return p.p.Flights() }

// Count runs op and returns the flights counted while it ran. Put only the connection or pool
// that runs op behind this proxy, or Exclude the others, so nothing else adds to the count.
func (p *Proxy) Count(op func()) pgproxy.Flights {
	before := p.p.Flights()
	op()
	return p.p.Flights().Sub(before)
}

// Exclude leaves conn's flights out of Flights and Count from now on: a fixture or LISTEN
// connection that shares the proxy with the operation under test.
func (p *Proxy) Exclude(conn *pgx.Conn) {
	p.t.Helper()
	if !p.p.Exclude(conn.PgConn().Conn().LocalAddr()) {
		p.t.Fatalf("proxy: exclude: connection %s does not go through this proxy", conn.PgConn().Conn().LocalAddr())
	}
}

// ConnFlights returns the flights of one connection through the proxy, excluded or not.
func (p *Proxy) ConnFlights(conn *pgx.Conn) pgproxy.Flights {
	p.t.Helper()
	f, ok := p.p.ConnFlights(conn.PgConn().Conn().LocalAddr())
	if !ok {
		p.t.Fatalf("proxy: connection %s does not go through this proxy", conn.PgConn().Conn().LocalAddr())
	}
	return f
}

// Pgproxy is the underlying proxy, for what this wrapper does not cover (Conns, Reset).
func (p *Proxy) Pgproxy() *pgproxy.Proxy { return p.p }

// ConnFor opens one connection to dbURL, closed when the test ends. Counting flights on a
// single connection is exact: a pool can add a ping on acquire or open a connection midway.
func ConnFor(t testing.TB, dbURL string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatalf("dbtest: connect: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = conn.Close(ctx)
	})
	return conn
}
