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
// back while queued says more follow, for at most wait (0: coalesceWait).
func coalescingPair(t *testing.T, queued *atomic.Int64, wait time.Duration) (client net.Conn, lc *lingerConn) {
	cl, sv := tcpPair(t)
	lc = newLingerer(lingerWait).wrap(sv).(*lingerConn)
	lc.wait = wait
	coalesceFor(lc, func() bool { return queued.Load() > 1 })
	return cl, lc
}

// readsExactly reads len(want) bytes from the client's end and checks they are want.
func readsExactly(t *testing.T, cl net.Conn, want string) {
	t.Helper()
	got := make([]byte, len(want))
	_ = cl.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.ReadFull(cl, got)
	require.NoError(t, err)
	require.Equal(t, want, string(got))
}

// holding says whether lc holds bytes back.
func holding(lc *lingerConn) bool {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	return lc.buf != nil
}

// A run of frames with more queued behind each reaches the client in one piece, in order, and
// a push in it counts as written (delivered, for a client that does not ack) only once its
// bytes are on the socket.
func TestFramesQueuedBackToBackGoOutTogether(t *testing.T) {
	var queued atomic.Int64
	cl, lc := coalescingPair(t, &queued, time.Hour)
	var rec recorded
	queued.Store(3)
	for i, frame := range []string{"\x81one;", "\x81two;"} {
		_, err := lc.Write([]byte(frame))
		require.NoError(t, err)
		whenWritten(lc, int64(i+1), rec.add)
		queued.Add(-1)
	}
	require.Empty(t, rec.get(), "held back: not on the socket yet, so not delivered")
	_, err := lc.Write([]byte("\x81three;"))
	require.NoError(t, err)
	whenWritten(lc, 3, rec.add)
	readsExactly(t, cl, "\x81one;\x81two;\x81three;")
	dbtest.WaitFor(t, 5*time.Second, "the run recorded once the client's TCP has it", func() bool { return len(rec.get()) == 3 })
	require.Equal(t, []int64{1, 2, 3}, rec.get())
}

// Frames said to be queued that never come (the session closed meanwhile) do not strand the
// one held back: it goes out within coalesceWait.
func TestAHeldBackFrameGoesOutWhenNothingFollows(t *testing.T) {
	var queued atomic.Int64
	cl, lc := coalescingPair(t, &queued, 0)
	var rec recorded
	queued.Store(5)
	_, err := lc.Write([]byte("\x81alone"))
	require.NoError(t, err)
	whenWritten(lc, 7, rec.add)
	readsExactly(t, cl, "\x81alone")
	dbtest.WaitFor(t, 5*time.Second, "the held-back push recorded once written", func() bool { return len(rec.get()) == 1 })
}

// A held-back push whose write fails is not recorded as written: for a client that does not
// ack it stays claimed, and goes back to pending when the session ends (at least once).
func TestAHeldBackPushLostWithItsConnectionIsNotDelivered(t *testing.T) {
	var queued atomic.Int64
	cl, lc := coalescingPair(t, &queued, 0)
	var rec recorded
	// The peer has reset the connection; the broker has not noticed yet.
	require.NoError(t, cl.(*net.TCPConn).SetLinger(0))
	require.NoError(t, cl.Close())
	queued.Store(2)
	_, err := lc.Write([]byte("\x81lost"))
	require.NoError(t, err, "held back: no write yet")
	whenWritten(lc, 9, rec.add)
	dbtest.WaitFor(t, 5*time.Second, "the held-back bytes' write fails", func() bool {
		_, err := lc.Write([]byte("\x81next"))
		return err != nil
	})
	require.Empty(t, rec.get())
}

// A held-back push whose bytes another writer's flush (the timer's, Close's) lost before the
// pump reported it written is not recorded either; and the failed flush closes the
// connection, so the session ends and gives back what it held.
func TestAPushLostBeforeItIsReportedIsNotDelivered(t *testing.T) {
	var queued atomic.Int64
	cl, lc := coalescingPair(t, &queued, time.Hour)
	var rec recorded
	require.NoError(t, cl.(*net.TCPConn).SetLinger(0))
	require.NoError(t, cl.Close())
	queued.Store(2)
	_, err := lc.Write([]byte("\x81lost"))
	require.NoError(t, err)
	lc.flushLate() // the timer's flush, before the pump reports the frame
	whenWritten(lc, 11, rec.add)
	require.Empty(t, rec.get())
	require.True(t, lc.closing.Load(), "a failed late flush closes the connection")
}

// Control frames (a close, a ping) are never held back, even with frames queued behind them:
// they go out at once, after whatever waited.
func TestControlFramesAreNeverHeldBack(t *testing.T) {
	var queued atomic.Int64
	cl, lc := coalescingPair(t, &queued, time.Hour)
	queued.Store(5)
	_, err := lc.Write([]byte("\x81push;"))
	require.NoError(t, err)
	require.True(t, holding(lc))
	_, err = lc.Write([]byte("\x88close"))
	require.NoError(t, err)
	require.False(t, holding(lc), "the close frame went out, with what waited before it")
	readsExactly(t, cl, "\x81push;\x88close")
}
