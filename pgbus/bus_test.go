package pgbus

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

func TestEncodeSplitsAndDecodes(t *testing.T) {
	var msgs []Message
	for i := range 500 {
		msgs = append(msgs, Message{Kind: KindDeliveries, Member: strings.Repeat("m", 30) + string(rune('a'+i%26))})
	}
	payloads := Encode(msgs)
	require.Greater(t, len(payloads), 1, "500 messages do not fit one NOTIFY")
	var back []Message
	for _, p := range payloads {
		require.LessOrEqual(t, len(p), MaxPayload)
		got, err := Decode(p)
		require.NoError(t, err)
		back = append(back, got...)
	}
	require.Equal(t, msgs, back)

	huge := Message{Kind: KindEvent, Data: []byte(`"` + strings.Repeat("x", 9000) + `"`)}
	got, err := Decode(Encode([]Message{huge})[0])
	require.NoError(t, err)
	require.Equal(t, KindResync, got[0].Kind, "an oversized message becomes a resync, never a silent drop")

	_, err = Decode("{bad\n" + Encode([]Message{{Kind: KindStatus}})[0])
	require.Error(t, err)
}

func TestOutboxDeduplicatesPerChannel(t *testing.T) {
	var o Outbox
	o.Add("a", Message{Kind: KindDeliveries, Member: "x"})
	o.Add("a", Message{Kind: KindDeliveries, Member: "x"})
	o.Add("b", Message{Kind: KindDeliveries, Member: "x"})
	require.Equal(t, 2, o.Len())
	require.Len(t, o.Payloads(), 2)
}

func FuzzDecode(f *testing.F) {
	f.Add(Encode([]Message{{Kind: KindDeliveries, Member: "m"}, {Kind: KindEvent, Data: []byte(`{"a":1}`)}})[0])
	f.Add("\n\n{}")
	f.Add(`{"k":"w","p":"p1","i":42,"y":"now","x":{"type":"push","nonce":"n","ciphertext":"c"}}` + "\n" + `{"k":"s","c":3,"x":null}`)
	f.Fuzz(func(t *testing.T, payload string) {
		msgs, _ := Decode(payload)
		for _, m := range msgs {
			require.NotEmpty(t, m.Kind)
		}
		// What the single-pass decoder accepts, encoding/json reads the same way (skipping
		// lines where encoding/json's case-folded key match could pick another member).
		for line := range strings.SplitSeq(payload, "\n") {
			got, err := decodeLine(line)
			if err != nil || foldable(line) {
				continue
			}
			var want Message
			require.NoError(t, json.Unmarshal([]byte(line), &want), "accepted what encoding/json refuses: %q", line)
			require.Equal(t, want, got, "%q", line)
		}
	})
}

// foldable says whether encoding/json might match one of Message's keys to another member of
// line than the exact name does: a member whose name folds to one of them without being it.
func foldable(line string) bool {
	var m map[string]json.RawMessage
	if json.Unmarshal([]byte(line), &m) != nil {
		return true
	}
	for k := range m {
		for _, n := range []string{"k", "h", "m", "p", "n", "y", "c", "i", "x"} {
			if k != n && strings.EqualFold(k, n) {
				return true
			}
		}
	}
	return false
}

// A shared-state change carries the client's value, which may nest protocol.MaxDepth deep,
// inside the line's own objects: it is read, not dropped as too deep.
func TestDecodeReadsAClientsDeepestValueInsideALine(t *testing.T) {
	deep := strings.Repeat("[", protocol.MaxDepth) + strings.Repeat("]", protocol.MaxDepth)
	line := `{"k":"t","h":"mesh","x":{"key":"k","value":{"v":` + deep + `}}}`
	got, err := Decode(line)
	require.NoError(t, err)
	require.Len(t, got, 1)
	require.Equal(t, KindState, got[0].Kind)
	require.JSONEq(t, `{"key":"k","value":{"v":`+deep+`}}`, string(got[0].Data))
}

func startBus(t *testing.T, url, node string) *Bus {
	t.Helper()
	pool := dbtest.PoolFor(t, url)
	cc, err := pgx.ParseConfig(url)
	require.NoError(t, err)
	b, err := New(Config{ConnConfig: cc, Exec: pool, NodeID: node, Logger: dbtest.Logger(t),
		PingInterval: 200 * time.Millisecond, PingTimeout: time.Second, QueueSize: 8})
	require.NoError(t, err)
	require.NoError(t, b.Start(context.Background()))
	t.Cleanup(func() { _ = b.Stop(context.Background()) })
	dbtest.WaitFor(t, 10*time.Second, node+" listening", b.Connected)
	return b
}

func TestDirectedNotifyAndResyncOnReconnect(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	a := startBus(t, url, "a")
	b := startBus(t, url, "b")
	requireResync(t, a) // the first connect asks for a catch-up
	requireResync(t, b)
	pool := dbtest.PoolFor(t, url)
	q := db.New(pool)

	var o Outbox
	o.Add(b.NodeChannel("b"), Message{Kind: KindDeliveries, Member: "m1"})
	_, err := Send(context.Background(), q, &o)
	require.NoError(t, err)
	select {
	case m := <-b.Messages():
		require.Equal(t, "m1", m.Member)
	case <-time.After(5 * time.Second):
		t.Fatal("b got nothing")
	}
	select {
	case m := <-a.Messages():
		t.Fatalf("a got b's message %v", m)
	default:
	}

	// Kill b's LISTEN connection: it reconnects by itself and asks for a resync.
	_, err = pool.Exec(context.Background(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND application_name = $1`, ListenerAppName("b"))
	require.NoError(t, err)
	requireResync(t, b)
	dbtest.WaitFor(t, 10*time.Second, "b listening again", b.Connected)
}

// requireResync waits for the resync a (re)connect puts first among the messages.
func requireResync(t *testing.T, b *Bus) {
	t.Helper()
	select {
	case m := <-b.Messages():
		require.Equal(t, KindResync, m.Kind, "a connect's resync comes before any message")
	case <-time.After(10 * time.Second):
		t.Fatal("no resync after connect")
	}
}

// pgxlisten LISTENs its channels in map order, which is random: whichever comes first, the
// bus is connected (and asks for its resync) only once both are listened.
func TestConnectedOnlyOnceBothChannelsListen(t *testing.T) {
	cc, err := pgx.ParseConfig("postgres://localhost/x")
	require.NoError(t, err)
	b, err := New(Config{ConnConfig: cc, Exec: &pgx.Conn{}, NodeID: "b"}) // never started: no I/O
	require.NoError(t, err)
	h := &handler{b: b, onConnect: func() int { return 0 }}
	ctx := context.Background()
	for _, order := range [][2]string{{b.cluster, b.node}, {b.node, b.cluster}} {
		b.connected.Store(false)
		conn := &pgx.Conn{} // a new connection each time, as after a reconnect
		require.NoError(t, h.HandleBacklog(ctx, order[0], conn))
		require.False(t, b.Connected(), "connected with only %s listened", order[0])
		require.Empty(t, b.queue, "resync before %s is listened", order[1])
		require.NoError(t, h.HandleBacklog(ctx, order[1], conn))
		require.True(t, b.Connected())
		require.Equal(t, KindResync, (<-b.queue).Kind)
	}
}

func TestOverflowBecomesResync(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	b := startBus(t, url, "b")
	requireResync(t, b)
	q := db.New(dbtest.PoolFor(t, url))
	var o Outbox
	for i := range 50 { // the queue holds 8
		o.Add(b.NodeChannel("b"), Message{Kind: KindDeliveries, Member: string(rune('a' + i))})
	}
	_, err := Send(context.Background(), q, &o)
	require.NoError(t, err)
	select {
	case <-b.Resync():
	case <-time.After(5 * time.Second):
		t.Fatal("overflow did not signal a resync")
	}
}

func TestBackoffGrowsAndIsBounded(t *testing.T) {
	require.LessOrEqual(t, backoff(1), 50*time.Millisecond)
	require.GreaterOrEqual(t, backoff(1), 25*time.Millisecond)
	for n := 1; n < 40; n++ {
		require.LessOrEqual(t, backoff(n), maxReconnectDelay)
	}
	require.GreaterOrEqual(t, backoff(30), maxReconnectDelay/2)
}

// After the queue overflowed, what arrives next is queued behind a resync, never ahead of it:
// the consumer catches up (the dropped push among what it claims, in order) before it applies
// a later push to the same session, which would otherwise reach the session first.
func TestNothingOvertakesTheResyncOfAnOverflow(t *testing.T) {
	cc, err := pgx.ParseConfig("postgres://localhost/x")
	require.NoError(t, err)
	b, err := New(Config{ConnConfig: cc, Exec: &pgx.Conn{}, NodeID: "b", QueueSize: 2}) // never started: no I/O
	require.NoError(t, err)
	h := &handler{b: b, onConnect: func() int { return 0 }}
	ctx := context.Background()
	push := func(id int64) {
		t.Helper()
		payload := Encode([]Message{{Kind: KindPushFrame, Presence: "p", ID: id, Key: "now", Data: []byte(`{}`)}})[0]
		require.NoError(t, h.HandleNotification(ctx, &pgconn.Notification{Channel: b.node, Payload: payload}, nil))
	}
	push(1)
	push(2)
	push(3) // the queue holds 2: dropped
	select {
	case <-b.Resync():
	default:
		t.Fatal("an overflow with nothing after it must still ask for a resync")
	}
	require.Equal(t, int64(1), (<-b.queue).ID, "the consumer takes one")
	push(4)
	push(5)
	var got []string
	for len(b.queue) > 0 {
		m := <-b.queue
		got = append(got, fmt.Sprintf("%s%d", m.Kind, m.ID))
	}
	resync := slices.Index(got, string(KindResync)+"0")
	require.NotEqual(t, -1, resync, "a resync is queued after the drop: %v", got)
	for i, g := range got {
		if g == string(KindPushFrame)+"4" || g == string(KindPushFrame)+"5" {
			require.Greater(t, i, resync, "a push after the dropped one comes after the resync: %v", got)
		}
	}
}

// An overflow drops notifications: the log says so, once per episode (until the resync is
// queued), with the queue's size, not only the metric.
func TestOverflowIsLoggedOncePerEpisode(t *testing.T) {
	cc, err := pgx.ParseConfig("postgres://localhost/x")
	require.NoError(t, err)
	var logged bytes.Buffer
	b, err := New(Config{ConnConfig: cc, Exec: &pgx.Conn{}, NodeID: "b", QueueSize: 2, // never started: no I/O
		Logger: slog.New(slog.NewTextHandler(&logged, nil))})
	require.NoError(t, err)
	h := &handler{b: b, onConnect: func() int { return 0 }}
	ctx := context.Background()
	push := func(id int64) {
		t.Helper()
		payload := Encode([]Message{{Kind: KindPushFrame, Presence: "p", ID: id, Key: "now", Data: []byte(`{}`)}})[0]
		require.NoError(t, h.HandleNotification(ctx, &pgconn.Notification{Channel: b.node, Payload: payload}, nil))
	}
	for id := range int64(6) { // the queue holds 2: four dropped, one episode
		push(id)
	}
	require.Equal(t, 1, strings.Count(logged.String(), "bus queue full"), logged.String())
	require.Contains(t, logged.String(), "queue_size=2")
	<-b.queue
	<-b.queue
	push(10) // room again: the resync is queued first, which ends the episode
	require.Equal(t, KindResync, (<-b.queue).Kind)
	push(11)
	push(12)
	push(13) // a new episode
	require.Equal(t, 2, strings.Count(logged.String(), "bus queue full"), logged.String())
}

// TakeGap says from when notifications may have been lost: what had been heard (the database
// clock of the last own ping received) when the connection ended or the queue overflowed.
// A first connect lost nothing; a taken gap is forgotten.
func TestGapStartsAtWhatWasHeard(t *testing.T) {
	t.Parallel()
	url := dbtest.URL(t)
	b := startBus(t, url, "b")
	requireResync(t, b)
	dbtest.WaitFor(t, 5*time.Second, "a ping heard", func() bool { return b.Heard() > 0 })
	_, ok := b.TakeGap()
	require.False(t, ok, "a first connect lost nothing")
	pool := dbtest.PoolFor(t, url)
	dbNow := func() (us int64) {
		require.NoError(t, pool.QueryRow(context.Background(), `SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint`).Scan(&us))
		return us
	}

	heard := b.Heard()
	var pids []int32
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT array_agg(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND application_name = $1`, ListenerAppName("b")).Scan(&pids))
	_, err := pool.Exec(context.Background(), `SELECT pg_terminate_backend(p) FROM unnest($1::int[]) p`, pids)
	require.NoError(t, err)
	// The cut is when the backend is gone: until then it may still pass on a ping sent after
	// the terminate (the bound read before it was racy).
	dbtest.WaitFor(t, 5*time.Second, "the listener's backend gone", func() bool {
		var left int
		_ = pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)`, pids).Scan(&left)
		return left == 0
	})
	cut := dbNow()
	requireResync(t, b)
	from, ok := b.TakeGap()
	require.True(t, ok, "a lost connection is a gap")
	require.GreaterOrEqual(t, from, heard)
	require.LessOrEqual(t, from, cut, "from a ping sent before the connection was cut")
	_, ok = b.TakeGap()
	require.False(t, ok, "taken")

	var o Outbox
	for i := range 50 { // the queue holds 8
		o.Add(b.NodeChannel("b"), Message{Kind: KindDeliveries, Member: fmt.Sprint(i)})
	}
	_, err = Send(context.Background(), db.New(pool), &o)
	require.NoError(t, err)
	select {
	case <-b.Resync():
	case <-time.After(5 * time.Second):
		t.Fatal("overflow did not signal a resync")
	}
	from, ok = b.TakeGap()
	require.True(t, ok, "an overflow is a gap")
	require.Positive(t, from)
	require.LessOrEqual(t, from, dbNow())
}

// The gap of a lost connection is marked only once the next connection is complete, just
// before its resync: a catch-up run while the bus is still away (a poll) must not take it, or
// what is lost after that catch-up would go unnoticed.
func TestGapOfALostConnectionWaitsForTheReconnect(t *testing.T) {
	cc, err := pgx.ParseConfig("postgres://localhost/x")
	require.NoError(t, err)
	b, err := New(Config{ConnConfig: cc, Exec: &pgx.Conn{}, NodeID: "b"}) // never started: no I/O
	require.NoError(t, err)
	h := &handler{b: b, onConnect: func() int { return 0 }}
	ctx := context.Background()
	conn := &pgx.Conn{}
	require.NoError(t, h.HandleBacklog(ctx, b.node, conn))
	require.NoError(t, h.HandleBacklog(ctx, b.cluster, conn))
	require.Equal(t, KindResync, (<-b.queue).Kind)
	b.heard.Store(42)
	require.True(t, b.disconnected())
	b.heard.Store(43) // not heard on this connection: no ping comes while it is away
	_, ok := b.TakeGap()
	require.False(t, ok, "not before the reconnect")
	conn = &pgx.Conn{}
	require.NoError(t, h.HandleBacklog(ctx, b.cluster, conn))
	require.NoError(t, h.HandleBacklog(ctx, b.node, conn))
	from, ok := b.TakeGap()
	require.True(t, ok)
	require.Equal(t, int64(42), from, "from what was heard when it was lost")
}

// A consumer may take the gap of an overflow (its out-of-band resync) while the queue is still
// full and more is dropped: those drops open a gap of their own, or what they carried would
// never be caught up.
func TestDropsAfterATakenGapOpenAnother(t *testing.T) {
	cc, err := pgx.ParseConfig("postgres://localhost/x")
	require.NoError(t, err)
	b, err := New(Config{ConnConfig: cc, Exec: &pgx.Conn{}, NodeID: "b", QueueSize: 2}) // never started: no I/O
	require.NoError(t, err)
	h := &handler{b: b, onConnect: func() int { return 0 }}
	ctx := context.Background()
	push := func(id int64) {
		t.Helper()
		payload := Encode([]Message{{Kind: KindPushFrame, Presence: "p", ID: id, Key: "now", Data: []byte(`{}`)}})[0]
		require.NoError(t, h.HandleNotification(ctx, &pgconn.Notification{Channel: b.node, Payload: payload}, nil))
	}
	b.heard.Store(10)
	push(1)
	push(2)
	push(3) // dropped
	from, ok := b.TakeGap()
	require.True(t, ok)
	require.Equal(t, int64(10), from)
	b.heard.Store(20)
	push(4) // the queue is still full: dropped too
	from, ok = b.TakeGap()
	require.True(t, ok, "a drop after the gap was taken is a gap")
	require.Equal(t, int64(20), from)
}

// A consumer that stays behind (more notifications arrive than it applies) is sent one resync
// per episode of drops, not one per message it takes: the drops go on until it has taken half
// the queue. Before, every message it took made room for a resync, and the next notification
// was dropped again: the queue filled with resyncs, each a full one (every local session's
// status re-read and claimed for, the shared state of their meshes re-read), and the log had a
// "bus queue full" line per message. The replica could never catch up.
func TestAConsumerBehindGetsOneResyncPerEpisode(t *testing.T) {
	cc, err := pgx.ParseConfig("postgres://localhost/x")
	require.NoError(t, err)
	var logged bytes.Buffer
	const size = 8
	b, err := New(Config{ConnConfig: cc, Exec: &pgx.Conn{}, NodeID: "b", QueueSize: size, // never started: no I/O
		Logger: slog.New(slog.NewTextHandler(&logged, nil))})
	require.NoError(t, err)
	h := &handler{b: b, onConnect: func() int { return 0 }}
	ctx := context.Background()
	id := int64(0)
	push := func() {
		t.Helper()
		id++
		payload := Encode([]Message{{Kind: KindPushFrame, Presence: "p", ID: id, Key: "now", Data: []byte(`{}`)}})[0]
		require.NoError(t, h.HandleNotification(ctx, &pgconn.Notification{Channel: b.node, Payload: payload}, nil))
	}
	for range size + 1 {
		push()
	}
	const taken = 200
	resyncs := 0
	for range taken { // two arrive for each one the consumer takes
		if (<-b.queue).Kind == KindResync {
			resyncs++
		}
		push()
		push()
	}
	require.LessOrEqual(t, resyncs, taken/(size/2)+1)
	require.LessOrEqual(t, strings.Count(logged.String(), "bus queue full"), taken/(size/2)+1)
	require.Positive(t, resyncs)
}
