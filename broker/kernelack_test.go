package broker

import (
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/dbtest"
)

// A client that stopped reading and is cut off (its socket closed at once, then reset by the
// pong it sends on waking) loses what was still in the replica's send queue. A push to a client
// that does not ack is recorded as delivered only once the client's TCP has its bytes, so none
// of those lost is recorded: they go back to pending and come again at its next connection.
// Before, every push the kernel took was recorded, and the ones lost with the queue were gone.
func TestPushesLostInTheSendQueueAreNotRecorded(t *testing.T) {
	cl, sv := tcpPair(t)
	lc := newLingerer(lingerWait).wrap(sv).(*lingerConn)
	var rec recorded
	const size = 16 << 10
	frame := make([]byte, size)
	frame[0] = 0x82
	written := 0
	for {
		_ = lc.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := lc.Write(frame); err != nil {
			var ne net.Error
			require.True(t, errors.As(err, &ne) && ne.Timeout(), "the client's buffers fill up: %v", err)
			break
		}
		written++
		whenWritten(lc, int64(written), rec.add)
	}
	require.NoError(t, lc.Close()) // not lingering: closed at once, the send queue still full
	// The client wakes: its pong meets a closed socket, which resets the connection and drops
	// what it still queued.
	_, _ = cl.Write([]byte("pong"))
	received := 0
	buf := make([]byte, 64<<10)
	_ = cl.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		n, err := cl.Read(buf)
		received += n
		if err != nil {
			break
		}
	}
	got := rec.get()
	t.Logf("%d pushes written (%d bytes), %d recorded, %d bytes received", written, written*size, len(got), received)
	require.Less(t, received, written*size, "the reset dropped what the replica still queued")
	require.NotEmpty(t, got, "what reached the client's kernel is recorded")
	for _, id := range got {
		require.LessOrEqual(t, int(id)*size, received, "push %d recorded as delivered but never received", id)
	}
}

// Pushes to a client that reads are recorded as it takes them, while the socket stays open, and
// a closed socket takes no more: nothing is left watched.
func TestPushesAreRecordedAsTheClientTakesThem(t *testing.T) {
	cl, sv := tcpPair(t)
	l := newLingerer(lingerWait)
	lc := l.wrap(sv).(*lingerConn)
	var rec recorded
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := cl.Read(buf); err != nil {
				return
			}
		}
	}()
	for i := range 100 {
		_, err := lc.Write([]byte("\x81push"))
		require.NoError(t, err)
		whenWritten(lc, int64(i+1), rec.add)
	}
	dbtest.WaitFor(t, 5*time.Second, "every push recorded", func() bool { return len(rec.get()) == 100 })
	for i, id := range rec.get() {
		require.Equal(t, int64(i+1), id, "recorded in order, once")
	}
	dbtest.WaitFor(t, 5*time.Second, "the poller stops with nothing to watch", func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return len(l.acking) == 0 && !l.polling
	})
	require.NoError(t, lc.Close())
	whenWritten(lc, 101, rec.add) // reported after the close: never recorded
	l.mu.Lock()
	require.Empty(t, l.acking)
	l.mu.Unlock()
	require.Len(t, rec.get(), 100)
}

// ackedPair is a lingering session's connection whose client has read a push and whose TCP has
// acknowledged it, the push left for the close to confirm (not the poller, which would record
// it first) and recorded by record.
func ackedPair(t *testing.T, record func(int64)) (cl net.Conn, l *lingerer, lc *lingerConn) {
	cl, sv := tcpPair(t)
	l = newLingerer(lingerWait)
	lc = l.wrap(sv).(*lingerConn)
	lingerOnClose(lc)
	_, err := lc.Write([]byte("\x81push"))
	require.NoError(t, err)
	readsExactly(t, cl, "\x81push")
	dbtest.WaitFor(t, 5*time.Second, "the client's TCP acknowledged the push", func() bool { return unsentBytes(lc.tcp) == 0 })
	lc.ackMu.Lock()
	lc.unacked = []unackedPush{{id: 1, end: lc.sent.Load()}}
	lc.record = record
	lc.ackMu.Unlock()
	t.Cleanup(func() {
		_ = cl.Close() // the lingering socket sees the client's close and ends
		dbtest.WaitFor(t, 5*time.Second, "the linger ended", func() bool { return l.lingerCount() == 0 })
	})
	return cl, l, lc
}

// A session's close records the pushes its client has, before its end releases the rest: the
// last one too, with nothing written after it (a client gone without a close frame). Before,
// the close looked once its FIN was queued, which the kernel counts as unacknowledged until
// the client's delayed ACK: that push went back to pending and came again, a duplicate.
func TestCloseRecordsThePushesTheClientHas(t *testing.T) {
	var rec recorded
	_, _, lc := ackedPair(t, rec.add)
	require.NoError(t, lc.Close())
	require.Equal(t, []int64{1}, rec.get(), "recorded by the close")
}

// A session closed from another goroutine than its reader's (its write pump after a close
// frame: a drain's 1012, a kick; a slow consumer's 4008) ends once its reader sees the socket
// closed, and the end releases every push not recorded by then. A reader that reads while the
// close is under way must not see it before the close has recorded what the client's TCP
// acknowledged: else those pushes, which arrived, come again at the next connection. Here the
// close's record is held up, and the reader must still be waiting when it is let go.
func TestReaderSeesTheCloseOnlyOnceItsAcksAreRecorded(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	var readerDone atomic.Bool
	var recordedBeforeReader bool
	_, _, lc := ackedPair(t, func(int64) {
		close(entered)
		<-release
		recordedBeforeReader = !readerDone.Load()
	})
	closed := make(chan error, 1)
	go func() { closed <- lc.Close() }()
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the close never recorded the acknowledged push")
	}
	// The WebSocket's reader, between two frames, reads again now.
	readErr := make(chan error, 1)
	go func() {
		_, err := lc.Read(make([]byte, 16))
		readerDone.Store(true)
		readErr <- err
	}()
	// Before the fix the reader returned at once here, while the record was held up; now it
	// waits for it. Nothing to wait for but a violation: a bounded look.
	select {
	case err := <-readErr:
		readErr <- err
	case <-time.After(250 * time.Millisecond):
	}
	close(release)
	select {
	case err := <-readErr:
		require.ErrorIs(t, err, net.ErrClosed)
	case <-time.After(5 * time.Second):
		t.Fatal("the reader never saw the close")
	}
	require.NoError(t, <-closed)
	require.True(t, recordedBeforeReader, "the reader saw the close before the close recorded the push its client had")
}

// A session whose client stopped reading for a while had a push waiting for each frame in the
// replica's send queue (thousands); once its client has them all, it keeps no memory for them,
// idle as long as it lives.
func TestDeliveredBacklogLeavesNoMemoryBehind(t *testing.T) {
	cl, sv := tcpPair(t)
	l := newLingerer(lingerWait)
	lc := l.wrap(sv).(*lingerConn)
	var rec recorded
	frame := make([]byte, 128)
	frame[0] = 0x82
	written := 0
	for {
		_ = lc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := lc.Write(frame); err != nil {
			break
		}
		written++
		whenWritten(lc, int64(written), rec.add)
	}
	lc.ackMu.Lock()
	waiting := len(lc.unacked)
	lc.ackMu.Unlock()
	t.Logf("%d pushes written, %d waiting for the client's TCP", written, waiting)
	require.Greater(t, waiting, 1000, "the send queue holds thousands")
	go func() { _, _ = io.Copy(io.Discard, cl) }()
	dbtest.WaitFor(t, 10*time.Second, "every push recorded", func() bool { return len(rec.get()) == written })
	lc.ackMu.Lock()
	defer lc.ackMu.Unlock()
	require.LessOrEqual(t, cap(lc.unacked), 64, "the backlog's memory is let go")
}
