package broker

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db/dbtest"
)

// recorded collects the delivery ids a coalescing connection reports as written.
type recorded struct {
	mu  sync.Mutex
	ids []int64
}

func (r *recorded) add(id int64) { r.mu.Lock(); r.ids = append(r.ids, id); r.mu.Unlock() }
func (r *recorded) get() []int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int64(nil), r.ids...)
}

// coalescingPair is a lingerConn on the server end of a loopback connection, holding frames
// back while queued says more follow.
func coalescingPair(t *testing.T, queued *atomic.Int64) (client net.Conn, lc *lingerConn) {
	cl, sv := tcpPair(t)
	lc = newLingerer(lingerWait).wrap(sv).(*lingerConn)
	coalesceFor(lc, func() bool { return queued.Load() > 1 })
	return cl, lc
}

// A run of frames with more queued behind each reaches the client in one piece, in order, and
// a push in it counts as written (delivered, for a client that does not ack) only once its
// bytes are on the socket.
func TestFramesQueuedBackToBackGoOutTogether(t *testing.T) {
	var queued atomic.Int64
	cl, lc := coalescingPair(t, &queued)
	var rec recorded
	queued.Store(3)
	for i, frame := range []string{"one;", "two;"} {
		_, err := lc.Write([]byte(frame))
		require.NoError(t, err)
		whenWritten(lc, int64(i+1), rec.add)
		queued.Add(-1)
	}
	require.Empty(t, rec.get(), "held back: not on the socket yet, so not delivered")
	_, err := lc.Write([]byte("three;"))
	require.NoError(t, err)
	whenWritten(lc, 3, rec.add)
	require.Equal(t, []int64{1, 2, 3}, rec.get())
	got := make([]byte, len("one;two;three;"))
	_ = cl.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.ReadFull(cl, got)
	require.NoError(t, err)
	require.Equal(t, "one;two;three;", string(got))
}

// Frames said to be queued that never come (the session closed meanwhile) do not strand the
// one held back: it goes out within coalesceWait.
func TestAHeldBackFrameGoesOutWhenNothingFollows(t *testing.T) {
	var queued atomic.Int64
	cl, lc := coalescingPair(t, &queued)
	var rec recorded
	queued.Store(5)
	_, err := lc.Write([]byte("alone"))
	require.NoError(t, err)
	whenWritten(lc, 7, rec.add)
	got := make([]byte, len("alone"))
	_ = cl.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.ReadFull(cl, got)
	require.NoError(t, err)
	require.Equal(t, "alone", string(got))
	dbtest.WaitFor(t, 5*time.Second, "the held-back push recorded once written", func() bool { return len(rec.get()) == 1 })
}

// A held-back push whose write fails is not recorded as written: for a client that does not
// ack it stays claimed, and goes back to pending when the session ends (at least once).
func TestAHeldBackPushLostWithItsConnectionIsNotDelivered(t *testing.T) {
	var queued atomic.Int64
	cl, lc := coalescingPair(t, &queued)
	var rec recorded
	// The peer has reset the connection; the broker has not noticed yet.
	require.NoError(t, cl.(*net.TCPConn).SetLinger(0))
	require.NoError(t, cl.Close())
	queued.Store(2)
	_, err := lc.Write([]byte("lost"))
	require.NoError(t, err, "held back: no write yet")
	whenWritten(lc, 9, rec.add)
	dbtest.WaitFor(t, 5*time.Second, "the held-back bytes' write fails", func() bool {
		_, err := lc.Write([]byte("next"))
		return err != nil
	})
	require.Empty(t, rec.get())
}
