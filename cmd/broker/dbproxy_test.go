package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"net"
	"net/url"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/db/pgproxy"
	"github.com/claudemesh/broker/protocol"
)

// The delays in these tests are checked only from below: the proxy holds every byte at least
// its delay, so a round trip through it cannot be faster than twice that however slow the
// machine is; a direct connection would be. That shows the traffic went through the proxy.
const testDelay = 100 * time.Millisecond

// lockedBuffer is a bytes.Buffer a running command writes while the test reads.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startCLI runs a long-lived broker command in-process until the returned stop is called,
// which cancels it (as SIGINT does) and returns its error.
func startCLI(t *testing.T, args ...string) (*lockedBuffer, func() error) {
	t.Helper()
	root := newRootCmd()
	out := &lockedBuffer{}
	root.SetOut(out)
	root.SetErr(out)
	root.SetArgs(args)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	var once sync.Once
	var err error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-done:
			case <-time.After(time.Minute):
				err = fmt.Errorf("broker %v did not stop", args)
			}
		})
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return out, stop
}

// bannerField waits for the banner line "  <name>  <value>" and returns the value.
func bannerField(t *testing.T, out *lockedBuffer, name string) string {
	t.Helper()
	re := regexp.MustCompile(`(?m)^  ` + regexp.QuoteMeta(name) + ` +(\S+)`)
	var v string
	dbtest.WaitFor(t, time.Minute, "banner line "+name, func() bool {
		m := re.FindStringSubmatch(out.String())
		if m != nil {
			v = m[1]
		}
		return m != nil
	})
	return v
}

// viaProxy is dbURL with its host replaced by the proxy's address (the banner's URL hides a
// password, which TEST_DATABASE_URL may carry).
func viaProxy(t *testing.T, dbURL, addr string) string {
	t.Helper()
	u, err := url.Parse(dbURL)
	require.NoError(t, err)
	u.Host = addr
	return u.String()
}

// roundTrip times one query on a connection to dbURL.
func roundTrip(t *testing.T, dbURL string) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dbURL)
	require.NoError(t, err)
	defer conn.Close(ctx)
	var one int
	t0 := time.Now()
	require.NoError(t, conn.QueryRow(ctx, "SELECT 1", pgx.QueryExecModeSimpleProtocol).Scan(&one))
	took := time.Since(t0)
	require.Equal(t, 1, one)
	return took
}

func TestDBProxyVerb(t *testing.T) {
	dbURL := dbtest.URL(t)
	target, err := pgproxy.TargetFromURL(dbURL)
	require.NoError(t, err)

	// --target: the proxy forwards to it with the delay each way, until cancelled.
	out, stop := startCLI(t, "dbproxy", "--target", target, "--delay", testDelay.String())
	addr := bannerField(t, out, "listen")
	require.Equal(t, target, bannerField(t, out, "target"))
	require.Contains(t, out.String(), "100ms each way (+200ms per round trip)")
	require.GreaterOrEqual(t, roundTrip(t, viaProxy(t, dbURL, addr)), 2*testDelay)
	require.NoError(t, stop(), "stops cleanly when its context ends (SIGINT/SIGTERM)")
	_, err = net.DialTimeout("tcp", addr, time.Second)
	require.Error(t, err, "the listener is closed")

	// No --target: DATABASE_URL's server, and the banner prints both URLs.
	t.Setenv("DATABASE_URL", dbURL)
	out, stop = startCLI(t, "dbproxy", "--listen", "127.0.0.1:0")
	addr = bannerField(t, out, "listen")
	require.Equal(t, db.Redact(dbURL), bannerField(t, out, "postgres"))
	require.Equal(t, db.Redact(viaProxy(t, dbURL, addr)), bannerField(t, out, "proxied"))
	require.Contains(t, out.String(), "0s each way")
	roundTrip(t, viaProxy(t, dbURL, addr))
	require.NoError(t, stop())

	_, err = runCLI(t, "dbproxy", "--target", target, "--delay", "-1ms")
	require.ErrorContains(t, err, "--delay must be 0 or more")
	_, err = runCLI(t, "dbproxy", "--target", "no-port")
	require.ErrorContains(t, err, "not host:port")
}

// dev --db-delay: the replicas reach Postgres through the proxy (a hello, which needs the
// database, takes at least a round trip of it), the banner says so, and Ctrl-C stops it all.
func TestDevDBDelay(t *testing.T) {
	dbURL := dbtest.URL(t)
	t.Setenv("DATABASE_URL", dbURL)
	t.Setenv("BROKER_PORT", strconv.Itoa(freePorts(t, 3)))
	t.Setenv("LOG_LEVEL", "warn")

	_, err := runCLI(t, "dev", "--db-delay", "-5ms")
	require.ErrorContains(t, err, "--db-delay must be 0 or more")

	out, stop := startCLI(t, "dev", "--replicas", "2", "--db-delay", testDelay.String())
	require.Contains(t, bannerField(t, out, "db delay"), "100ms")
	replica := bannerField(t, out, "replica 1")

	ctx := context.Background()
	svc := membership.New(dbtest.PoolFor(t, dbURL), membership.Config{Logger: dbtest.Logger(t)})
	ownerPub, _, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	mesh, _, err := svc.CreateMesh(ctx, membership.CreateMeshParams{Slug: "far", OwnerPubkey: protocol.PubkeyHex(ownerPub)})
	require.NoError(t, err)
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	member, err := svc.AddMember(ctx, membership.AddMemberParams{Mesh: mesh.ID, Pubkey: protocol.PubkeyHex(pub), DisplayName: "far"})
	require.NoError(t, err)

	var cl *client.Client
	var took time.Duration
	// The replica answers hellos once its listener is connected, which takes round trips too.
	dbtest.WaitFor(t, time.Minute, "a hello on replica 1", func() bool {
		t0 := time.Now()
		cl, err = client.Dial(ctx, client.Options{URL: replica, MeshID: mesh.ID, MemberID: member.ID, MemberKey: key, DisplayName: "far"})
		took = time.Since(t0)
		return err == nil
	})
	require.GreaterOrEqual(t, took, 2*testDelay)
	require.NoError(t, cl.Close())
	require.NoError(t, stop())
}

// freePorts returns a port p such that p .. p+n-1 are free (dev listens on BROKER_PORT and
// the ports after it).
func freePorts(t *testing.T, n int) int {
	t.Helper()
	for range 50 {
		base := freePort(t)
		var lns []net.Listener
		for i := range n {
			ln, err := net.Listen("tcp", ":"+strconv.Itoa(base+i))
			if err != nil {
				break
			}
			lns = append(lns, ln)
		}
		for _, ln := range lns {
			_ = ln.Close()
		}
		if len(lns) == n {
			return base
		}
	}
	t.Fatalf("no %d consecutive free ports", n)
	return 0
}

// Ctrl-C on `broker dev`: a client connected through the load balancer is told to reconnect
// (1012) like one on a replica's own port, not cut off by the load balancer closing first.
func TestDevLoadBalancerCarriesTheDrain(t *testing.T) {
	dbURL := dbtest.URL(t)
	t.Setenv("DATABASE_URL", dbURL)
	t.Setenv("BROKER_PORT", strconv.Itoa(freePorts(t, 3)))
	t.Setenv("LOG_LEVEL", "warn")
	out, stop := startCLI(t, "dev", "--replicas", "2")
	lb := bannerField(t, out, "load balancer")

	ctx := context.Background()
	svc := membership.New(dbtest.PoolFor(t, dbURL), membership.Config{Logger: dbtest.Logger(t)})
	ownerPub, _, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	mesh, _, err := svc.CreateMesh(ctx, membership.CreateMeshParams{Slug: "lb", OwnerPubkey: protocol.PubkeyHex(ownerPub)})
	require.NoError(t, err)
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	member, err := svc.AddMember(ctx, membership.AddMemberParams{Mesh: mesh.ID, Pubkey: protocol.PubkeyHex(pub), DisplayName: "lb"})
	require.NoError(t, err)
	var cl *client.Client
	dbtest.WaitFor(t, time.Minute, "a hello through the load balancer", func() bool {
		cl, err = client.Dial(ctx, client.Options{URL: lb, MeshID: mesh.ID, MemberID: member.ID, MemberKey: key, DisplayName: "lb"})
		return err == nil
	})
	defer cl.Close()

	require.NoError(t, stop())
	select {
	case <-cl.Done():
		require.Equal(t, protocol.CloseDraining, cl.CloseCode(), "closed by the drain, through the load balancer")
	case <-time.After(10 * time.Second):
		t.Fatal("the session was not closed")
	}
}
