package broker

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// heldStatement is a send statement the test holds open.
type heldStatement struct {
	batch   []sendReq
	release chan struct{}
}

// holdingCommitter is a committer whose statements the test starts and ends itself; it fails
// the test if a lane is ever in two statements at once.
func holdingCommitter(t *testing.T, lanes, batch int, splitAfter time.Duration, tweak ...func(*committer)) (*committer, chan heldStatement) {
	c := newCommitter(nil, nil, "n", nil, batch, lanes, dbtest.Logger(t), nil)
	c.splitAfter = splitAfter
	for _, f := range tweak {
		f(c)
	}
	started := make(chan heldStatement)
	quit := make(chan struct{}) // the test is over: statements still held end
	var mu sync.Mutex
	busy := map[uint32]bool{}
	c.run = func(_ context.Context, batch []sendReq, _ *turn) {
		lanes := map[uint32]bool{}
		for _, r := range batch {
			lanes[r.sess.lane%uint32(len(c.lanes))] = true
		}
		mu.Lock()
		for l := range lanes {
			if busy[l] {
				t.Errorf("lane %d in two statements at once: its senders' order is lost", l)
			}
			busy[l] = true
		}
		mu.Unlock()
		s := heldStatement{batch: batch, release: make(chan struct{})}
		select {
		case started <- s:
			select {
			case <-s.release:
			case <-quit:
			}
		case <-quit:
		}
		mu.Lock()
		for l := range lanes {
			busy[l] = false
		}
		mu.Unlock()
	}
	startCommitter(t, c, quit)
	return c, started
}

func nextStatement[S any](t *testing.T, started chan S) S {
	t.Helper()
	select {
	case s := <-started:
		return s
	case <-time.After(5 * time.Second):
		t.Fatal("no statement started")
	}
	panic("unreachable")
}

// texts lists a batch's sends as "<session>:<ciphertext>", in statement order.
func texts(b []sendReq, names map[*session]string) []string {
	var out []string
	for _, r := range b {
		out = append(out, names[r.sess]+":"+r.msg.Ciphertext)
	}
	return out
}

// sendOf returns a function that queues a send with the given text on a session's lane.
func sendOf(c *committer) func(s *session, text string) {
	return func(s *session, text string) {
		c.enqueue(s, &protocol.Send{TargetSpec: "x", Priority: protocol.PriorityNow, Nonce: "n", Ciphertext: text})
	}
}

// numbered lists "<name>:0".."<name>:n-1" after queueing those sends.
func numbered(send func(*session, string), s *session, name string, from, n int) []string {
	var out []string
	for i := from; i < from+n; i++ {
		send(s, fmt.Sprint(i))
		out = append(out, fmt.Sprintf("%s:%d", name, i))
	}
	return out
}

func TestCommitLanesShareStatementsUntilTheyBackUp(t *testing.T) {
	t.Parallel()
	c, started := holdingCommitter(t, 2, maxBatch, time.Hour) // held statements never count as slow here
	s0, s1 := &session{lane: 0}, &session{lane: 1}
	names := map[*session]string{s0: "s0", s1: "s1"}
	send := sendOf(c)

	// Light traffic: what arrives while a statement is in flight, in either lane, waits for it
	// and then goes into one statement, each sender's sends in order.
	send(s0, "a")
	first := nextStatement(t, started)
	require.Equal(t, []string{"s0:a"}, texts(first.batch, names))
	send(s1, "b")
	send(s0, "c")
	send(s1, "d")
	close(first.release)
	shared := nextStatement(t, started)
	require.Equal(t, []string{"s0:c", "s1:b", "s1:d"}, texts(shared.batch, names),
		"both lanes in one statement: nothing started beside the first")

	close(shared.release)

	// A backlog: once splitAt sends wait in a free lane, it gets a statement of its own beside
	// the one in flight.
	send(s1, "e")
	lane1 := nextStatement(t, started)
	require.Equal(t, []string{"s1:e"}, texts(lane1.batch, names))
	var want []string
	for i := range splitAt {
		send(s0, fmt.Sprint(i))
		want = append(want, fmt.Sprintf("s0:%d", i))
	}
	beside := nextStatement(t, started)
	require.Equal(t, want, texts(beside.batch, names), "lane 0 alone, while lane 1's statement is held")

	// A lane in flight never gets a second one: its backlog waits for its statement's end.
	want = want[:0]
	for i := range splitAt + 1 {
		send(s1, fmt.Sprint(i))
		want = append(want, fmt.Sprintf("s1:%d", i))
	}
	close(lane1.release)
	require.Equal(t, want, texts(nextStatement(t, started).batch, names), "lane 1's backlog, beside lane 0's")
	close(beside.release)
}

func TestCommitLaneStartsBesideASlowStatement(t *testing.T) {
	t.Parallel()
	// A statement that runs past splitAfter (a primary a wide-area round trip away): a lane
	// with one send waiting gets its own statement rather than wait for it.
	c, started := holdingCommitter(t, 2, maxBatch, 20*time.Millisecond)
	s0, s1 := &session{lane: 0}, &session{lane: 1}
	names := map[*session]string{s0: "s0", s1: "s1"}
	c.enqueue(s0, &protocol.Send{TargetSpec: "x", Priority: protocol.PriorityNow, Nonce: "n", Ciphertext: "slow"})
	slow := nextStatement(t, started)
	c.enqueue(s1, &protocol.Send{TargetSpec: "x", Priority: protocol.PriorityNow, Nonce: "n", Ciphertext: "waiting"})
	require.Equal(t, []string{"s1:waiting"}, texts(nextStatement(t, started).batch, names))
	close(slow.release)
}

func TestCommitLanesRideAlongUpToTheBatchLimit(t *testing.T) {
	t.Parallel()
	// Three lanes; lane 2's statement is held, so lanes 0 and 1 can only start by backing up.
	c, started := holdingCommitter(t, 3, splitAt+2, time.Hour)
	s0, s1, s2 := &session{lane: 0}, &session{lane: 1}, &session{lane: 2}
	names := map[*session]string{s0: "s0", s1: "s1", s2: "s2"}
	send := sendOf(c)
	send(s2, "held")
	held := nextStatement(t, started)

	// Lane 1's two sends wait; lane 0 backs up to splitAt and starts, lane 1 riding along.
	want := numbered(send, s1, "s1", 0, 2)
	want = append(numbered(send, s0, "s0", 0, splitAt), want...)
	withRider := nextStatement(t, started)
	require.Equal(t, want, texts(withRider.batch, names), "lane 1 rides along: there is room")

	// Lane 1's three sends do not fit beside lane 0's next splitAt (the limit is splitAt+2):
	// lane 0 starts alone, and lane 1 waits until nothing is in flight, then starts at once.
	want = numbered(send, s1, "s1", 2, 3)
	wantS0 := numbered(send, s0, "s0", splitAt, splitAt)
	close(withRider.release)
	alone := nextStatement(t, started)
	require.Equal(t, wantS0, texts(alone.batch, names), "lane 0 alone: no room for lane 1")
	close(held.release)
	close(alone.release)
	require.Equal(t, want, texts(nextStatement(t, started).batch, names), "lane 1 once the statements ended")
}

func TestCommitLaneIsNotStarvedByABackedUpLane(t *testing.T) {
	t.Parallel()
	// A batch limit of splitAt: a backed-up lane 0 fills every statement, leaving no room.
	c, started := holdingCommitter(t, 2, splitAt, time.Hour)
	s0, s1 := &session{lane: 0}, &session{lane: 1}
	names := map[*session]string{s0: "s0", s1: "s1"}
	send := sendOf(c)
	send(s0, "a")
	first := nextStatement(t, started)
	send(s1, "w")
	more := numbered(send, s0, "s0", 0, splitAt+10)
	close(first.release)
	// With nothing in flight, lane 0's next splitAt and lane 1's send both start; lane 1 does
	// not wait behind lane 0's backlog.
	got := map[string][]string{}
	for range 2 {
		st := nextStatement(t, started)
		got[texts(st.batch, names)[0][:2]] = texts(st.batch, names)
	}
	require.Equal(t, []string{"s1:w"}, got["s1"])
	require.Equal(t, more[:splitAt], got["s0"], "a statement takes at most the batch limit")
}

// sized is a send of n bytes of ciphertext: sendBytes(sized(n)) is n + 258.
func sized(text string, n int) *protocol.Send {
	return &protocol.Send{TargetSpec: "x", Priority: protocol.PriorityNow, Nonce: "n",
		Ciphertext: text + strings.Repeat("A", n-len(text))}
}

func TestCommitStatementsStayWithinTheirBytes(t *testing.T) {
	t.Parallel()
	// Large sends: a statement stops taking them at statementBytes (here three sends' worth,
	// reached with the third), whatever maxBatch allows; what it leaves goes next, in order.
	one := sendBytes(sized("", 1000))
	c, started := holdingCommitter(t, 1, maxBatch, time.Hour, func(c *committer) { c.setByteLimits(1<<30, 3*one-1) })
	s0 := &session{}
	c.enqueue(s0, sized("0", 1000))
	first := nextStatement(t, started)
	for i := 1; i < 10; i++ {
		c.enqueue(s0, sized(fmt.Sprint(i), 1000))
	}
	close(first.release)
	require.Equal(t, []string{"1", "2", "3", "4", "5", "6", "7", "8", "9"}, releaseUntil(t, started, 9, 3), "each sender's order")
}

// releaseUntil lets statements end as they start until n sends have gone through, failing if
// one takes more than most, and returns the sends' texts in statement order.
func releaseUntil(t *testing.T, started chan heldStatement, n, most int) []string {
	t.Helper()
	var got []string
	for len(got) < n {
		st := nextStatement(t, started)
		require.LessOrEqual(t, len(st.batch), most, "a statement past its bytes")
		for _, r := range st.batch {
			got = append(got, strings.TrimRight(r.msg.Ciphertext, "A"))
		}
		close(st.release)
	}
	return got
}

func TestCommitQueueHoldsItsBytesAndNoMore(t *testing.T) {
	t.Parallel()
	// The queue's bytes (here three sends' worth) are taken from a send's enqueue until its
	// statement has ended: a fourth waits, blocking its sender's reader, and goes once a
	// statement ends. Nothing is refused.
	one := sendBytes(sized("", 1000))
	c, started := holdingCommitter(t, 1, maxBatch, time.Hour, func(c *committer) { c.setByteLimits(3*one, 1<<30) })
	s0 := &session{}
	c.enqueue(s0, sized("0", 1000))
	first := nextStatement(t, started)
	queued := make(chan int, 10)
	go func() {
		for i := 1; i < 6; i++ {
			c.enqueue(s0, sized(fmt.Sprint(i), 1000))
			queued <- i
		}
	}()
	require.Equal(t, 1, <-queued)
	require.Equal(t, 2, <-queued)
	require.False(t, c.bytes.TryAcquire(1), "the queue's bytes are all taken: the next send waits")
	select {
	case i := <-queued:
		t.Fatalf("send %d queued past the queue's bytes", i)
	default:
	}
	close(first.release)
	require.Equal(t, []string{"1", "2", "3", "4", "5"}, releaseUntil(t, started, 5, 3))
}

func TestCommitLaneLeftOutOfAFullStatementStartsBesideIt(t *testing.T) {
	t.Parallel()
	// Two lanes share a statement that reaches its bytes within lane 0's sends: lane 1, left
	// out of it, is not held up by it (before, it was marked busy until the statement ended,
	// and a lane 0 that kept the statements full kept lane 1 waiting for good).
	one := sendBytes(sized("", 1000))
	c, started := holdingCommitter(t, 2, maxBatch, time.Millisecond, func(c *committer) { c.setByteLimits(1<<30, 2*one-1) })
	s0, s1 := &session{lane: 0}, &session{lane: 1}
	names := map[*session]string{s0: "s0", s1: "s1"}
	c.enqueue(s0, sized("a", 1000))
	first := nextStatement(t, started)
	for i := range 4 {
		c.enqueue(s0, sized(fmt.Sprint(i), 1000))
	}
	c.enqueue(s1, sized("w", 1000))
	close(first.release)
	// Both lanes are free now: either statement may start first (a CI run under load started
	// lane 1's first), and each starts while the other is held.
	full, beside := nextStatement(t, started), nextStatement(t, started)
	if len(full.batch) == 1 {
		full, beside = beside, full
	}
	require.Equal(t, []string{"s0:0", "s0:1"}, trimmed(full.batch, names), "lane 0's first two fill the statement")
	require.Equal(t, []string{"s1:w"}, trimmed(beside.batch, names),
		"lane 1 starts beside the full statement, which is still held")
	close(full.release)
	require.Equal(t, []string{"s0:2", "s0:3"}, trimmed(nextStatement(t, started).batch, names))
}

// trimmed is texts for sized sends: "<session>:<text>".
func trimmed(b []sendReq, names map[*session]string) []string {
	out := texts(b, names)
	for i := range out {
		out[i] = strings.TrimRight(out[i], "A")
	}
	return out
}

func TestSendWaitingForBytesIsAnsweredAtStop(t *testing.T) {
	t.Parallel()
	// A send waiting for the queue's bytes when the committer stops is answered, never left
	// waiting: here the bytes stay taken by a send queued behind a statement in flight, so it
	// gets "unavailable", as one arriving after the stop does.
	one := sendBytes(sized("", 1000))
	c, started := holdingCommitter(t, 1, maxBatch, time.Hour, func(c *committer) { c.setByteLimits(3*one, 1<<30) })
	held, _ := testSession("p0", "m", "a")
	c.enqueue(held, sized("0", 1000))
	first := nextStatement(t, started)
	c.enqueue(held, sized("1", 2*1000+258)) // two sends' bytes, queued behind the statement
	waiting, out := testSession("p1", "m", "b")
	answered := make(chan struct{})
	go func() {
		defer close(answered)
		c.enqueue(waiting, &protocol.Send{ID: "w", TargetSpec: "x", Priority: protocol.PriorityNow, Nonce: "n",
			Ciphertext: strings.Repeat("A", 2*1000+258), ReqID: "r1"})
	}()
	dbtest.WaitFor(t, 5*time.Second, "the third send waiting for bytes", func() bool {
		waiting.mu.Lock()
		defer waiting.mu.Unlock()
		return waiting.queued == 1 // promised its ack, then blocked in Acquire
	})
	// The stop begins while the statement is in flight, and waits for it.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, c.Stop(ctx), context.DeadlineExceeded)
	// A statement the dispatcher still starts (on a machine too busy to have seen the stop in
	// that time) is let through.
	over := make(chan struct{})
	defer close(over)
	go func() {
		for {
			select {
			case st := <-started:
				close(st.release)
			case <-over:
				return
			}
		}
	}()
	close(first.release) // frees the first send's bytes: not enough for the waiting one
	require.NoError(t, c.Stop(context.Background()))
	select {
	case <-answered:
	case <-time.After(5 * time.Second):
		t.Fatal("the send waiting for bytes was not answered after the stop")
	}
	if out.count() == 1 { // else it was taken into a statement before the stop (no ack here)
		ack, err := protocol.DecodeServer(out.frames[0])
		require.NoError(t, err)
		require.Equal(t, &protocol.Ack{ID: "w", Queued: false, Error: ackUnavailable, ReqID: "r1"}, ack)
	}
}

func TestCommitterStopWaitsForStatementsInFlight(t *testing.T) {
	t.Parallel()
	c, started := holdingCommitter(t, 2, maxBatch, time.Hour)
	sendOf(c)(&session{lane: 0}, "a")
	held := nextStatement(t, started)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, c.Stop(ctx), context.DeadlineExceeded, "Stop returned while a statement was in flight")
	close(held.release)
	require.NoError(t, c.Stop(context.Background()))
}

func TestSendOrderKeptWhenLanesCommitAtOnce(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, func(cfg *Config) { cfg.Committers = 2 })
	m := c.mesh(0)
	// Senders spread over both lanes, each pipelining a burst far past splitAt, so the lanes
	// back up and commit side by side; each recipient reads its sender's burst in order.
	const senders, burst = 8, 400
	var wg sync.WaitGroup
	lanes := map[uint32]bool{}
	// A session's lane is a hash of its presence id: senders are added until both lanes have
	// some (eight all in one lane happen once in 128 runs).
	for i := 0; i < senders || len(lanes) < 2; i++ {
		require.Less(t, i, 64, "64 sessions, all in one lane")
		from, to := m.member(fmt.Sprintf("from%d", i)), m.member(fmt.Sprintf("to%d", i))
		a := m.dial(0, from)
		b := m.dial(1, to, noClientAck)
		lanes[c.nodes[0].hub.get(a.HelloAck().PresenceID).lane%2] = true
		wg.Go(func() { sendPipelined(t, a, to.pub, "m", burst, 32) })
		wg.Go(func() { readAll(t, b, "m", burst, 20*time.Second) })
	}
	require.Len(t, lanes, 2, "the senders use both lanes")
	wg.Wait()
}

// A send statement takes a lock per mesh (00072) in Postgres's shared lock table: a batch of
// more meshes than a statement may hold is committed as several statements, each with whole
// meshes, so that no mesh's sends (a sender's, a recipient's) are reordered or split.
func TestBatchOfManyMeshesSplitsByWholeMeshes(t *testing.T) {
	var batch []sendReq
	sessions := map[string]*session{}
	for i := range 600 {
		mesh := fmt.Sprint("m", (i*7)%150) // 150 meshes, interleaved
		if sessions[mesh] == nil {
			sessions[mesh] = &session{meshID: mesh}
		}
		batch = append(batch, sendReq{sess: sessions[mesh], msg: &protocol.Send{ID: fmt.Sprint(i)}})
	}
	parts := splitByMeshes(batch, maxStatementMeshes)
	require.Len(t, parts, 3)
	seen := map[string]int{} // mesh → its part
	last := map[string]int{} // mesh → its last send's place in the batch
	total := 0
	for i, p := range parts {
		meshes := map[string]bool{}
		for _, r := range p {
			meshes[r.sess.meshID] = true
			if j, ok := seen[r.sess.meshID]; ok {
				require.Equal(t, j, i, "mesh %s in two statements", r.sess.meshID)
			}
			seen[r.sess.meshID] = i
			var at int
			fmt.Sscan(r.msg.ID, &at)
			if prev, ok := last[r.sess.meshID]; ok {
				require.Greater(t, at, prev, "mesh %s's sends in their order", r.sess.meshID)
			}
			last[r.sess.meshID] = at
			total++
		}
		require.LessOrEqual(t, len(meshes), maxStatementMeshes)
	}
	require.Equal(t, len(batch), total, "every send in a statement")
	require.Equal(t, 1, len(splitByMeshes(batch[:60], maxStatementMeshes)), "60 meshes: one statement")
}

// A statement frees its lane once it has committed, so the lane's next statement starts while
// the first still waits for Postgres to confirm its flush: a slow flush holds back acks, not
// the sends behind them. The senders are answered in their lane's order all the same: the
// second statement, confirmed first, answers only after the first.
func TestCommitLaneGoesOnOnceItsStatementCommitted(t *testing.T) {
	t.Parallel()
	c := newCommitter(nil, nil, "n", nil, maxBatch, 1, dbtest.Logger(t), nil)
	type stmt struct {
		batch   []sendReq
		flushed chan struct{} // closed by the test: the flush is confirmed
		turn    chan struct{} // closed by the statement when it waits for its turn to answer
	}
	started := make(chan stmt)
	quit := make(chan struct{})
	var mu sync.Mutex
	var answered []string
	c.run = func(_ context.Context, batch []sendReq, tr *turn) {
		s := stmt{batch: batch, flushed: make(chan struct{}), turn: make(chan struct{})}
		tr.free() // committed
		select {
		case started <- s:
		case <-quit:
			return
		}
		select {
		case <-s.flushed:
		case <-quit:
			return
		}
		close(s.turn)
		tr.wait()
		mu.Lock()
		defer mu.Unlock()
		for _, r := range batch {
			answered = append(answered, r.msg.Ciphertext)
		}
	}
	startCommitter(t, c, quit)
	send := sendOf(c)
	s0 := &session{lane: 0}

	send(s0, "a")
	first := nextStatement(t, started)
	send(s0, "b")
	second := nextStatement(t, started) // beside the first, whose flush is not confirmed
	require.Equal(t, "b", second.batch[0].msg.Ciphertext)
	close(second.flushed)
	<-second.turn
	close(first.flushed)
	dbtest.WaitFor(t, 5*time.Second, "both statements answered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(answered) == 2
	})
	require.Equal(t, []string{"a", "b"}, answered, "answered in the lane's order")
}

// startCommitter starts c; when the test ends, quit is closed (statements still held end) and
// c is stopped.
func startCommitter(t *testing.T, c *committer, quit chan struct{}) {
	t.Helper()
	require.NoError(t, c.Start(context.Background()))
	t.Cleanup(func() {
		close(quit)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, c.Stop(ctx))
	})
}
