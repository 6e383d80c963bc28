package broker

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// Hook signals that come before or during a session's hello, and the order of what a change
// to idle releases (migration 00053).

// peerStatus is the status cl's list_peers gives for the session sessionID.
func peerStatus(t *testing.T, cl *client.Client, sessionID string) protocol.Status {
	t.Helper()
	peers, err := cl.ListPeers(ctxT(t))
	require.NoError(t, err)
	for _, p := range peers {
		if p.SessionID == sessionID {
			return p.Status
		}
	}
	t.Fatalf("session %s not listed", sessionID)
	return ""
}

func TestHookBeforeHelloAppliesWhereTheHookWouldHaveFoundTheSession(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	// meshctl's setup: the hook sends Claude Code's session id, the peer says hello with its
	// own; both name Claude's pid and the cwd.
	code, res := postHook(t, c.nodes[0], bob, protocol.HookRequest{CWD: "/repo/bob", PID: 4242,
		Status: protocol.StatusWorking, SessionID: "claude-code-session"})
	require.Equal(t, http.StatusOK, code)
	require.True(t, res.Pending, "no session yet: kept for its hello")
	m.dial(0, bob, func(o *client.Options) { o.SessionID = "meshctl-peer"; o.CWD = "/repo/bob"; o.PID = 4242 })
	require.Equal(t, protocol.StatusWorking, peerStatus(t, a, "meshctl-peer"),
		"the first prompt's hook applies to the session it was for")
	next, err := a.Send(ctxT(t), bob.pub, protocol.PriorityNext, "n", "next", "")
	require.NoError(t, err)
	require.Equal(t, "pending", deliveryState(t, c, next.MessageID), "a next message waits while bob works")
	var left int
	require.NoError(t, c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.pending_status`).Scan(&left))
	require.Zero(t, left)
}

func TestSupersededHookSignalsGoWithTheOneApplied(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	// Both hooks of a short first turn come before the peer's hello.
	for _, st := range []protocol.Status{protocol.StatusWorking, protocol.StatusIdle} {
		code, res := postHook(t, c.nodes[0], bob, protocol.HookRequest{CWD: "/repo/bob", PID: 4242, Status: st, SessionID: "claude-1"})
		require.Equal(t, http.StatusOK, code)
		require.True(t, res.Pending)
	}
	opts := func(o *client.Options) { o.SessionID = "claude-1"; o.CWD = "/repo/bob"; o.PID = 4242 }
	b := m.dial(0, bob, opts)
	require.Equal(t, protocol.StatusIdle, peerStatus(t, a, "claude-1"), "the last hook said idle")
	// The peer reconnects a moment later: nothing older comes back.
	require.NoError(t, b.Close())
	m.dial(0, bob, opts)
	require.Equal(t, protocol.StatusIdle, peerStatus(t, a, "claude-1"))
}

func TestHookDuringHelloIsApplied(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	release, waitingOn := stallHello(t, m, bob, func(o *client.Options) { o.SessionID = "claude-1"; o.CWD = "/repo/bob"; o.PID = 4242 })
	// The first prompt's hook arrives now: it finds no committed session, and waits for the
	// hello in its cwd instead of storing a signal the hello has already looked for.
	hooked := make(chan protocol.HookResponse, 1)
	go func() {
		_, res := postHook(t, c.nodes[0], bob, protocol.HookRequest{CWD: "/repo/bob", PID: 4242,
			Status: protocol.StatusWorking, SessionID: "claude-1"})
		hooked <- res
	}()
	dbtest.WaitFor(t, 5*time.Second, "the hook waiting for the hello", waitingOn("advisory"))
	b := release()
	res := <-hooked
	require.False(t, res.Pending, "the hook found bob's session once his hello committed")
	require.Equal(t, b.HelloAck().PresenceID, res.PresenceID)
	require.Equal(t, protocol.StatusWorking, peerStatus(t, a, "claude-1"))
}

func TestReleaseKeepsOrderPastAHeldMessageTooLargeToRideAlong(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(1, alice)
	b := m.dial(0, bob, noClientAck)
	ctx := ctxT(t)
	presence := b.HelloAck().PresenceID
	bodies := []string{"s0", strings.Repeat("B", 7000), "s2", "s3"} // inline_max is 6,000 bytes
	for round := range 5 {
		require.NoError(t, b.SetStatus(ctx, protocol.StatusWorking))
		dbtest.WaitFor(t, 5*time.Second, "bob working", func() bool {
			var st string
			_ = c.pool.QueryRow(ctx, `SELECT status FROM claudemesh.presence WHERE id = $1`, presence).Scan(&st)
			return st == "working"
		})
		var ids []string
		for i, body := range bodies {
			ack, err := a.Send(ctx, bob.pub, protocol.PriorityNext, "n", body, fmt.Sprint(round, "-", i))
			require.NoError(t, err)
			ids = append(ids, ack.MessageID)
		}
		if round == 0 {
			// What the change to idle assigns at once, seen inside its own transaction: only
			// what comes before the large one; the claim its wake-up starts takes the rest.
			tx, err := c.pool.Begin(ctx)
			require.NoError(t, err)
			_, err = tx.Exec(ctx, `SELECT claudemesh.apply_status($1, 'idle', 'manual', 60, 'none', 128)`, presence)
			require.NoError(t, err)
			var states []string
			require.NoError(t, tx.QueryRow(ctx, `SELECT array_agg(d.state ORDER BY d.id) FROM claudemesh.delivery d
				WHERE d.envelope_id = ANY($1)`, ids).Scan(&states))
			require.NoError(t, tx.Rollback(ctx))
			require.Equal(t, []string{"assigned", "pending", "pending", "pending"}, states)
		}
		require.NoError(t, b.SetStatus(ctx, protocol.StatusIdle))
		var got []string
		for range ids {
			got = append(got, nextPush(t, b, 10*time.Second).MessageID)
		}
		require.True(t, slices.Equal(ids, got), "round %d: pushed %v, sent %v", round, got, ids)
	}
}

func TestStatusChangeBeforeTheSessionJoinsTheHubIsKept(t *testing.T) {
	t.Parallel()
	// The catch-up poll runs hourly here: what this test waits for must come without it.
	var bob *testMember
	var armed atomic.Bool
	var c *testCluster
	c = newCluster(t, 1, func(cfg *Config) {
		cfg.quiet = true
		cfg.helloRegistered = func() {
			if !armed.CompareAndSwap(true, false) {
				return
			}
			// Between bob's hello statement (which applied the pending `working`) and his
			// session joining the hub, the hook says idle: its notification finds no session.
			before := testutilCounter(c.nodes[0].metrics.BusReceived)
			code, res := postHook(t, c.nodes[0], bob, protocol.HookRequest{CWD: "/repo/bob", PID: 4242,
				Status: protocol.StatusIdle, SessionID: "claude-1"})
			require.Equal(t, http.StatusOK, code)
			require.False(t, res.Pending)
			dbtest.WaitFor(t, 5*time.Second, "the status change applied by the router", func() bool {
				return testutilCounter(c.nodes[0].metrics.BusReceived) > before
			})
		}
	})
	m := c.mesh(0)
	alice := m.member("alice")
	bob = m.member("bob")
	a := m.dial(0, alice)
	held, err := a.Send(ctxT(t), bob.pub, protocol.PriorityNext, "n", "held", "")
	require.NoError(t, err)
	code, res := postHook(t, c.nodes[0], bob, protocol.HookRequest{CWD: "/repo/bob", PID: 4242,
		Status: protocol.StatusWorking, SessionID: "claude-1"})
	require.Equal(t, http.StatusOK, code)
	require.True(t, res.Pending)
	armed.Store(true)
	b := m.dial(0, bob, func(o *client.Options) { o.SessionID = "claude-1"; o.CWD = "/repo/bob"; o.PID = 4242 })
	require.False(t, armed.Load(), "the status change ran during bob's hello")
	require.Equal(t, held.MessageID, nextPush(t, b, 10*time.Second).MessageID,
		"bob is idle: what waited for him comes without the catch-up poll")
}

func TestHookBeforeHelloIsNotTakenByAnotherSessionInItsCwd(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	// Two terminals of bob's in one repo; the first prompt's hook of the one at pid 100 comes
	// before either peer says hello.
	code, res := postHook(t, c.nodes[0], bob, protocol.HookRequest{CWD: "/repo", PID: 100,
		Status: protocol.StatusWorking, SessionID: "claude-A"})
	require.Equal(t, http.StatusOK, code)
	require.True(t, res.Pending)
	m.dial(0, bob, func(o *client.Options) { o.SessionID = "peer-B"; o.CWD = "/repo"; o.PID = 200 })
	require.Equal(t, protocol.StatusIdle, peerStatus(t, a, "peer-B"), "the signal names another process")
	m.dial(0, bob, func(o *client.Options) { o.SessionID = "peer-A"; o.CWD = "/repo"; o.PID = 100 })
	require.Equal(t, protocol.StatusWorking, peerStatus(t, a, "peer-A"))
}

// A hook finds its session by sessionId whatever cwd it names (Claude Code's hook sends the
// directory Claude is in, the peer the one it started in): one that arrives during the hello
// must wait for it as one naming the hello's cwd does, or its signal is stored after the hello
// looked for it and the session starts idle under a hook that said working.
func TestHookDuringHelloByItsSessionIDFromAnotherCwdIsApplied(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	release, waitingOn := stallHello(t, m, bob, func(o *client.Options) { o.SessionID = "claude-1"; o.CWD = "/repo/bob"; o.PID = 4242 })
	hooked := make(chan protocol.HookResponse, 1)
	go func() {
		_, res := postHook(t, c.nodes[0], bob, protocol.HookRequest{CWD: "/repo/bob/web", PID: 4242,
			Status: protocol.StatusWorking, SessionID: "claude-1"})
		hooked <- res
	}()
	var res protocol.HookResponse
	answered := false
	dbtest.WaitFor(t, 5*time.Second, "the hook waiting for the hello, or answered", func() bool {
		select {
		case res = <-hooked:
			answered = true
			return true
		default:
			return waitingOn("advisory")()
		}
	})
	b := release()
	if !answered {
		res = <-hooked
	}
	require.Equal(t, protocol.StatusWorking, peerStatus(t, a, "claude-1"), "the hook said working (answer %+v)", res)
	require.False(t, res.Pending, "the hook found bob's session once his hello committed")
	require.Equal(t, b.HelloAck().PresenceID, res.PresenceID)
}

// One hello statement registers many sessions in one transaction (claudemesh.hello_batch),
// each hello holding its cwd's and sessionId's locks until the batch commits. A hook that
// finds no session and holds the lock of one hello's cwd must not wait for another's
// sessionId: the batch, holding that sessionId, would wait for the cwd in turn, and Postgres
// would end one of them as a deadlock (the hook answered 503 and its signal was lost, or the
// batch's hello failed). The two hellos run here as two statements of one transaction, as the
// batch runs them, so the test can stop between them.
func TestHookDuringAHelloBatchOfItsSessionAndItsCwdDoesNotDeadlock(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	bob := m.member("bob")
	ctx := ctxT(t)
	tx, err := c.pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(context.Background()) }()
	hello := func(session, cwd string, pid int) (code, presence string) {
		require.NoError(t, tx.QueryRow(ctx, `SELECT code, coalesce(presence_id, '') || coalesce(failure, '')
			FROM claudemesh.hello_batch('elsewhere', 'rv2test', 100, ARRAY[$1], ARRAY[$2], ARRAY[$3], ARRAY[$4], ARRAY[''],
				ARRAY['bob'], ARRAY[$5::int], ARRAY[$6], ARRAY['[]'::jsonb], ARRAY['[]'::jsonb], ARRAY[$7],
				ARRAY[now() + interval '1 minute'], ARRAY[false], ARRAY['session'], ARRAY[''], ARRAY['claude'], ARRAY[''], ARRAY[''])`,
			m.id, bob.id, bob.pub, session, pid, cwd, "sig-"+session).Scan(&code, &presence))
		return code, presence
	}
	code, first := hello("claude-1", "/repo/bob", 4242)
	require.Empty(t, code, first)
	hooked := make(chan protocol.HookResponse, 1)
	codes := make(chan int, 1)
	go func() {
		code, res := postHook(t, c.nodes[0], bob, protocol.HookRequest{CWD: "/repo/bob/web", PID: 4242,
			Status: protocol.StatusWorking, SessionID: "claude-1"})
		codes <- code
		hooked <- res
	}()
	dbtest.WaitFor(t, 5*time.Second, "the hook waiting for the batch's hello of its session", func() bool {
		var n int
		_ = c.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = 'advisory'`).Scan(&n)
		return n == 1
	})
	// The batch's next hello: a session of bob's in the directory the hook named.
	code, second := hello("claude-2", "/repo/bob/web", 5252)
	require.Empty(t, code, "the batch's second hello: %s", second)
	require.NoError(t, tx.Commit(ctx))
	require.Equal(t, http.StatusOK, <-codes, "the hook")
	res := <-hooked
	require.False(t, res.Pending, "the hook found its session once the batch committed")
	require.Equal(t, first, res.PresenceID)
	var status string
	require.NoError(t, c.pool.QueryRow(ctx, `SELECT status FROM claudemesh.presence WHERE id = $1`, first).Scan(&status))
	require.Equal(t, "working", status)
}

// stallHello starts mem's hello on node 0 and holds its statement past its look for waiting
// signals (its audit insert, near its end, waits for a lock held here), so a hook arriving
// meanwhile finds no committed session. release lets the hello finish and returns its client;
// waitingOn(event) says whether one backend waits on a lock of that kind (relation: the hello;
// advisory: a hook waiting for it).
func stallHello(t *testing.T, m *testMesh, mem *testMember, opts func(*client.Options)) (release func() *client.Client, waitingOn func(event string) func() bool) {
	t.Helper()
	ctx, pool := ctxT(t), m.c.pool
	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { _ = tx.Rollback(context.Background()) })
	_, err = tx.Exec(ctx, `LOCK TABLE claudemesh.audit_pending IN SHARE MODE`)
	require.NoError(t, err)
	var wg sync.WaitGroup
	var b *client.Client
	wg.Go(func() { b = m.dial(0, mem, opts) })
	waitingOn = func(event string) func() bool {
		return func() bool {
			var n int
			_ = pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
				WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = $1`, event).Scan(&n)
			return n == 1
		}
	}
	dbtest.WaitFor(t, 5*time.Second, mem.name+"'s hello waiting near its end", waitingOn("relation"))
	return func() *client.Client {
		require.NoError(t, tx.Commit(ctx))
		wg.Wait()
		return b
	}, waitingOn
}
