package broker

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/claudemesh/broker/broker/store"
)

// recorder records what happened to deliveries in batches off the hot path: client_acks, pushes
// written to sessions that don't ack, and assigned pushes written to sessions that do.
// Acks and writes wait up to ackLinger for others to share their statement (at once when
// ackBatch are queued). A taken push waits recordLinger for its client_ack: the ack's update
// makes the taken one a no-op (the row is no longer assigned), one row version instead of two.
type recorder struct {
	service
	store   *store.Store
	log     *slog.Logger
	metrics *Metrics
	acks    *queue[store.Ack]
	written *queue[int64]
	taken   *queue[takenPush]
	now     func() time.Time
	// recording is held from taking records off the queues until their statement is done, so
	// that settle also waits for a statement in flight.
	recording sync.Mutex
	// drained is closed, and replaced, each time the queued acks are taken (under acks.mu);
	// ackWait is how long a session's read waits for room in a full ack queue; ackWaiters
	// counts the reads waiting.
	drained    chan struct{}
	ackWait    time.Duration
	ackWaiters atomic.Int32
}

// maxQueuedAcks bounds the acks a replica holds before recording them. A client_ack has no
// reply, so the reply window does not slow a client that floods them (up to 1,025 ids a frame,
// the protocol's limit) while Postgres records slower. Past this, the read of each acking
// session waits for the recorder to take the queue, at most ackWait, then queues its frame
// anyway: beyond the bound by at most one frame a session a wait, and nothing acked is dropped.
const maxQueuedAcks = 1 << 16

// takenPush is an assigned push written to a session that acks, the epoch of the socket it
// was written to, and when.
type takenPush struct {
	store.Taken
	at time.Time
}

// recordLinger is how long a taken push's record waits at most for its ack; one that waited
// half as long goes with the next statement.
const recordLinger = 60 * time.Millisecond

// ackLinger is how long an ack or a write waits for others before it is recorded, and ackBatch
// how many make it go at once. Recording each at once cost a statement per push at a steady
// trickle: across 3 replicas at 1,000 msgs/s, 0.68 record statements a message, about a fifth of
// Postgres's statement time (BENCHMARKS.md). The cost is a window this long in which a
// takeover on another replica pushes an acked message again (at-least-once; docs/protocol.md),
// and message_status says delivered this much later; a session's own end still records first.
const (
	ackLinger = 20 * time.Millisecond
	ackBatch  = 256
)

func newRecorder(st *store.Store, log *slog.Logger, m *Metrics) *recorder {
	r := &recorder{store: st, log: log, metrics: m, acks: newQueue[store.Ack](), written: newQueue[int64](),
		taken: newQueue[takenPush](), now: time.Now, drained: make(chan struct{}), ackWait: DefaultStallTimeout}
	r.written.wake = r.acks.wake // acks and writes linger together; taken pushes longer
	return r
}

// acked queues a session's client_ack of message ids, once the queue has room (maxQueuedAcks).
func (r *recorder) acked(sess *session, ids []string) {
	r.awaitAckRoom(sess)
	acks := make([]store.Ack, len(ids))
	for i, id := range ids {
		acks[i] = store.Ack{EnvelopeID: id, MemberID: sess.memberID, SessionPubkey: sess.sessionPubkey, SessionID: sess.sessionID}
	}
	r.acks.add(acks...)
}

// awaitAckRoom waits, at most ackWait, while maxQueuedAcks acks are queued. A closed session
// does not wait (its acks still spare its recipient a duplicate), and the recorder is woken:
// a queue refilled after a failed settle put its acks back would otherwise wait for company.
func (r *recorder) awaitAckRoom(sess *session) {
	var timer *time.Timer
	for {
		if sess.isClosed() {
			return
		}
		r.acks.mu.Lock()
		if len(r.acks.items) < maxQueuedAcks {
			r.acks.mu.Unlock()
			return
		}
		drained := r.drained
		r.acks.mu.Unlock()
		select {
		case r.acks.wake <- struct{}{}:
		default:
		}
		if timer == nil {
			timer = time.NewTimer(r.ackWait)
			defer timer.Stop()
		}
		r.ackWaiters.Add(1)
		select {
		case <-drained:
			r.ackWaiters.Add(-1)
		case <-timer.C:
			r.ackWaiters.Add(-1)
			return
		}
	}
}

// takeAcks takes the queued acks and wakes the reads waiting for room.
func (r *recorder) takeAcks() []store.Ack {
	r.acks.mu.Lock()
	acks := r.acks.items
	r.acks.items = nil
	drained := r.drained
	r.drained = make(chan struct{})
	r.acks.mu.Unlock()
	close(drained)
	return acks
}

// wrote queues a delivery whose push was written to a session that does not ack.
func (r *recorder) wrote(id int64) { r.written.add(id) }

// took queues an assigned delivery written to a session (at its socket's epoch) that acks: it
// waits for the ack now. The time is read under the queue's lock, so the queue stays in time
// order.
func (r *recorder) took(id, epoch int64) {
	r.taken.mu.Lock()
	r.taken.items = append(r.taken.items, takenPush{Taken: store.Taken{ID: id, Epoch: epoch}, at: r.now()})
	r.taken.mu.Unlock()
	select {
	case r.taken.wake <- struct{}{}:
	default:
	}
}

// Start runs the recorder until Stop; the last records are written on the way out.
func (r *recorder) Start(ctx context.Context) error {
	return r.start(ctx, func(ctx context.Context) {
		timer := time.NewTimer(time.Hour)
		timer.Stop()
		armed := false
		lingering := time.NewTimer(time.Hour) // the first queued ack's or write's ackLinger
		lingering.Stop()
		waiting := false
		failures := 0 // consecutive failed statements
		for {
			if ctx.Err() != nil {
				fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
				r.flush(fctx, time.Time{})
				cancel()
				return
			}
			if !armed {
				if first, ok := r.oldestTaken(); ok {
					timer.Reset(time.Until(first.Add(recordLinger)))
					armed = true
				}
			}
			select {
			case <-ctx.Done():
				continue // the final flush above
			case <-r.acks.wake:
				// Until an ack is recorded, a reconnect would get the message again: it waits
				// for company at most ackLinger.
				if r.acks.len()+r.written.len() < ackBatch {
					if !waiting {
						lingering.Reset(ackLinger)
						waiting = true
					}
					continue
				}
			case <-lingering.C:
				waiting = false
			case <-r.taken.wake:
				continue // the oldest taken push sets the timer (armed above)
			case <-timer.C:
				// No ack came for the oldest: it and the others of half its age go now, so
				// that a steady stream of pushes shares statements.
				armed = false
			}
			if ctx.Err() == nil { // else the final flush above
				// Not cancelled by a stop that comes meanwhile: records taken from the queues
				// are written, never dropped with a cancelled statement.
				if r.flush(context.WithoutCancel(ctx), r.now().Add(-recordLinger/2)) {
					failures = 0
					continue
				}
				// Put back: retried after a pause that grows while Postgres stays away.
				failures++
				pause := time.NewTimer(min(time.Duration(failures)*200*time.Millisecond, 3*time.Second))
				select {
				case <-ctx.Done():
				case <-pause.C:
				}
				pause.Stop()
				select {
				case r.acks.wake <- struct{}{}:
				default:
				}
			}
		}
	})
}

// oldestTaken is when the first taken push still queued was written.
func (r *recorder) oldestTaken() (time.Time, bool) {
	r.taken.mu.Lock()
	defer r.taken.mu.Unlock()
	if len(r.taken.items) == 0 {
		return time.Time{}, false
	}
	return r.taken.items[0].at, true
}

// takeTaken returns the taken pushes written at or before cutoff (all of them when cutoff is
// zero) and keeps the younger ones queued, in order.
func (r *recorder) takeTaken(cutoff time.Time) []store.Taken {
	r.taken.mu.Lock()
	defer r.taken.mu.Unlock()
	n := len(r.taken.items)
	if !cutoff.IsZero() {
		n = sort.Search(n, func(i int) bool { return r.taken.items[i].at.After(cutoff) })
	}
	if n == 0 {
		return nil
	}
	ids := make([]store.Taken, n)
	for i, t := range r.taken.items[:n] {
		ids[i] = t.Taken
	}
	r.taken.items = append(r.taken.items[:0:0], r.taken.items[n:]...)
	return ids
}

// flush records what is queued: every ack and write, and the taken pushes written at or
// before cutoff (zero: all). False: the statement failed and its records were put back.
func (r *recorder) flush(ctx context.Context, cutoff time.Time) bool {
	r.recording.Lock()
	defer r.recording.Unlock()
	return r.record(ctx, r.takeAcks(), r.written.take(), r.takeTaken(cutoff))
}

// settle records the acks and writes queued so far, after any statement already recording
// some. The ender settles before it ends sessions: ending one releases its pushes that are not
// recorded as done, and a written push released before its record would be pushed again at the
// next connection (a duplicate for a client that does not ack, or an acked push again). Taken
// pushes keep waiting for their acks: unacked, they are rightly released.
// A settle that fails puts its records back and says so: the ender then ends nothing this round.
// Not cancelled by a stop: records taken from the queues are written or put back, never dropped.
func (r *recorder) settle(ctx context.Context) error {
	r.recording.Lock()
	defer r.recording.Unlock()
	acks, written := r.takeAcks(), r.written.take()
	if len(acks)+len(written) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := r.store.MarkDelivered(ctx, acks, written, nil); err != nil {
		if dropped := r.putBackAcks(acks); dropped > 0 {
			err = fmt.Errorf("%w (%d acks dropped: more than %d waiting)", err, dropped, maxQueuedAcks)
		}
		r.written.putBack(written)
		return fmt.Errorf("record deliveries before ending sessions: %w", err)
	}
	return nil
}

// recordChunk bounds the records of each kind one statement writes. Records kept through an
// outage, or a statement that timed out under load, are retried with what came meanwhile: in
// one statement each retry was larger than the last and could only time out again.
const recordChunk = 16 * ackBatch

func (r *recorder) record(ctx context.Context, acks []store.Ack, written []int64, taken []store.Taken) bool {
	for len(acks)+len(written)+len(taken) > 0 {
		na, nw, nt := min(len(acks), recordChunk), min(len(written), recordChunk), min(len(taken), recordChunk)
		if !r.recordChunk(ctx, acks, written, taken, na, nw, nt) {
			return false
		}
		acks, written, taken = acks[na:], written[nw:], taken[nt:]
	}
	return true
}

// recordChunk records the first na acks, nw writes and nt taken pushes in one statement; when
// Postgres is away it puts them all back, those not yet recorded, and reports false.
func (r *recorder) recordChunk(ctx context.Context, acks []store.Ack, written []int64, taken []store.Taken, na, nw, nt int) bool {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	err := r.store.MarkDelivered(ctx, acks[:na], written[:nw], taken[:nt])
	if err == nil {
		return true
	}
	if store.RejectedInput(err) {
		// Postgres refuses these records: retried they would fail for good. The rows stay
		// assigned or pushed: they go back to pending when the session ends and reach the
		// recipient again: at least once.
		r.metrics.backgroundError(r.log, "record_deliveries", err, "count", na+nw+nt)
		return true
	}
	// Postgres away: kept for the retry (recording them twice is harmless). Dropped, an ack
	// made during an outage was lost and the recipient's next connection got the message again.
	args := []any{"count", len(acks) + len(written) + len(taken), "retry", "with backoff"}
	if dropped := r.putBackAcks(acks); dropped > 0 {
		args = append(args, "acks_dropped", dropped)
	}
	r.metrics.backgroundError(r.log, "record_deliveries", err, args...)
	r.written.putBack(written)
	back := make([]takenPush, len(taken))
	for i, t := range taken { // the oldest: they go first again
		back[i] = takenPush{Taken: t}
	}
	r.taken.putBack(back)
	return false
}

// putBackAcks returns acks whose statement failed to the front of the queue, and keeps at most
// maxQueuedAcks queued, the oldest; it returns how many it dropped. While Postgres stays away
// every acking session adds a frame per ackWait past the bound: kept for a retry each time, they
// grew with the outage's length (memory, and a statement too large to finish once it was back,
// retried for good). A dropped ack's message may be pushed again (at least once).
func (r *recorder) putBackAcks(acks []store.Ack) int {
	r.acks.mu.Lock()
	defer r.acks.mu.Unlock()
	all := append(acks, r.acks.items...)
	dropped := max(len(all)-maxQueuedAcks, 0)
	if dropped > 0 {
		all = slices.Clone(all[:maxQueuedAcks]) // not the dropped ones' backing array
	}
	r.acks.items = all
	return dropped
}
