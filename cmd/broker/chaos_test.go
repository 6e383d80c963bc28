package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/db/embedded"
	"github.com/claudemesh/broker/protocol"
)

var chaosSteady = flag.Duration("chaos.steady", 3*time.Second, "steady load between faults (raise it for a longer chaos run)")

// TestChaos drives the real binary: three replica processes, peers with client_ack spread
// over all of them under a steady mixed send load, while the test does a rolling restart,
// kill -9s a replica, restarts Postgres and cuts one replica off Postgres through a proxy.
// Every message carries a unique token in its (opaque) ciphertext, so the test can tell
// acked, refused and uncertain sends apart when it checks what was received, and in what order
// each recipient first saw each sender's messages.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test drives real processes; skipped in -short")
	}
	needEmbeddedPostgres(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	h := newChaosHarness(t, ctx)
	defer h.shutdown()

	h.startLoad(ctx)
	h.steady("warm-up")

	// Rolling restart: SIGTERM one replica at a time, restart it, wait until healthy.
	phaseStart := time.Now()
	for _, r := range h.replicas {
		t0 := time.Now()
		r.term(t)
		drained := time.Since(t0)
		r.start(t)
		h.waitHealthy(r)
		h.report("rolling restart %s: drained and exited in %s, healthy again after %s", r.id, drained.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	}
	h.convergence("rolling restart", phaseStart)
	left := h.leftSince(phaseStart)
	require.Zero(t, left, "peers that reconnected within grace must never appear as left during a rolling restart")
	h.steady("after rolling restart")

	// kill -9 a replica with live sessions.
	victim := h.replicas[0]
	t0 := time.Now()
	victim.kill9(t)
	// Converged once no presence is left on the killed replica: right after the kill, the
	// peers may not have noticed yet, and everything still looks connected.
	h.waitFor(60*time.Second, "peers off the killed replica", func() bool { return h.liveOn(victim.id) == 0 })
	h.convergence("kill -9 "+victim.id, t0)
	require.Zero(t, h.liveOn(victim.id), "no presence left on the killed replica")
	victim.start(t)
	h.waitHealthy(victim)
	h.steady("after kill -9")

	// Restart Postgres under everyone.
	t0 = time.Now()
	h.restartPostgres()
	for _, r := range h.replicas {
		h.waitHealthy(r)
	}
	h.convergence("Postgres restart", t0)
	h.steady("after Postgres restart")

	// Cut one replica off Postgres, long enough to be declared dead, then restore it.
	cut := h.replicas[2]
	t0 = time.Now()
	h.proxy.Cut()
	h.waitFor(30*time.Second, "peers moved off the cut replica", func() bool { return h.liveOn(cut.id) == 0 && h.allConnected() })
	h.report("cut %s off Postgres: its peers resumed elsewhere after %s", cut.id, time.Since(t0).Round(time.Millisecond))
	h.waitFor(30*time.Second, cut.id+" declared dead", func() bool { return h.nodeDead(cut.id) })
	h.proxy.Restore()
	h.waitHealthy(cut)
	h.convergence("cut and restore "+cut.id, t0)
	h.steady("after restore")

	h.stopLoad()
	h.verify()
}

type chaosHarness struct {
	t        *testing.T
	ctx      context.Context
	dir      string
	bin      string
	pgCfg    embedded.Config
	pg       *embedded.Cluster
	dbURL    string
	pool     *pgxpool.Pool
	proxy    *dbtest.Proxy
	replicas []*replicaProc
	meshID   string
	peers    []*chaosPeer

	loadCancel context.CancelFunc
	loadWG     sync.WaitGroup

	mu       sync.Mutex
	acked    map[string]string // token → recipient pubkey
	refused  map[string]string // token → the refusal's error
	unknown  map[string]bool
	received map[string]map[string]int // recipient pubkey → token → times
	// firsts keeps, per recipient pubkey, the tokens in the order they first arrived: the
	// per-recipient order invariant is checked on it.
	firsts map[string][]string
	sent   atomic.Int64
}

func newChaosHarness(t *testing.T, ctx context.Context) *chaosHarness {
	h := &chaosHarness{t: t, ctx: ctx, dir: t.TempDir(), acked: map[string]string{}, refused: map[string]string{},
		unknown: map[string]bool{}, received: map[string]map[string]int{}, firsts: map[string][]string{}}
	h.bin = buildBroker(t, h.dir)

	// Our own Postgres on a fixed port, so it can be restarted under the replicas.
	h.pgCfg = embedded.Config{DataDir: filepath.Join(h.dir, "pg"), Port: freePort(t), Database: "chaos", Logger: dbtest.Logger(t)}
	var err error
	h.pg, err = embedded.Start(ctx, h.pgCfg)
	require.NoError(t, err)
	h.dbURL = h.pg.URL()
	require.NoError(t, db.Migrate(ctx, h.dbURL, nil))
	h.pool, err = db.NewPool(ctx, h.dbURL, db.PoolConfig{MaxConns: 4})
	require.NoError(t, err)
	h.proxy = dbtest.NewProxy(t, h.dbURL)

	for i := range 3 {
		url := h.dbURL
		if i == 2 {
			url = h.proxy.URL(h.dbURL) // this one can be cut off
		}
		logDir := h.dir
		if d := os.Getenv("CHAOS_LOG_DIR"); d != "" { // keep the replicas' logs after the run
			logDir = d
		}
		r := &replicaProc{id: fmt.Sprintf("r%d", i+1), port: freePort(t), dbURL: url, bin: h.bin, dir: logDir}
		r.start(t)
		h.replicas = append(h.replicas, r)
	}
	for _, r := range h.replicas {
		h.waitHealthy(r)
	}

	owner, _, _ := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, h.pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey) VALUES ('chaos', 'chaos', $1) RETURNING id`,
		hex.EncodeToString(owner)).Scan(&h.meshID))
	for i := range 9 {
		pub, priv, _ := ed25519.GenerateKey(rand.Reader)
		p := &chaosPeer{h: h, key: priv, pub: hex.EncodeToString(pub), name: fmt.Sprintf("peer%d", i), home: i % 3}
		require.NoError(t, h.pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey, display_name) VALUES ($1, $2, $3) RETURNING id`,
			h.meshID, p.pub, p.name).Scan(&p.memberID))
		h.peers = append(h.peers, p)
	}
	return h
}

func (h *chaosHarness) report(format string, args ...any) {
	h.t.Logf("CHAOS "+format, args...)
	// CI prints the report from the artifacts folder (go test hides a passing test's logs).
	if dir := os.Getenv("ARTIFACTS_DIR"); dir != "" {
		if f, err := os.OpenFile(filepath.Join(dir, "chaos-report.txt"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err == nil {
			fmt.Fprintf(f, format+"\n", args...)
			f.Close()
		}
	}
}

func (h *chaosHarness) waitFor(d time.Duration, what string, cond func() bool) {
	h.t.Helper()
	dbtest.WaitFor(h.t, d, what, cond)
}

func (h *chaosHarness) waitHealthy(r *replicaProc) {
	h.t.Helper()
	h.waitFor(60*time.Second, r.id+" healthy", func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/health", r.port))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// steady lets the load run between faults.
func (h *chaosHarness) steady(name string) {
	before := h.sent.Load()
	timer := time.NewTimer(*chaosSteady)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-h.ctx.Done():
		h.t.Fatal("chaos test ran out of time")
	}
	h.report("%s: %d sends in %s", name, h.sent.Load()-before, *chaosSteady)
}

// convergence waits until every peer is connected and the live presences are exactly the
// peers' sessions, none in grace, then reports how long that took since t0.
func (h *chaosHarness) convergence(fault string, t0 time.Time) {
	h.t.Helper()
	h.waitFor(60*time.Second, "presence converged after "+fault, func() bool {
		if !h.allConnected() {
			return false
		}
		var live, grace int
		err := h.pool.QueryRow(h.ctx, `SELECT count(*) FILTER (WHERE grace_until IS NULL), count(*) FILTER (WHERE grace_until IS NOT NULL)
			FROM claudemesh.presence WHERE mesh_id = $1 AND ended_at IS NULL`, h.meshID).Scan(&live, &grace)
		return err == nil && live == len(h.peers) && grace == 0
	})
	h.report("%s: presence converged in %s", fault, time.Since(t0).Round(time.Millisecond))
}

func (h *chaosHarness) liveOn(node string) int {
	var n int
	if err := h.pool.QueryRow(h.ctx, `SELECT count(*) FROM claudemesh.presence WHERE node_id = $1 AND ended_at IS NULL`, node).Scan(&n); err != nil {
		return -1
	}
	return n
}

func (h *chaosHarness) nodeDead(node string) bool {
	var dead bool
	err := h.pool.QueryRow(h.ctx, `SELECT dead_at IS NOT NULL FROM claudemesh.node WHERE id = $1`, node).Scan(&dead)
	return err == nil && dead
}

// leftSince counts peer_disconnected audit entries since t: a peer that was listed as gone.
func (h *chaosHarness) leftSince(t time.Time) int {
	var n int
	require.NoError(h.t, h.pool.QueryRow(h.ctx, `SELECT count(*) FROM claudemesh.audit WHERE mesh_id = $1 AND event_type = $2 AND ts_micros >= $3`,
		h.meshID, audit.PeerDisconnected, t.UnixMicro()).Scan(&n))
	return n
}

func (h *chaosHarness) allConnected() bool {
	for _, p := range h.peers {
		if p.current() == nil {
			return false
		}
	}
	return true
}

func (h *chaosHarness) restartPostgres() {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(h.ctx, time.Minute)
	defer cancel()
	require.NoError(h.t, h.pg.Stop(ctx))
	var err error
	h.pg, err = embedded.Start(ctx, h.pgCfg)
	require.NoError(h.t, err)
	h.report("Postgres restarted")
}

func (h *chaosHarness) startLoad(ctx context.Context) {
	ctx, h.loadCancel = context.WithCancel(ctx)
	for _, p := range h.peers {
		h.loadWG.Add(2)
		go func() { defer h.loadWG.Done(); p.connectLoop(ctx) }()
		go func() { defer h.loadWG.Done(); p.sendLoop(ctx) }()
	}
	h.waitFor(30*time.Second, "all peers connected", h.allConnected)
}

// stopLoad stops sending, then waits until every acked message has arrived.
func (h *chaosHarness) stopLoad() {
	for _, p := range h.peers {
		p.stopSending.Store(true)
	}
	h.waitFor(60*time.Second, "every acked message received", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		for tok, to := range h.acked {
			if h.received[to][tok] == 0 {
				return false
			}
		}
		return true
	})
	h.loadCancel()
	h.loadWG.Wait()
}

func (h *chaosHarness) verify() {
	t := h.t
	h.mu.Lock()
	defer h.mu.Unlock()
	var received, dups int
	for _, toks := range h.received {
		for tok, n := range toks {
			received++
			dups += n - 1
			if why, refused := h.refused[tok]; refused {
				t.Fatalf("a refused send (never acked) must never be delivered: %s (refused: %s)", tok, why)
			}
			_, acked := h.acked[tok]
			require.True(t, acked || h.unknown[tok], "received a message that was never sent: %s", tok)
		}
	}
	h.report("sent %d, acked %d, refused %d, uncertain (connection lost before the ack) %d", h.sent.Load(), len(h.acked), len(h.refused), len(h.unknown))
	h.report("received %d distinct, duplicates suppressed %d; every acked message received: yes", received, dups)
	require.NotZero(t, len(h.acked))
	h.verifyOrder()

	n, err := audit.Verify(h.ctx, h.pool, h.meshID)
	require.NoError(t, err, "audit chain verifies")
	h.report("audit chain intact: %d entries", n)
}

func (h *chaosHarness) shutdown() {
	if h.loadCancel != nil {
		h.loadCancel()
		h.loadWG.Wait()
	}
	for _, r := range h.replicas {
		r.term(h.t)
	}
	if h.pool != nil {
		h.pool.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_ = h.pg.Stop(ctx)
}

// replicaProc is one `broker serve` process.
type replicaProc struct {
	id, dbURL, bin, dir string
	port                int
	cmd                 *exec.Cmd
	waitErr             chan error
}

func (r *replicaProc) start(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(filepath.Join(r.dir, r.id+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	require.NoError(t, err)
	cmd := exec.Command(r.bin, "serve", "--no-migrate")
	cmd.Env = append(os.Environ(),
		"DATABASE_URL="+r.dbURL, fmt.Sprintf("BROKER_PORT=%d", r.port), "BROKER_NODE_ID="+r.id,
		"SESSION_GRACE_SECONDS=5", "NODE_DEAD_AFTER_SECONDS=4", "DRAIN_TIMEOUT_SECONDS=10", "LOG_LEVEL=debug",
		// Each way a send can notify goes through every fault, side by side: at a commit that
		// does not wait for its flush, acked once the flush is confirmed (r1, the one killed
		// with -9), from a transaction after its commit (r2), from inside its commit (r3).
		fmt.Sprintf("PUSH_BEFORE_FLUSH=%v", r.id == "r1"),
		fmt.Sprintf("NOTIFY_AFTER_COMMIT=%v", r.id == "r2"),
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	r.cmd = cmd
	r.waitErr = make(chan error, 1)
	go func() { r.waitErr <- cmd.Wait(); logf.Close() }()
}

// term sends SIGTERM and waits for a clean exit within the drain deadline.
func (r *replicaProc) term(t *testing.T) {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-r.waitErr:
		require.NoError(t, err, "%s exits cleanly on SIGTERM", r.id)
	case <-time.After(15 * time.Second):
		_ = r.cmd.Process.Kill()
		t.Fatalf("%s did not exit within its drain deadline", r.id)
	}
	r.cmd = nil
}

func (r *replicaProc) kill9(t *testing.T) {
	require.NoError(t, r.cmd.Process.Signal(syscall.SIGKILL))
	<-r.waitErr
	r.cmd = nil
}

// chaosPeer is one member with one session that reconnects wherever it can.
type chaosPeer struct {
	h        *chaosHarness
	name     string
	memberID string
	pub      string
	key      ed25519.PrivateKey
	home     int

	mu          sync.Mutex
	cl          *client.Client
	seq         int
	stopSending atomic.Bool
}

func (p *chaosPeer) current() *client.Client {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cl
}

// connectLoop keeps the peer connected, trying the replicas in turn from its home one, with
// a short jittered backoff, as a real client behind a load balancer would.
func (p *chaosPeer) connectLoop(ctx context.Context) {
	next := p.home
	for ctx.Err() == nil {
		r := p.h.replicas[next%len(p.h.replicas)]
		next++
		dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		cl, err := client.Dial(dctx, client.Options{
			URL: fmt.Sprintf("ws://127.0.0.1:%d/ws", r.port), MeshID: p.h.meshID, MemberID: p.memberID,
			MemberKey: p.key, DisplayName: p.name, SessionID: "chaos-" + p.name, PID: 1, CWD: "/chaos",
			Capabilities: []string{protocol.CapClientAck},
		})
		cancel()
		if err != nil {
			sleepJitter(ctx, 100*time.Millisecond)
			continue
		}
		p.mu.Lock()
		p.cl = cl
		p.mu.Unlock()
		p.receive(ctx, cl)
		p.mu.Lock()
		p.cl = nil
		p.mu.Unlock()
		_ = cl.Close()
		sleepJitter(ctx, 50*time.Millisecond)
	}
}

func (p *chaosPeer) receive(ctx context.Context, cl *client.Client) {
	for {
		select {
		case <-ctx.Done():
			return
		case push, ok := <-cl.Pushes():
			if !ok {
				return
			}
			if push.IsSystem() {
				continue
			}
			raw, _ := base64.StdEncoding.DecodeString(push.Ciphertext)
			tok := string(raw)
			p.h.mu.Lock()
			if p.h.received[p.pub] == nil {
				p.h.received[p.pub] = map[string]int{}
			}
			if p.h.received[p.pub][tok] == 0 {
				p.h.firsts[p.pub] = append(p.h.firsts[p.pub], tok)
			}
			p.h.received[p.pub][tok]++
			p.h.mu.Unlock()
			actx, cancel := context.WithTimeout(ctx, 2*time.Second)
			_ = cl.AckMessages(actx, push.MessageID)
			cancel()
		}
	}
}

func (p *chaosPeer) sendLoop(ctx context.Context) {
	prios := []protocol.Priority{protocol.PriorityNow, protocol.PriorityNow, protocol.PriorityNext, protocol.PriorityLow}
	for ctx.Err() == nil {
		sleepJitter(ctx, 15*time.Millisecond)
		if p.stopSending.Load() {
			continue
		}
		cl := p.current()
		if cl == nil {
			continue
		}
		target := p.h.peers[randN(len(p.h.peers))]
		if target == p {
			continue
		}
		p.seq++
		tok := fmt.Sprintf("%s-%d", p.name, p.seq)
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := cl.Send(sctx, target.pub, prios[randN(len(prios))], "bm9uY2U=", base64.StdEncoding.EncodeToString([]byte(tok)), "")
		cancel()
		p.h.sent.Add(1)
		p.h.mu.Lock()
		var perr *protocol.Error
		switch {
		case err == nil:
			p.h.acked[tok] = target.pub
		case errors.As(err, &perr) && perr.Code != "":
			p.h.refused[tok] = perr.Error() // the broker said it did not store it
		default:
			p.h.unknown[tok] = true // connection lost: stored or not, no ack
		}
		p.h.mu.Unlock()
	}
}

// verifyOrder checks per-recipient order (design.md, invariant 3) as a client can see it: a
// peer sends its next message only once the last was acked or failed, so of two acked
// messages from one sender to one recipient the earlier committed first, and must have first
// arrived first, whatever failed in between. Uncertain sends (connection lost before the ack)
// are left out: one may have committed after the sender's next send. Re-sends after a fault
// are duplicates and do not count; only a first arrival can break the order.
func (h *chaosHarness) verifyOrder() {
	t := h.t
	var pairs, checked int
	for to, toks := range h.firsts {
		last := map[string]int{} // sender → seq of its last acked message seen by this recipient
		for _, tok := range toks {
			if h.acked[tok] != to {
				continue
			}
			i := strings.LastIndexByte(tok, '-')
			require.Positive(t, i, "token %q", tok)
			sender := tok[:i]
			seq, err := strconv.Atoi(tok[i+1:])
			require.NoError(t, err, "token %q", tok)
			if prev, ok := last[sender]; ok {
				require.Greater(t, seq, prev, "recipient %s received %s-%d before %s-%d, though the latter was acked first",
					to[:8], sender, prev, sender, seq)
			} else {
				pairs++
			}
			last[sender] = seq
			checked++
		}
	}
	h.report("per-recipient order kept: %d acked messages over %d sender→recipient pairs arrived in send order", checked, pairs)
}

func sleepJitter(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d/2 + time.Duration(randN(int(d)))/2):
	}
}

func randN(n int) int {
	v, _ := rand.Int(rand.Reader, big.NewInt(int64(n)))
	return int(v.Int64())
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
