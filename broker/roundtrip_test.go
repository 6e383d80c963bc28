package broker

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/db/pgproxy"
	"github.com/claudemesh/broker/protocol"
)

// Round trips to Postgres per operation, counted exactly: the measured replica reaches
// Postgres through a proxy that counts client→server flights (one or more writes before a
// read: a round trip), with its periodic background work stretched out of the way. At 40 ms
// from the primary each flight costs 40 ms; these are the budgets a multi-region replica lives
// by (docs/operations.md), and the regression guard for them.

// countedNode starts a replica whose pool goes through a counting proxy, quiet in the
// background, as node "rt"; the cluster's other nodes are not counted.
func countedNode(t *testing.T, c *testCluster, notifyAfterCommit bool) (*Server, *dbtest.Proxy) {
	t.Helper()
	return countedNodeWith(t, c, notifyAfterCommit, nil)
}

// countedNodeWith is countedNode whose pool prepares prepare on its connection (a replica's:
// store.RequestPathSQL).
func countedNodeWith(t *testing.T, c *testCluster, notifyAfterCommit bool, prepare []string) (*Server, *dbtest.Proxy) {
	t.Helper()
	return countedNodeConfig(t, c, func(cfg *Config) { cfg.NotifyAfterCommit = notifyAfterCommit }, prepare, nil)
}

// countedNodeConfig is countedNodeWith with any config, and named prepared by name too
// (db.PoolConfig.Named).
func countedNodeConfig(t *testing.T, c *testCluster, tweak func(*Config), prepare, named []string) (*Server, *dbtest.Proxy) {
	t.Helper()
	proxy := dbtest.NewProxy(t, c.url)
	cfg := Config{NodeID: "rt", Region: "test", SessionGrace: 5 * time.Second, Heartbeat: time.Hour, NodeDeadAfter: 3 * time.Hour, quiet: true}
	tweak(&cfg)
	// One pooled connection: every statement is prepared on it once, in the warm-up, so the
	// counts below are of steady state (a statement costs two flights on its first use on a
	// connection: prepare, then execute).
	pool, err := db.NewPool(context.Background(), proxy.URL(c.url), db.PoolConfig{MaxConns: 1, Prepare: prepare, Named: named})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	srv := startServer(t, cfg, pool, dbtest.Logger(t).With("test_node", "rt"))
	dbtest.WaitFor(t, 10*time.Second, "listener of rt connected", srv.BusConnected)
	c.nodes = append(c.nodes, srv)
	return srv, proxy
}

// flights counts the statement flights of op, waiting for done (checked through the test's
// own pool, which is not counted) when the operation finishes after op returns. It starts once
// the replica is quiet (no flight for 100 ms), so the tail of an earlier operation (a claim
// after a hello, a record after a push) is not counted against this one.
func flights(t *testing.T, p *dbtest.Proxy, op func(), done func() bool) int64 {
	t.Helper()
	last, since := p.Flights(), time.Now()
	dbtest.WaitFor(t, 10*time.Second, "no round trips in flight", func() bool {
		if now := p.Flights(); now != last {
			last, since = now, time.Now()
		}
		return time.Since(since) >= 100*time.Millisecond
	})
	before := p.Flights()
	op()
	if done != nil {
		dbtest.WaitFor(t, 10*time.Second, "operation finished", done)
	}
	return p.Flights().Sub(before).Statement
}

// dialCounted counts the flights of a hello (dial), through the session's catch-up: until its
// session on srv has nothing left to claim.
func dialCounted(t *testing.T, srv *Server, proxy *dbtest.Proxy, dial func() *client.Client) (*client.Client, int64) {
	t.Helper()
	var b *client.Client
	n := flights(t, proxy, func() { b = dial() }, func() bool {
		sess := srv.hub.get(b.HelloAck().PresenceID)
		if sess == nil {
			return false
		}
		sess.mu.Lock()
		defer sess.mu.Unlock()
		return !sess.backlog
	})
	return b, n
}

// pushAndAckFlights sends from a (another replica) to b's member, counting b's replica's
// flights until the push is recorded, then until b's client_ack is.
func pushAndAckFlights(t *testing.T, c *testCluster, proxy *dbtest.Proxy, a, b *client.Client, to *testMember) (pushed, acked int64) {
	t.Helper()
	ctx := ctxT(t)
	var in protocol.Ack
	pushed = flights(t, proxy, func() {
		var err error
		in, err = a.Send(ctx, to.pub, protocol.PriorityNow, "n", "to "+to.name, "")
		require.NoError(t, err)
		require.Equal(t, in.MessageID, nextPush(t, b, 5*time.Second).MessageID)
	}, func() bool { return deliveryState(t, c, in.MessageID) == "pushed" })
	acked = flights(t, proxy, func() { require.NoError(t, b.AckMessages(ctx, in.MessageID)) },
		func() bool { return deliveryState(t, c, in.MessageID) == "acked" })
	return pushed, acked
}

func deliveryState(t *testing.T, c *testCluster, messageID string) string {
	var st string
	_ = c.pool.QueryRow(context.Background(), `SELECT state FROM claudemesh.delivery WHERE envelope_id = $1`, messageID).Scan(&st)
	return st
}

// Both ways a send can notify (NOTIFY_AFTER_COMMIT): the notifying transaction after the
// commit rides in the same flight.
func TestRoundTripsPerOperation(t *testing.T) {
	t.Parallel()
	for _, after := range []bool{false, true} {
		t.Run(fmt.Sprintf("notify_after_commit=%v", after), func(t *testing.T) {
			t.Parallel()
			roundTripsPerOperation(t, after)
		})
	}
}

// A replica's connections come with its busiest paths prepared (db.RequestPath): the first
// hello, send, record, client_ack and hook on a new connection cost what they cost later, one
// round trip, not a second to prepare their statements first. A replica far from the primary opens connections as its pool grows and
// replaces each one at its lifetime; a hook landing on a connection that had not yet run the
// hook's statement took two round trips (BENCHMARKS.md, stop 37).
func TestFirstOperationsOnANewConnectionCostOneRoundTrip(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"default", "notify_after_commit", "push_before_flush"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			tweak := func(cfg *Config) {
				cfg.NotifyAfterCommit, cfg.PushBeforeFlush = mode == "notify_after_commit", mode == "push_before_flush"
			}
			c := newCluster(t, 1, tweak)
			var named []string
			if mode == "push_before_flush" {
				named = store.NamedSQL()
			}
			srv, proxy := countedNodeConfig(t, c, tweak, store.RequestPathSQL(), named)
			rt := len(c.nodes) - 1
			m := c.mesh(0)
			alice, bob := m.member("alice"), m.member("bob")
			a := m.dial(0, alice)
			ctx := ctxT(t)

			b, n := dialCounted(t, srv, proxy, func() *client.Client {
				return m.dial(rt, bob, func(o *client.Options) { o.CWD = "/repo/bob"; o.SessionID = "claude-bob" })
			})
			require.Equal(t, int64(1), n, "the first hello")
			n = flights(t, proxy, func() {
				_, err := b.Send(ctx, alice.pub, protocol.PriorityNow, "n", "to alice", "")
				require.NoError(t, err)
			}, nil)
			require.Equal(t, int64(1), n, "the first send")
			pushed, acked := pushAndAckFlights(t, c, proxy, a, b, bob)
			require.Equal(t, int64(1), pushed, "the first record of a push")
			require.Equal(t, int64(1), acked, "the first client_ack")
			n = flights(t, proxy, func() {
				code, _ := postHook(t, srv, bob, protocol.HookRequest{CWD: "/repo/bob", Status: protocol.StatusWorking, SessionID: "claude-bob"})
				require.Equal(t, http.StatusOK, code)
			}, nil)
			require.Equal(t, int64(1), n, "the first hook")
		})
	}
}

func roundTripsPerOperation(t *testing.T, notifyAfterCommit bool) {
	c := newCluster(t, 1, func(cfg *Config) { cfg.NotifyAfterCommit = notifyAfterCommit }) // node 0: other replica, not counted
	srv, proxy := countedNode(t, c, notifyAfterCommit)
	rt := len(c.nodes) - 1
	m := c.mesh(0)
	alice, bob, carol := m.member("alice"), m.member("bob"), m.member("carol")
	a := m.dial(0, alice)
	ctx := ctxT(t)
	// Each operation once first: statements are prepared on first use per connection.
	wm := m.member("warm")
	warm := m.dial(rt, wm, func(o *client.Options) { o.CWD = "/repo/warm" })
	for i := range 3 {
		w := m.dial(rt, m.member(fmt.Sprint("warm", i)))
		_, _ = warm.ListPeers(ctx)
		_, _ = warm.Send(ctx, alice.pub, protocol.PriorityNow, "n", fmt.Sprint("warm", i), "")
		_ = warm.SetState(ctx, "warm", i)
		in, err := a.Send(ctx, wm.pub, protocol.PriorityNow, "n", "warm", "")
		require.NoError(t, err)
		require.Equal(t, in.MessageID, nextPush(t, warm, 5*time.Second).MessageID)
		require.NoError(t, warm.AckMessages(ctx, in.MessageID))
		postHook(t, srv, wm, protocol.HookRequest{CWD: "/repo/warm", Status: protocol.StatusIdle})
		require.NoError(t, w.Close())
	}

	// hello → hello_ack: one flight, the hello's statement and, after its commit, the probe
	// of what waits for the session: nothing here, so no claim follows.
	b, n := dialCounted(t, srv, proxy, func() *client.Client {
		return m.dial(rt, bob, func(o *client.Options) { o.CWD = "/repo/bob"; o.SessionID = "claude-bob" })
	})
	require.Equal(t, int64(1), n, "hello with nothing waiting: one flight, no claim")
	t.Logf("hello: %d round trips", n)

	// A hello with a message waiting for its member: the hello's flight, then the claim.
	dave := m.member("dave")
	queued, err := a.Send(ctx, dave.pub, protocol.PriorityNow, "n", "queued", "")
	require.NoError(t, err)
	var d *client.Client
	n = flights(t, proxy, func() {
		d = m.dial(rt, dave)
	}, func() bool { return deliveryState(t, c, queued.MessageID) != "pending" })
	require.Equal(t, queued.MessageID, nextPush(t, d, 5*time.Second).MessageID)
	// The delivery's record, after the push is written, may land before the count ends.
	require.Contains(t, []int64{2, 3}, n, "hello with a message waiting: the hello, then its claim")

	// list_peers: one.
	n = flights(t, proxy, func() {
		_, err := b.ListPeers(ctx)
		require.NoError(t, err)
	}, nil)
	require.Equal(t, int64(1), n, "list_peers")

	// send → ack: one statement stores, resolves, notifies and audits.
	var ack protocol.Ack
	n = flights(t, proxy, func() {
		var err error
		ack, err = b.Send(ctx, alice.pub, protocol.PriorityNow, "n", "to alice", "")
		require.NoError(t, err)
	}, nil)
	require.Equal(t, int64(1), n, "send → ack")
	for nextPush(t, a, 5*time.Second).MessageID != ack.MessageID { // the warm-up's pushes come first
	}

	// A push from another replica: it arrives inside the notification and is written at once;
	// recording it takes one statement. client_ack: one (batched) statement.
	pushed, acked := pushAndAckFlights(t, c, proxy, a, b, bob)
	require.Equal(t, int64(1), pushed, "a push from another replica: written, then recorded")
	require.Equal(t, int64(1), acked, "client_ack")

	// A hook on this replica that releases a message held on the other: one statement here
	// (status, release, notifications); the holder pushes it from the notification.
	cl := m.dial(0, carol, func(o *client.Options) { o.CWD = "/repo/carol"; o.SessionID = "claude-carol" })
	code, _ := postHook(t, c.nodes[0], carol, protocol.HookRequest{CWD: "/repo/carol", Status: protocol.StatusWorking, SessionID: "claude-carol"})
	require.Equal(t, http.StatusOK, code)
	dbtest.WaitFor(t, 5*time.Second, "carol working", func() bool {
		peers, err := a.ListPeers(ctx)
		for _, p := range peers {
			if p.DisplayName == "carol" {
				return err == nil && p.Status == protocol.StatusWorking
			}
		}
		return false
	})
	held, err := a.Send(ctx, carol.pub, protocol.PriorityNext, "n", "held", "")
	require.NoError(t, err)
	n = flights(t, proxy, func() {
		code, _ := postHook(t, srv, carol, protocol.HookRequest{CWD: "/repo/carol", Status: protocol.StatusIdle, SessionID: "claude-carol"})
		require.Equal(t, http.StatusOK, code)
	}, nil)
	require.Equal(t, held.MessageID, nextPush(t, cl, 5*time.Second).MessageID)
	require.LessOrEqual(t, n, int64(2), "hook with release, on the hook's replica")
	t.Logf("hook release: %d round trips on the hook's replica", n)

	// The same release seen from the holder's replica: it pushes from the notification, then
	// records the push taken (one statement); no claim first. One claim follows: the wake-up
	// of the held send was skipped while bob worked, and a send racing the change to idle may
	// have left a row its release did not see (TestHeldSendRacingAChangeToIdleIsNotOvertaken).
	code, _ = postHook(t, srv, bob, protocol.HookRequest{CWD: "/repo/bob", Status: protocol.StatusWorking, SessionID: "claude-bob"})
	require.Equal(t, http.StatusOK, code)
	dbtest.WaitFor(t, 5*time.Second, "bob working", func() bool {
		sess := srv.hub.get(b.HelloAck().PresenceID)
		sess.mu.Lock()
		defer sess.mu.Unlock()
		return sess.status == protocol.StatusWorking
	})
	held, err = a.Send(ctx, bob.pub, protocol.PriorityNext, "n", "held for bob", "")
	require.NoError(t, err)
	claims := testutilCounter(srv.metrics.Claims)
	n = flights(t, proxy, func() {
		code, _ := postHook(t, c.nodes[0], bob, protocol.HookRequest{CWD: "/repo/bob", Status: protocol.StatusIdle, SessionID: "claude-bob"})
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, held.MessageID, nextPush(t, b, 5*time.Second).MessageID)
	}, func() bool {
		if deliveryState(t, c, held.MessageID) != "pushed" {
			return false
		}
		if testutilCounter(srv.metrics.Claims) == claims {
			return false
		}
		sess := srv.hub.get(b.HelloAck().PresenceID)
		sess.mu.Lock()
		defer sess.mu.Unlock()
		return !sess.backlog // the claim after the push has run
	})
	require.Equal(t, int64(2), n, "a release pushed by the holder: no claim before it, one record, one claim after")

	// set_state: one statement (quota, row, notification, audit).
	n = flights(t, proxy, func() { require.NoError(t, b.SetState(ctx, "build", "green")) }, func() bool {
		var v string
		_ = c.pool.QueryRow(ctx, `SELECT value #>> '{}' FROM claudemesh.state WHERE mesh_id = $1 AND key = 'build'`, m.id).Scan(&v)
		return v == "green"
	})
	require.Equal(t, int64(1), n, "set_state")

	// A session's end: one statement (end, peer_left, audit, release, wake-ups).
	presence := b.HelloAck().PresenceID
	n = flights(t, proxy, func() { require.NoError(t, b.Close()) }, func() bool {
		var ended bool
		_ = c.pool.QueryRow(ctx, `SELECT ended_at IS NOT NULL FROM claudemesh.presence WHERE id = $1`, presence).Scan(&ended)
		return ended
	})
	require.Equal(t, int64(1), n, "session end")
}

// 60 members of one mesh say hello at once to a replica 40 ms from Postgres: every hello is
// answered, none with "internal" (the mesh's capacity lock is held for a statement's server
// time, not across round trips). With a tiny hello queue the excess is refused at once as
// overloaded (close 1013, retryable), still never as internal.
func TestHelloStorm(t *testing.T) {
	t.Parallel()
	storm := func(t *testing.T, tweak func(*Config)) (ok, overloaded int) {
		c := newCluster(t, 0, nil)
		proxy := dbtest.NewProxy(t, c.url)
		proxy.SetDelay(20 * time.Millisecond)
		cfg := Config{NodeID: "storm", Region: "test"}
		if tweak != nil {
			tweak(&cfg)
		}
		srv, err := NewServer(cfg, dbtest.PoolFor(t, proxy.URL(c.url)), dbtest.Logger(t))
		require.NoError(t, err)
		require.NoError(t, srv.Start(context.Background(), "127.0.0.1:0"))
		t.Cleanup(func() { _ = srv.Stop(context.Background()) })
		dbtest.WaitFor(t, 10*time.Second, "listener connected", srv.BusConnected)
		c.nodes = append(c.nodes, srv)
		m := c.mesh(0)
		var members []*testMember
		for i := range 60 {
			members = append(members, m.member(fmt.Sprint("p", i)))
		}
		errs := make(chan error, len(members))
		for _, mem := range members {
			go func() {
				_, err := m.tryDial(0, mem)
				errs <- err
			}()
		}
		for range members {
			err := <-errs
			if err == nil {
				ok++
				continue
			}
			he := helloErr(t, err)
			require.Equal(t, protocol.CodeOverloaded, he.Code, "the only refusal of a storm is overloaded: %s", he.Message)
			require.Equal(t, protocol.CloseTryAgainLater, he.CloseCode)
			overloaded++
		}
		return ok, overloaded
	}
	t.Run("answered", func(t *testing.T) {
		ok, _ := storm(t, nil)
		require.Equal(t, 60, ok)
	})
	t.Run("bounded", func(t *testing.T) {
		ok, overloaded := storm(t, func(c *Config) { c.HelloConcurrency, c.HelloQueue = 1, 2 })
		require.Equal(t, 60, ok+overloaded)
		require.Positive(t, overloaded, "a full queue refuses at once")
		require.Positive(t, ok)
	})
}

// Hellos waiting for a lock held elsewhere (their mesh's, here by a transaction that does not
// end) are refused as overloaded after a second (migration 00035's lock_timeout), with the
// other hellos of that mesh in their statement at once; a hello for another mesh queued behind
// them goes through a second later. A replica runs one hello statement at a time: without the
// bound the statement waited for its 5 s timeout and failed whole, and without the mesh's
// other hellos failing with the first, six of them waited a second each, past it too.
func TestHelloBehindAHeldLockIsRefusedAlone(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	stuck, free := c.mesh(0), c.mesh(0)
	bob := free.member("bob")
	var alices []*testMember
	for i := range 6 {
		alices = append(alices, stuck.member(fmt.Sprint("alice", i)))
	}
	ctx := ctxT(t)
	tx, err := c.pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(context.Background()) }()
	_, err = tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('claudemesh.hello:' || $1, 0))`, stuck.id)
	require.NoError(t, err)

	refused := make(chan error, len(alices))
	for _, a := range alices {
		go func() {
			_, err := stuck.tryDial(0, a)
			refused <- err
		}()
	}
	dbtest.WaitFor(t, 10*time.Second, "a hello waiting for its mesh's lock", func() bool {
		var n int
		require.NoError(t, c.pool.QueryRow(ctx, `SELECT count(*) FROM pg_locks
			WHERE locktype = 'advisory' AND NOT granted
			  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&n))
		return n > 0
	})
	b := free.dial(0, bob) // queued behind the stuck statement, for another mesh
	require.NotEmpty(t, b.HelloAck().PresenceID)
	for range alices {
		he := helloErr(t, <-refused)
		require.Equal(t, protocol.CodeOverloaded, he.Code, he.Message)
		require.Equal(t, protocol.CloseTryAgainLater, he.CloseCode)
	}

	require.NoError(t, tx.Rollback(ctx))
	a := stuck.dial(0, alices[0]) // the retry passes
	require.NotEmpty(t, a.HelloAck().PresenceID)
}

// Today's CLI acks each push with a client_ack of its own as it reads it. At a steady trickle
// those acks share record statements (ackLinger) instead of taking one each: ten acks 2 ms
// apart took about ten statements when each was recorded at once.
func TestAcksAtATrickleShareStatements(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	_, proxy := countedNode(t, c, false)
	rt := len(c.nodes) - 1
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a, b := m.dial(0, alice), m.dial(rt, bob)
	ctx := ctxT(t)
	ids := make([]string, 10)
	for i := range ids {
		ack, err := a.Send(ctx, bob.pub, protocol.PriorityNow, "n", fmt.Sprint("trickle ", i), "")
		require.NoError(t, err)
		ids[i] = ack.MessageID
	}
	for _, id := range ids {
		require.Equal(t, id, nextPush(t, b, 5*time.Second).MessageID)
	}
	n := flights(t, proxy, func() {
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for _, id := range ids {
			<-tick.C
			require.NoError(t, b.AckMessages(ctx, id))
		}
	}, func() bool {
		var open int
		err := c.pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.delivery WHERE envelope_id = ANY($1) AND state <> 'acked'`, ids).Scan(&open)
		return err == nil && open == 0
	})
	t.Logf("10 acks 2 ms apart: %d statements", n)
	require.LessOrEqual(t, n, int64(5), "acks at a trickle share statements")
}

// A client_ack has no reply and no rate limit: what bounds the Postgres work it causes is that
// a client acks what it was pushed. Ids it was never pushed (made up, or the mesh's message ids
// read elsewhere) cost an index probe each in the record statement all the replica's acks share;
// one member flooding them kept a backend busy and filled the replica's ack queue, so every
// other session's acks waited behind it. A socket's acks beyond the pushes written to it (and a
// frame's worth more) are not recorded.
func TestAcksOfIdsNeverPushedAreBounded(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	_, proxy := countedNode(t, c, false)
	rt := len(c.nodes) - 1
	m := c.mesh(0)
	alice := m.member("alice")
	a := m.dial(rt, alice)
	ctx := ctxT(t)
	const frames = 64
	quiet := func() pgproxy.Flights {
		last, since := proxy.Flights(), time.Now()
		dbtest.WaitFor(t, 20*time.Second, "no round trips in flight", func() bool {
			if now := proxy.Flights(); now != last {
				last, since = now, time.Now()
			}
			return time.Since(since) >= 300*time.Millisecond
		})
		return last
	}
	before := quiet()
	ids := make([]string, protocol.MaxAckIDs)
	for f := range frames {
		for i := range ids {
			ids[i] = fmt.Sprintf("%08x-0000-4000-8000-%012x", f, i)
		}
		require.NoError(t, a.AckMessages(ctx, ids...))
	}
	// Frames are read in order: once this is answered, every ack above was taken; the records
	// go after it, so the count ends once the replica is quiet again.
	_, err := a.ListPeers(ctx)
	require.NoError(t, err)
	n := quiet().Sub(before).Statement
	t.Logf("%d frames of %d ids never pushed: %d statements", frames, protocol.MaxAckIDs, n)
	require.LessOrEqual(t, n, int64(8), "acks beyond what was pushed cost no statements")
}
