package broker

import (
	"context"
	"fmt"
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

// holdingCommitter is a committer with two lanes whose statements the test starts and ends
// itself; it fails the test if a lane is ever in two statements at once.
func holdingCommitter(t *testing.T, splitAfter time.Duration) (*committer, chan heldStatement) {
	c := newCommitter(nil, nil, "n", nil, maxBatch, 2, dbtest.Logger(t), nil)
	c.splitAfter = splitAfter
	started := make(chan heldStatement)
	quit := make(chan struct{}) // the test is over: statements still held end
	var mu sync.Mutex
	busy := map[uint32]bool{}
	c.run = func(_ context.Context, batch []sendReq) {
		lanes := map[uint32]bool{}
		for _, r := range batch {
			lanes[r.sess.lane%2] = true
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
	require.NoError(t, c.Start(context.Background()))
	t.Cleanup(func() {
		close(quit)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, c.Stop(ctx))
	})
	return c, started
}

func nextStatement(t *testing.T, started chan heldStatement) heldStatement {
	t.Helper()
	select {
	case s := <-started:
		return s
	case <-time.After(5 * time.Second):
		t.Fatal("no statement started")
		return heldStatement{}
	}
}

// texts lists a batch's sends as "<session>:<ciphertext>", in statement order.
func texts(b []sendReq, names map[*session]string) []string {
	var out []string
	for _, r := range b {
		out = append(out, names[r.sess]+":"+r.msg.Ciphertext)
	}
	return out
}

func TestCommitLanesShareStatementsUntilTheyBackUp(t *testing.T) {
	t.Parallel()
	c, started := holdingCommitter(t, time.Hour) // held statements never count as slow here
	s0, s1 := &session{lane: 0}, &session{lane: 1}
	names := map[*session]string{s0: "s0", s1: "s1"}
	send := func(s *session, text string) {
		c.enqueue(s, &protocol.Send{TargetSpec: "x", Priority: protocol.PriorityNow, Nonce: "n", Ciphertext: text})
	}

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
	c, started := holdingCommitter(t, 20*time.Millisecond)
	s0, s1 := &session{lane: 0}, &session{lane: 1}
	names := map[*session]string{s0: "s0", s1: "s1"}
	c.enqueue(s0, &protocol.Send{TargetSpec: "x", Priority: protocol.PriorityNow, Nonce: "n", Ciphertext: "slow"})
	slow := nextStatement(t, started)
	c.enqueue(s1, &protocol.Send{TargetSpec: "x", Priority: protocol.PriorityNow, Nonce: "n", Ciphertext: "waiting"})
	require.Equal(t, []string{"s1:waiting"}, texts(nextStatement(t, started).batch, names))
	close(slow.release)
}

func TestSendOrderKeptWhenLanesCommitAtOnce(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, func(cfg *Config) { cfg.Committers = 2 })
	m := c.mesh(0)
	// Senders spread over both lanes, each pipelining a burst far past splitAt, so the lanes
	// back up and commit side by side; each recipient reads its sender's burst in order.
	const senders, burst = 8, 400
	var wg sync.WaitGroup
	for i := range senders {
		from, to := m.member(fmt.Sprintf("from%d", i)), m.member(fmt.Sprintf("to%d", i))
		a := m.dial(0, from)
		b := m.dial(1, to, noClientAck)
		wg.Go(func() { sendPipelined(t, a, to.pub, "m", burst, 32) })
		wg.Go(func() { readAll(t, b, "m", burst, 20*time.Second) })
	}
	wg.Wait()
}
