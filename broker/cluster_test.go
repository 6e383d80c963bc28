package broker

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// testCluster is several replicas in one process: separate pools, listeners and HTTP
// servers on one database, as in production behind a load balancer.
type testCluster struct {
	t     testing.TB
	url   string
	pool  *pgxpool.Pool // the test's own connection, for fixtures and assertions
	nodes []*Server
}

func newCluster(t testing.TB, n int, tweak func(*Config)) *testCluster {
	t.Helper()
	url := dbtest.URL(t)
	c := &testCluster{t: t, url: url, pool: dbtest.PoolFor(t, url)}
	for i := range n {
		c.nodes = append(c.nodes, c.startNode(fmt.Sprintf("n%d", i), tweak))
	}
	return c
}

func (c *testCluster) startNode(id string, tweak func(*Config)) *Server {
	t := c.t
	// No rate limits unless a test sets one: bursts are what many tests send.
	cfg := Config{NodeID: id, Region: "test", SessionGrace: 5 * time.Second, SendRatePerMember: 1 << 30, SendBurstPerMember: 1 << 30,
		WriteRatePerMember: 1 << 30, WriteBurstPerMember: 1 << 30, ReadRatePerMember: 1 << 30, ReadBurstPerMember: 1 << 30}
	if tweak != nil {
		tweak(&cfg)
	}
	srv := startServer(t, cfg, dbtest.PoolFor(t, c.url), dbtest.Logger(t).With("test_node", id))
	dbtest.WaitFor(t, 10*time.Second, "listener of "+id+" connected", srv.BusConnected)
	return srv
}

// startServer starts a replica on a free local port, stopped when the test ends.
func startServer(t testing.TB, cfg Config, pool *pgxpool.Pool, log *slog.Logger) *Server {
	t.Helper()
	srv, err := NewServer(cfg, pool, log)
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = srv.Stop(ctx)
	})
	return srv
}

func (c *testCluster) wsURL(node int) string { return "ws://" + c.nodes[node].Addr() + "/ws" }

// testMesh is a mesh with members created straight in the tables (membership has its own
// tests; these are about the protocol).
type testMesh struct {
	c  *testCluster
	id string
}

type testMember struct {
	id   string
	name string
	key  ed25519.PrivateKey
	pub  string
}

func (c *testCluster) mesh(maxPeers int) *testMesh {
	c.t.Helper()
	var id string
	owner, _, _ := ed25519.GenerateKey(rand.Reader)
	slug := "m" + hex.EncodeToString(owner[:4])
	require.NoError(c.t, c.pool.QueryRow(context.Background(),
		`INSERT INTO claudemesh.mesh (slug, name, owner_pubkey, max_peers) VALUES ($1, $1, $2, $3) RETURNING id`,
		slug, hex.EncodeToString(owner), maxPeers).Scan(&id))
	return &testMesh{c: c, id: id}
}

func (m *testMesh) member(name string) *testMember {
	m.c.t.Helper()
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	tm := &testMember{name: name, key: priv, pub: hex.EncodeToString(pub)}
	require.NoError(m.c.t, m.c.pool.QueryRow(context.Background(),
		`INSERT INTO claudemesh.member (mesh_id, pubkey, display_name) VALUES ($1, $2, $3) RETURNING id`,
		m.id, tm.pub, name).Scan(&tm.id))
	return tm
}

// dial connects member to node; opts tweaks the client options.
func (m *testMesh) dial(node int, mem *testMember, opts ...func(*client.Options)) *client.Client {
	m.c.t.Helper()
	cl, err := m.tryDial(node, mem, opts...)
	require.NoError(m.c.t, err)
	return cl
}

func (m *testMesh) tryDial(node int, mem *testMember, opts ...func(*client.Options)) (*client.Client, error) {
	o := client.Options{
		URL: m.c.wsURL(node), MeshID: m.id, MemberID: mem.id, MemberKey: mem.key, DisplayName: mem.name,
		SessionID: "s-" + mem.name, PID: 1000, CWD: "/work/" + mem.name,
		Capabilities: []string{protocol.CapClientAck, protocol.CapSystemEvents},
		Logger:       dbtest.Logger(m.c.t),
	}
	for _, f := range opts {
		f(&o)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := client.Dial(ctx, o)
	if err == nil {
		m.c.t.Cleanup(func() { _ = cl.Close() })
	}
	return cl, err
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// nextPush waits for the next non-system push.
func nextPush(t *testing.T, cl *client.Client, within time.Duration) protocol.Push {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case p := <-cl.Pushes():
			if p.IsSystem() {
				continue
			}
			return p
		case <-deadline:
			t.Fatalf("no push within %s", within)
		case <-cl.Done():
			t.Fatalf("client closed while waiting for a push: %v", cl.Err())
		}
	}
}

// probe shows that nothing is on its way to the recipients: a now message sent after
// everything else must be the next push each of them gets, since pushes to one recipient
// follow commit order. It replaces waiting a fixed time for "nothing arrives".
func probe(t *testing.T, from *client.Client, target string, to ...*client.Client) {
	t.Helper()
	ack, err := from.Send(ctxT(t), target, protocol.PriorityNow, "n", "probe", "")
	require.NoError(t, err)
	for _, cl := range to {
		require.Equal(t, ack.MessageID, nextPush(t, cl, 5*time.Second).MessageID, "the probe arrives next: nothing else was on its way")
	}
}

// nextEvent waits for the next system push with the given event name.
func nextEvent(t *testing.T, cl *client.Client, event string, within time.Duration) protocol.Push {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case p := <-cl.Pushes():
			if p.IsSystem() && p.Event == event {
				return p
			}
		case <-deadline:
			t.Fatalf("no %s event within %s", event, within)
		}
	}
}

func generateKey() (ed25519.PublicKey, ed25519.PrivateKey, error) {
	return ed25519.GenerateKey(rand.Reader)
}
