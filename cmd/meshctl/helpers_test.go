package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker"
	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

func TestMain(m *testing.M) {
	// A child started by startReplicaProcess is a broker replica, not a test run.
	if url := os.Getenv(replicaDBEnv); url != "" {
		os.Exit(replicaMain(url))
	}
	dbtest.Main(m)
}

// testEnv is a cluster of in-process broker replicas on one fresh database, with /join
// mounted, and a mesh owned by a key file: the setup `broker dev` + `broker mesh create`
// give a real user.
type testEnv struct {
	t     *testing.T
	dbURL string
	pool  *pgxpool.Pool
	svc   *membership.Service
	nodes []*broker.Server
	key   *membership.OwnerKey
	mesh  membership.Mesh
}

func newEnv(t *testing.T, replicas int, tweak func(*broker.Config)) *testEnv {
	t.Helper()
	url := dbtest.URL(t)
	e := &testEnv{t: t, dbURL: url, pool: dbtest.PoolFor(t, url)}
	e.svc = membership.New(e.pool, membership.Config{Logger: dbtest.Logger(t)})
	for i := range replicas {
		id := fmt.Sprintf("n%d", i)
		cfg := broker.Config{NodeID: id, Region: "test", SessionGrace: 5 * time.Second}
		if tweak != nil {
			tweak(&cfg)
		}
		srv, err := broker.NewServer(cfg, dbtest.PoolFor(t, url), dbtest.Logger(t).With("test_node", id))
		require.NoError(t, err)
		mountJoin(srv, e.svc)
		require.NoError(t, srv.Start(context.Background(), "127.0.0.1:0"))
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_ = srv.Stop(ctx)
		})
		dbtest.WaitFor(t, 10*time.Second, "listener of "+id+" connected", srv.BusConnected)
		e.nodes = append(e.nodes, srv)
	}
	key, _, err := membership.LoadOrCreateOwnerKey(filepath.Join(t.TempDir(), "owner.json"))
	require.NoError(t, err)
	e.key = key
	e.mesh, _, err = e.svc.CreateMesh(context.Background(), membership.CreateMeshParams{Slug: "demo", OwnerPubkey: key.Pubkey()})
	require.NoError(t, err)
	return e
}

// mountJoin serves POST /join unless the broker already does.
func mountJoin(srv *broker.Server, svc *membership.Service) {
	if mux, ok := srv.Handler().(*http.ServeMux); ok {
		req, _ := http.NewRequest(http.MethodPost, protocol.PathJoin, nil)
		if _, pattern := mux.Handler(req); pattern != "" {
			return
		}
	}
	srv.Handle("POST "+protocol.PathJoin, http.HandlerFunc(svc.HandleJoin))
}

func (e *testEnv) wsURL(node int) string   { return "ws://" + e.nodes[node].Addr() + protocol.PathWS }
func (e *testEnv) httpURL(node int) string { return "http://" + e.nodes[node].Addr() }

// invite creates an invite link whose broker URL is replica 0.
func (e *testEnv) invite(uses int) string {
	e.t.Helper()
	inv, err := e.svc.CreateInvite(context.Background(), membership.CreateInviteParams{
		Mesh: e.mesh.ID, Key: e.key, MaxUses: uses, BrokerURL: e.wsURL(0),
	})
	require.NoError(e.t, err)
	return inv.Link
}

// syncBuffer is a bytes.Buffer safe for a command writing while the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// cli runs meshctl in-process against one config directory.
type cli struct {
	t    *testing.T
	home string
	env  map[string]string
}

func newCLI(t *testing.T) *cli {
	return &cli{t: t, home: t.TempDir(), env: map[string]string{}}
}

func (c *cli) getenv(k string) string { return c.env[k] }

// run executes one command and returns stdout and stderr.
func (c *cli) run(stdin string, args ...string) (string, string, error) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return c.runCtx(ctx, strings.NewReader(stdin), args...)
}

func (c *cli) runCtx(ctx context.Context, stdin io.Reader, args ...string) (string, string, error) {
	var out, errOut syncBuffer
	err := c.exec(ctx, stdin, &out, &errOut, args...)
	return out.String(), errOut.String(), err
}

func (c *cli) exec(ctx context.Context, stdin io.Reader, out, errOut *syncBuffer, args ...string) error {
	root := newRootCmd(c.getenv)
	root.SetArgs(append([]string{"--home", c.home}, args...))
	root.SetIn(stdin)
	root.SetOut(out)
	root.SetErr(errOut)
	return root.ExecuteContext(ctx)
}

// must runs a command that must succeed and returns its stdout.
func (c *cli) must(args ...string) string {
	c.t.Helper()
	out, errOut, err := c.run("", args...)
	require.NoError(c.t, err, "meshctl %s\nstdout: %s\nstderr: %s", strings.Join(args, " "), out, errOut)
	return out
}

// background runs a long-lived command (listen) until it ends or the test does.
type background struct {
	out, err syncBuffer
	cancel   context.CancelFunc
	done     chan struct{}
	result   error // set before done is closed
}

// start runs a command in the background; when the test ends it is cancelled and must have
// ended without an error, unless the test collected its result with wait.
func (c *cli) start(args ...string) *background {
	c.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	b := &background{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(b.done)
		b.result = c.exec(ctx, strings.NewReader(""), &b.out, &b.err, args...)
	}()
	c.t.Cleanup(func() {
		cancel()
		select {
		case <-b.done:
			if b.result != nil && !errors.Is(b.result, errCollected) {
				c.t.Errorf("meshctl %s: %v\nstderr: %s", strings.Join(args, " "), b.result, b.err.String())
			}
		case <-time.After(15 * time.Second):
			c.t.Errorf("meshctl %s did not stop", strings.Join(args, " "))
		}
	})
	return b
}

var errCollected = errors.New("result collected by the test")

// wait returns the command's result once it ends by itself.
func (b *background) wait(t *testing.T, within time.Duration) error {
	t.Helper()
	select {
	case <-b.done:
		err := b.result
		b.result = errCollected
		return err
	case <-time.After(within):
		t.Fatalf("command still running after %s; stderr: %s", within, b.err.String())
		return nil
	}
}

// waitOutput waits until stdout contains s.
func (b *background) waitOutput(t *testing.T, s string) {
	t.Helper()
	dbtest.WaitFor(t, 10*time.Second, "output "+s, func() bool { return strings.Contains(b.out.String(), s) })
}

// waitErrOutput waits until stderr contains s n times.
func (b *background) waitErrOutput(t *testing.T, s string, n int) {
	t.Helper()
	dbtest.WaitFor(t, 10*time.Second, "stderr "+s, func() bool { return strings.Count(b.err.String(), s) >= n })
}
