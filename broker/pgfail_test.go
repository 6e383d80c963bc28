package broker

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// startNodeNamed starts a replica whose pool is set up as in production (spares, prepared
// statements) under its own application name, so a test can find its backends.
func (c *testCluster) startNodeNamed(id, appName string, tweak func(*Config)) *Server {
	t := c.t
	pool, err := db.NewPool(context.Background(), c.url, db.PoolConfig{MaxConns: 8, MinIdle: db.ReplicaMinIdle,
		AppName: appName, Prepare: store.RequestPathSQL()})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	cfg := Config{NodeID: id, Region: "test", SessionGrace: 5 * time.Second, SendRatePerMember: 1 << 30, SendBurstPerMember: 1 << 30,
		WriteRatePerMember: 1 << 30, WriteBurstPerMember: 1 << 30, ReadRatePerMember: 1 << 30, ReadBurstPerMember: 1 << 30}
	if tweak != nil {
		tweak(&cfg)
	}
	srv := startServer(t, cfg, pool, dbtest.Logger(t).With("test_node", id))
	dbtest.WaitFor(t, 10*time.Second, "listener of "+id+" connected", srv.BusConnected)
	c.nodes = append(c.nodes, srv)
	return srv
}

// terminateBackends ends every backend of appName (pg_terminate_backend, as an operator or a
// restart of Postgres does) and waits until they are gone. It returns how many it ended.
func (c *testCluster) terminateBackends(appName string) int {
	c.t.Helper()
	ctx := ctxT(c.t)
	var pids []int32
	require.NoError(c.t, c.pool.QueryRow(ctx, `SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity
		WHERE datname = current_database() AND application_name = $1`, appName).Scan(&pids))
	_, err := c.pool.Exec(ctx, `SELECT pg_terminate_backend(p) FROM unnest($1::int[]) p`, pids)
	require.NoError(c.t, err)
	dbtest.WaitFor(c.t, 10*time.Second, "terminated backends gone", func() bool {
		var left int
		_ = c.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)`, pids).Scan(&left)
		return left == 0
	})
	return len(pids)
}

// Connections of the pool that Postgres ended while they sat idle are not handed out: the
// replica's next send, hello, request and health check take a live one. Before, each of them
// failed once per dead connection while the database was up: the send refused "unavailable",
// list_peers answered "internal", and /health said 503 db down, taking the replica out of the
// load balancer.
func TestIdleConnectionsTerminatedFailNothing(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	c := &testCluster{t: t, url: url, pool: dbtest.PoolFor(t, url)}
	srv := c.startNodeNamed("n0", "pgfail-idle", nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	ctx := ctxT(t)

	require.Greater(t, c.terminateBackends("pgfail-idle"), 1, "the pool held spare connections")
	code, h := getHealth(t, srv.Addr())
	require.Equal(t, http.StatusOK, code, "health after the pool's connections ended: %+v", h)
	queued, err := a.Send(ctx, bob.pub, protocol.PriorityNow, "n", "c", "first")
	require.NoError(t, err, "a send after the pool's connections ended")
	require.True(t, queued.Queued)
	peers, err := a.ListPeers(ctx)
	require.NoError(t, err)
	require.Len(t, peers, 1)

	require.Positive(t, c.terminateBackends("pgfail-idle"))
	b := m.dial(0, bob) // a hello
	require.Equal(t, queued.MessageID, nextPush(t, b, 5*time.Second).MessageID)
	ack, err := b.Send(ctx, alice.pub, protocol.PriorityNow, "n", "c", "second")
	require.NoError(t, err)
	require.True(t, ack.Queued)
	require.Equal(t, ack.MessageID, nextPush(t, a, 5*time.Second).MessageID)
}

// A replica whose database comes back before its heartbeat's next beat keeps its sessions.
// The send-away check and the heartbeat tick together, and the check read the beats before
// the one then due: an outage spanning two beats (here cut after a beat and restored after
// the next two failed, well within half of NODE_DEAD_AFTER_SECONDS plus a beat) closed every
// session with 1012 a beat after the database was back. The check now beats first.
func TestSessionsStayWhenPostgresIsBackBeforeTheBeat(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	c := &testCluster{t: t, url: url, pool: dbtest.PoolFor(t, url)}
	lines := &logLines{}
	pool := dbtest.PoolFor(t, proxy.URL(url))
	srv := startServer(t, Config{NodeID: "n0", Region: "test", Heartbeat: time.Second, NodeDeadAfter: 5 * time.Second},
		pool, slog.New(slog.NewTextHandler(io.MultiWriter(lines, tLog{t}), nil)))
	dbtest.WaitFor(t, 10*time.Second, "listener connected", srv.BusConnected)
	c.nodes = []*Server{srv}
	m := c.mesh(0)
	alice := m.member("alice")
	a := m.dial(0, alice)

	// Cut just after a beat, and restore once the next two have failed: the database is away
	// for two seconds, less than the 2.5 s after which a replica gives its sessions up.
	last := srv.heartbeat.LastOK()
	dbtest.WaitFor(t, 5*time.Second, "a beat", func() bool { return srv.heartbeat.LastOK().After(last) })
	proxy.Cut()
	dbtest.WaitFor(t, 5*time.Second, "two beats failed", func() bool { return srv.heartbeat.FailedBeats() >= 2 })
	proxy.Restore()
	restored := time.Now()
	dbtest.WaitFor(t, 5*time.Second, "beating again", func() bool { return srv.heartbeat.LastOK().After(restored) })
	_, err := a.ListPeers(ctxT(t))
	require.NoError(t, err, "the session is still open (closed %d %q)", a.CloseCode(), a.CloseReason())
	require.Empty(t, lines.matching("asking sessions to reconnect"))
}

// tLog writes through t.Log, as dbtest.Logger does.
type tLog struct{ t *testing.T }

func (w tLog) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// claudemesh_bus_events_total{event="reconnect"} counts the LISTEN connection re-established:
// once for a connection killed and replaced at the first attempt, once for an outage however
// many attempts it took. It counted the attempts that followed a failed one: nothing for the
// first case, and one per retry (every few seconds) for the second.
func TestListenerReconnectCountedOncePerReestablishment(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	c := &testCluster{t: t, url: url, pool: dbtest.PoolFor(t, url)}
	srv := startServer(t, Config{NodeID: "n0", Region: "test", Heartbeat: 200 * time.Millisecond, NodeDeadAfter: 2 * time.Second},
		dbtest.PoolFor(t, proxy.URL(url)), dbtest.Logger(t))
	dbtest.WaitFor(t, 10*time.Second, "listener connected", srv.BusConnected)
	c.nodes = []*Server{srv}
	reconnects := func() float64 { return testutilCounter(srv.metrics.BusEvents.WithLabelValues("reconnect")) }

	require.Equal(t, 1, c.killListeners())
	dbtest.WaitFor(t, 10*time.Second, "a reconnect counted", func() bool { return reconnects() == 1 })
	require.True(t, srv.BusConnected())

	proxy.Cut()
	// Long enough for several attempts (50 ms doubling): until the heartbeat is reported failing.
	dbtest.WaitFor(t, 10*time.Second, "heartbeat failing", func() bool {
		_, h := getHealth(t, srv.Addr())
		return h.Heartbeat == "failing" && h.Listener == "down"
	})
	require.Equal(t, float64(1), reconnects(), "nothing re-established yet")
	proxy.Restore()
	dbtest.WaitFor(t, 10*time.Second, "listener back", srv.BusConnected)
	require.Equal(t, float64(2), reconnects())
}

// A send batch still waiting past its deadline (here on a table lock, as a migration or a
// VACUUM FULL takes) is cancelled in Postgres: its sender is refused "unavailable", a known
// outcome, and keeps its socket, and no backend is left running the statement. Before, the
// connection was dropped at the deadline: the sender's socket was closed 1013
// send_outcome_unknown, and the statement waited on in a backend nobody read, holding a
// connection slot, one more for every batch while the lock lasted.
func TestSendPastItsDeadlineIsCancelledInPostgres(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	c := &testCluster{t: t, url: url, pool: dbtest.PoolFor(t, url)}
	c.startNodeNamed("n0", "pgfail-deadline", func(cfg *Config) { cfg.sendDeadline = 300 * time.Millisecond })
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	ctx := ctxT(t)

	lock, err := c.pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = lock.Rollback(context.Background()) }()
	_, err = lock.Exec(ctx, `LOCK TABLE claudemesh.envelope IN ACCESS EXCLUSIVE MODE`)
	require.NoError(t, err)

	_, err = a.Send(ctx, bob.pub, protocol.PriorityNow, "n", "c", "locked")
	var perr *protocol.Error
	require.ErrorAs(t, err, &perr, "refused, not closed (close %d %q)", a.CloseCode(), a.CloseReason())
	require.Equal(t, protocol.CodeUnavailable, perr.Code)
	var running int
	require.NoError(t, c.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgfail-deadline'
		AND state = 'active' AND query LIKE '-- name: SendBatch%'`).Scan(&running))
	require.Zero(t, running, "the statement still runs in Postgres")

	require.NoError(t, lock.Rollback(ctx))
	ack, err := a.Send(ctx, bob.pub, protocol.PriorityNow, "n", "c", "locked") // the retry
	require.NoError(t, err)
	require.True(t, ack.Queued)
	require.False(t, ack.Duplicate, "the first was not stored")
}

// A client_ack that arrives while Postgres is away is recorded once it is back. It was dropped
// with its failed statement: the delivery stayed pushed, and the recipient's next connection
// got the acked message again.
func TestAcksDuringAnOutageAreRecordedAfterIt(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	c := &testCluster{t: t, url: url, pool: dbtest.PoolFor(t, url)}
	c.url = proxy.URL(url)
	srv := c.startNode("n0", nil)
	c.nodes = []*Server{srv}
	c.url = url
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	b := m.dial(0, bob)
	ctx := ctxT(t)
	sent, err := b.Send(ctx, alice.pub, protocol.PriorityNow, "n", "c", "")
	require.NoError(t, err)
	p := nextPush(t, a, 5*time.Second)
	require.Equal(t, sent.MessageID, p.MessageID)

	proxy.Cut()
	failed := testutilCounter(srv.metrics.BackgroundErrors.WithLabelValues("record_deliveries"))
	require.NoError(t, a.AckPush(ctx, p))
	dbtest.WaitFor(t, 10*time.Second, "the ack's statement failed", func() bool {
		return testutilCounter(srv.metrics.BackgroundErrors.WithLabelValues("record_deliveries")) > failed
	})
	proxy.Restore()
	dbtest.WaitFor(t, 10*time.Second, "the ack recorded once Postgres is back", func() bool {
		var state string
		_ = c.pool.QueryRow(ctx, `SELECT state FROM claudemesh.delivery WHERE envelope_id = $1`, sent.MessageID).Scan(&state)
		return state == "acked"
	})

	// alice's next connection does not get it again: the next push is the next message.
	require.NoError(t, a.Close())
	a = m.dial(0, alice)
	next, err := b.Send(ctx, alice.pub, protocol.PriorityNow, "n", "c", "")
	require.NoError(t, err)
	require.Equal(t, next.MessageID, nextPush(t, a, 5*time.Second).MessageID)
}

// An outage is logged once by the heartbeat and once by the listener, with a line each when
// they are back saying how many attempts failed; not a line per beat and per retry.
func TestAnOutageIsLoggedOncePerEpisode(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	lines := &logLines{}
	srv := startServer(t, Config{NodeID: "n0", Region: "test", Heartbeat: 200 * time.Millisecond, NodeDeadAfter: time.Minute},
		dbtest.PoolFor(t, proxy.URL(url)), slog.New(slog.NewTextHandler(io.MultiWriter(lines, tLog{t}), nil)))
	dbtest.WaitFor(t, 10*time.Second, "listener connected and beating", func() bool {
		return srv.BusConnected() && !srv.heartbeat.UpSince().IsZero()
	})

	// Counted from the cut: under load a beat or registration may time out on its own (the
	// interval is its deadline), an outage of its own before the cut or after the restore.
	failing, written := len(lines.matching("heartbeat failing")), len(lines.matching("heartbeat written again"))
	listener := len(lines.matching("msg=listener"))
	proxy.Cut()
	// 1.6 s: the listener retries at 50 ms doubling, so four times at least.
	dbtest.WaitFor(t, 10*time.Second, "eight beats failed", func() bool { return srv.heartbeat.FailedBeats() >= 8 })
	require.Len(t, lines.matching("heartbeat failing"), failing+1, "the first failed beat, not one per beat")
	proxy.Restore()
	dbtest.WaitFor(t, 10*time.Second, "back", func() bool { return srv.BusConnected() && srv.heartbeat.FailedBeats() == 0 })

	back := lines.matching("heartbeat written again", "failed_beats=")
	require.Greater(t, len(back), written)
	var beats int
	_, err := fmt.Sscanf(back[written][strings.Index(back[written], "failed_beats="):], "failed_beats=%d", &beats)
	require.NoError(t, err)
	require.GreaterOrEqual(t, beats, 8, "the outage's end, with its failed beats")
	require.LessOrEqual(t, len(lines.matching("msg=listener")), listener+2, "the loss and the first failed attempt")
	back = lines.matching("LISTEN connected", "failed_attempts=")
	require.NotEmpty(t, back)
	var failed int
	_, err = fmt.Sscanf(back[len(back)-1][strings.Index(back[len(back)-1], "failed_attempts="):], "failed_attempts=%d", &failed)
	require.NoError(t, err)
	require.GreaterOrEqual(t, failed, 3, "several attempts failed, one line")
}

// A send that committed but whose answer was lost (the connection cut while the answer was on
// its way) is never acked queued:false: its sender's socket is closed 1013
// send_outcome_unknown, and its retry with the same client_message_id, on its next connection,
// is acked with the first messageId (duplicate) and reaches the recipient once.
func TestSendCommittedButAnswerLostIsRetriedOnce(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	c := &testCluster{t: t, url: url, pool: dbtest.PoolFor(t, url)}
	c.url = proxy.URL(url)
	c.nodes = append(c.nodes, c.startNode("n0", nil))
	c.url = url
	c.nodes = append(c.nodes, c.startNode("n1", nil))
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	b := m.dial(1, bob)
	ctx := ctxT(t)
	send := func(cl *client.Client) (protocol.Ack, error) {
		return cl.SendMessage(ctx, &protocol.Send{TargetSpec: bob.pub, Priority: protocol.PriorityNow, Nonce: "n",
			Ciphertext: "c", ClientMessageID: "cm-1"})
	}

	proxy.SetDelay(300 * time.Millisecond) // the answer takes that long to come back
	done := make(chan error, 1)
	go func() { _, err := send(a); done <- err }()
	dbtest.WaitFor(t, 10*time.Second, "the send committed", func() bool {
		var n int
		_ = c.pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.envelope WHERE client_message_id = 'cm-1'`).Scan(&n)
		return n == 1
	})
	proxy.Cut() // the answer is lost on its way
	err := <-done
	var cerr *client.CloseError
	require.ErrorAs(t, err, &cerr, "never refused: it was stored")
	require.Equal(t, protocol.CloseTryAgainLater, cerr.Code)
	require.Equal(t, "send_outcome_unknown", cerr.Reason)
	first := nextPush(t, b, 10*time.Second)

	proxy.SetDelay(0)
	proxy.Restore()
	var retry protocol.Ack
	var a2 *client.Client
	dbtest.WaitFor(t, 20*time.Second, "the retry acked", func() bool {
		var err error
		if a2 == nil || a2.CloseCode() != 0 {
			if a2, err = m.tryDial(0, alice); err != nil {
				a2 = nil
				return false
			}
		}
		retry, err = send(a2)
		return err == nil
	})
	require.True(t, retry.Queued)
	require.True(t, retry.Duplicate)
	require.Equal(t, first.MessageID, retry.MessageID)
	sentinel, err := a2.Send(ctx, bob.pub, protocol.PriorityNow, "n", "c", "")
	require.NoError(t, err)
	require.Equal(t, sentinel.MessageID, nextPush(t, b, 10*time.Second).MessageID, "the retry was not delivered again")
}

// Acks kept for a retry while Postgres is away are bounded: at most maxQueuedAcks, the oldest,
// whatever the outage's length. Every acking session adds a frame per ackWait past the bound,
// and each failed statement put them all back: the queue grew with the outage (memory), and
// once Postgres was back its one statement could be too large to finish, retried for good.
func TestAcksKeptThroughAnOutageAreBounded(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	r := newRecorder(store.New(dbtest.PoolFor(t, proxy.URL(url)), "t"), dbtest.Logger(t), newMetrics())
	acks := make([]store.Ack, 3*maxQueuedAcks) // three ackWaits of 1,024 sessions flooding
	for i := range acks {
		acks[i] = store.Ack{EnvelopeID: uuid.NewString(), MemberID: "m", SessionID: "s"}
	}
	r.acks.add(acks...)
	ctx := ctxT(t)

	proxy.Cut()
	require.False(t, r.flush(ctx, time.Time{}), "Postgres is away")
	require.Equal(t, maxQueuedAcks, r.acks.len(), "kept for the retry, within the bound")
	require.Equal(t, acks[0].EnvelopeID, r.acks.items[0].EnvelopeID, "the oldest kept, first")
	require.Equal(t, acks[maxQueuedAcks-1].EnvelopeID, r.acks.items[maxQueuedAcks-1].EnvelopeID)

	proxy.Restore()
	require.True(t, r.flush(ctx, time.Time{}), "recorded once Postgres is back")
	require.Zero(t, r.acks.len())
}

// Records are written at most recordChunk of each kind a statement. Those kept through an
// outage, or through a statement that timed out under load, are retried with what came
// meanwhile: in one statement each retry was larger than the last, and could only time out
// again while pushes kept adding records.
func TestRecordsAreWrittenInBoundedStatements(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	proxy := dbtest.NewProxy(t, url)
	r := newRecorder(store.New(dbtest.PoolFor(t, proxy.URL(url)), "t"), dbtest.Logger(t), newMetrics())
	ctx := ctxT(t)
	ack := func() store.Ack { return store.Ack{EnvelopeID: uuid.NewString(), MemberID: "m", SessionID: "s"} }
	r.acks.add(ack())
	require.True(t, r.flush(ctx, time.Time{}), "a connection made and the statement prepared")

	for range 2*recordChunk + 1 {
		r.acks.add(ack())
	}
	var ok bool
	flights := proxy.Count(func() { ok = r.flush(ctx, time.Time{}) })
	require.True(t, ok)
	require.Equal(t, int64(3), flights.Statement, "three statements, none larger than recordChunk")
	require.Zero(t, r.acks.len())
}
