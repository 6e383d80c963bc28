package broker

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// Group commit: sends that arrive while a commit is in flight go into the next statement, up
// to MaxBatch of them, so throughput is not capped at one notifying commit per message. The
// statement does the routing work in Postgres, so one statement keeps one Postgres backend
// busy. A replica has Committers lanes, each sender's sends always in the same lane, and at
// most one statement in flight per lane, so a sender's sends commit in order.
//
// The lanes share statements while traffic is light: with nothing in flight, what waits goes
// into one statement (up to maxBatch), and sends that arrive meanwhile wait for it. A send
// batch has a fixed cost that dominates small ones, so two small statements at once cost
// Postgres more than one: at 3,000 msgs/s on 2 cores, lanes that always ran side by side
// doubled send→push p50 (BENCHMARKS.md). A lane gets a statement of its own beside one in
// flight once splitAt of its sends wait, where the fixed cost is amortized and a second backend
// raises the ceiling (Go benchmark, 2 cores: 14.6-15.5k envelopes/s with one lane, 16.2-17.2k
// with two), or once its sends have waited splitAfter, so a send in an idle lane of a replica
// far from the primary does not wait most of a round trip for another lane's statement. A
// shared statement whose outcome is unknown closes the senders of every lane it carried.
const (
	maxBatch = 512
	// splitAt is how many sends must wait in a lane for it to get a statement of its own
	// beside one in flight.
	splitAt = 64
	// splitAfter is how long a lane's sends wait for a statement in flight before the lane
	// gets its own: a few local statements' time, a small part of a wide-area round trip.
	splitAfter = 5 * time.Millisecond
	// commitQueue bounds the sends waiting for the committer; a full queue blocks the
	// sender's socket reader (back-pressure) instead of growing.
	commitQueue = 4096
	// queueBytes bounds the envelope bytes of the sends waiting for or in a statement, the same
	// way: 4096 sends of the default 64 KiB frame would be 256 MiB, held again while a
	// statement is encoded and in Postgres's memory while it runs; a client with a few
	// members could make a small replica run out of memory.
	queueBytes = 32 << 20
	// statementBytes bounds one statement's envelope bytes (it takes at least one send): a
	// statement's time and memory in Postgres, and the senders closed if its outcome is unknown,
	// grow with it. Small sends reach maxBatch first.
	statementBytes = 4 << 20
	// DefaultMessageTTL is how long an envelope waits for its recipients; it is kept a day more,
	// delivered or not, for message_status.
	DefaultMessageTTL = 7 * 24 * time.Hour
	// sendTimeout bounds a send batch's statement. Past it Postgres is asked to cancel the
	// statement (a rolled-back batch is refused "unavailable"); only when it does not answer
	// that either is the outcome unknown.
	sendTimeout = 10 * time.Second
	// ackUnavailable is the ack error when the envelope could not be stored (Postgres away).
	ackUnavailable = protocol.CodeUnavailable
)

// committer stores sends in batches and acknowledges them once committed.
type committer struct {
	service
	store    *store.Store
	planner  *planner
	nodeID   string
	pusher   *pusher
	maxBatch int
	splitAt  int
	// bytes holds the envelope bytes of the queued sends (queueBytes); statementBytes bounds a
	// statement's (tests set both smaller).
	bytes          *semaphore.Weighted
	queueBytes     int64
	statementBytes int64
	// unblock ends enqueue's wait for bytes once the committer has stopped.
	unblock    context.Context
	cancelWait context.CancelFunc
	// splitAfter: see the constant (tests hold statements for longer).
	splitAfter time.Duration
	// deadline: sendTimeout (tests shorten it).
	deadline time.Duration
	log      *slog.Logger
	metrics  *Metrics
	lanes    []chan sendReq
	// wake tells the dispatcher that a send was queued.
	wake chan struct{}
	// run commits one batch in its turn (commit; tests count and hold the statements).
	run func(ctx context.Context, batch []sendReq, t *turn)
	// sessions lists this replica's sessions (abandon: a batch that may have committed).
	sessions func() []*session
	// stopped is closed when the committer's loops have ended: sends then get "unavailable".
	stopped chan struct{}
}

func newCommitter(st *store.Store, pl *planner, nodeID string, p *pusher, maxBatch, lanes int, log *slog.Logger, m *Metrics) *committer {
	c := &committer{store: st, planner: pl, nodeID: nodeID, pusher: p, maxBatch: maxBatch, splitAt: min(splitAt, maxBatch),
		splitAfter: splitAfter, deadline: sendTimeout, log: log, metrics: m, wake: make(chan struct{}, 1), stopped: make(chan struct{})}
	c.setByteLimits(queueBytes, statementBytes)
	c.unblock, c.cancelWait = context.WithCancel(context.Background())
	c.run = c.commitByMeshes
	for range max(lanes, 1) {
		c.lanes = append(c.lanes, make(chan sendReq, commitQueue/max(lanes, 1)))
	}
	return c
}

// setByteLimits sets the queue's and a statement's byte bounds (before Start).
func (c *committer) setByteLimits(queue, statement int64) {
	c.bytes, c.queueBytes, c.statementBytes = semaphore.NewWeighted(queue), queue, statement
}

// sendBytes is what a send counts against the byte bounds: its envelope, as checkSend measures
// it, plus what a sendReq and its decoded frame hold besides.
func sendBytes(m *protocol.Send) int64 {
	return int64(len(m.Nonce)+len(m.Ciphertext)+len(m.TargetSpec)) + 256
}

// enqueue hands a send to its sender's lane. It blocks while the lane is full or the queue's
// bytes are taken: back-pressure on the sender's socket rather than unbounded memory.
func (c *committer) enqueue(sess *session, m *protocol.Send) {
	if !sess.promise() { // the ack's slot in the reply window
		// Its socket is closing for a drain: refused, never stored; the client sends it again
		// on its next connection.
		if b, err := protocol.Encode(&protocol.Ack{ID: m.ID, Queued: false, Error: ackUnavailable, ReqID: m.ReqID}); err == nil {
			sess.send(b, false)
		}
		return
	}
	r := sendReq{sess: sess, msg: m, size: min(sendBytes(m), c.queueBytes)}
	if c.bytes.Acquire(c.unblock, r.size) != nil { // stopped
		ackTo(c.log, sess, &protocol.Ack{ID: m.ID, Queued: false, Error: ackUnavailable, ReqID: m.ReqID})
		return
	}
	select {
	case c.lanes[sess.lane%uint32(len(c.lanes))] <- r:
		select {
		case c.wake <- struct{}{}:
		default:
		}
	case <-c.stopped:
		c.bytes.Release(r.size)
		ackTo(c.log, sess, &protocol.Ack{ID: m.ID, Queued: false, Error: ackUnavailable, ReqID: m.ReqID})
	}
}

// Start commits batches until Stop, then waits for the statements in flight.
func (c *committer) Start(ctx context.Context) error {
	return c.start(ctx, func(ctx context.Context) {
		defer c.cancelWait()
		defer close(c.stopped)
		c.dispatch(ctx)
	})
}

// part is what one statement takes from one lane: the first n sends waiting in it.
type part struct{ lane, n int }

// dispatch starts statements as the lanes allow and learns when they end.
func (c *committer) dispatch(ctx context.Context) {
	busy := make([]bool, len(c.lanes))
	// since is when the dispatcher first saw sends waiting in a lane without a statement in
	// flight (zero: none).
	since := make([]time.Time, len(c.lanes))
	inFlight := 0
	done := make(chan []part, len(c.lanes))
	// last is each lane's latest statement's turn.done; answering counts the statements whose
	// senders are not yet answered (a statement frees its lanes before that).
	last := make([]chan struct{}, len(c.lanes))
	var answering sync.WaitGroup
	defer answering.Wait()
	overdue := time.NewTimer(time.Hour)
	defer overdue.Stop()
	for {
		now := time.Now()
		for l, in := range c.lanes {
			if !busy[l] && len(in) > 0 && since[l].IsZero() {
				since[l] = now
			}
		}
		for _, planned := range c.next(busy, since, inFlight > 0, now) {
			// Only the lanes it took from are in the statement: one that take left whole (the
			// statement's bytes were reached first) may start its own beside it.
			batch, st := c.take(planned)
			for _, p := range st {
				busy[p.lane], since[p.lane] = true, time.Time{}
			}
			inFlight++
			answering.Add(1)
			t := &turn{done: make(chan struct{})}
			for _, p := range st {
				if prev := last[p.lane]; prev != nil {
					t.after = append(t.after, prev)
				}
				last[p.lane] = t.done
			}
			var free sync.Once
			t.free = func() { free.Do(func() { done <- st }) }
			go func() {
				defer answering.Done()
				c.run(context.WithoutCancel(ctx), batch, t)
				t.free()
				close(t.done)
				// Acked (or answered otherwise): their bytes are free for the sends waiting.
				var size int64
				for _, r := range batch {
					size += r.size
				}
				c.bytes.Release(size)
			}()
		}
		var wait <-chan time.Time
		if first := c.oldestWaiting(busy, since); inFlight > 0 && !first.IsZero() {
			overdue.Reset(time.Until(first.Add(c.splitAfter)))
			wait = overdue.C
		}
		select {
		case <-ctx.Done():
			for ; inFlight > 0; inFlight-- {
				<-done
			}
			return
		case st := <-done:
			inFlight--
			for _, p := range st {
				busy[p.lane] = false
			}
		case <-c.wake:
		case <-wait:
		}
	}
}

// oldestWaiting is the earliest since of the lanes without a statement in flight (zero: none).
func (c *committer) oldestWaiting(busy []bool, since []time.Time) time.Time {
	var first time.Time
	for l := range c.lanes {
		if !busy[l] && !since[l].IsZero() && (first.IsZero() || since[l].Before(first)) {
			first = since[l]
		}
	}
	return first
}

// next picks the statements to start now. A lane with splitAt sends waiting gets its own, and
// lanes with fewer ride along while there is room. The other lanes with sends waiting share one
// statement when nothing is in flight, or once they have waited splitAfter; else they wait for
// a statement to end. Each statement takes at most maxBatch sends.
func (c *committer) next(busy []bool, since []time.Time, inFlight bool, now time.Time) [][]part {
	var stmts [][]part
	var room []int
	var small []int
	for l, in := range c.lanes {
		switch n := len(in); {
		case busy[l] || n == 0:
		case n >= c.splitAt:
			k := min(n, c.maxBatch)
			stmts = append(stmts, []part{{l, k}})
			room = append(room, c.maxBatch-k)
		default:
			small = append(small, l)
		}
	}
	var shared []part
	left := c.maxBatch
	for _, l := range small {
		n := len(c.lanes[l])
		rode := false
		for i := range stmts {
			if n <= room[i] {
				stmts[i] = append(stmts[i], part{l, n})
				room[i] -= n
				rode = true
				break
			}
		}
		if rode || left == 0 || (inFlight && now.Sub(since[l]) < c.splitAfter) {
			continue
		}
		k := min(n, left)
		shared = append(shared, part{l, k})
		left -= k
	}
	if len(shared) > 0 {
		stmts = append(stmts, shared)
	}
	return stmts
}

// take receives the sends a statement's parts name until it holds statementBytes (at least one
// send), and returns them with the parts it took them from. What it leaves stays at the head of
// its lane for the lane's next statement, after this one, so each sender's order holds. Only the
// dispatcher receives, so what len reported is there.
func (c *committer) take(st []part) ([]sendReq, []part) {
	n := 0
	for _, p := range st {
		n += p.n
	}
	batch := make([]sendReq, 0, n)
	took := make([]part, 0, len(st))
	var size int64
	for _, p := range st {
		k := 0
		for ; k < p.n && (len(batch) == 0 || size < c.statementBytes); k++ {
			r := <-c.lanes[p.lane]
			batch = append(batch, r)
			size += r.size
		}
		if k == 0 {
			break // the statement is full: so is it for the parts after this one
		}
		took = append(took, part{p.lane, k})
	}
	return batch, took
}

// maxStatementMeshes bounds the meshes of one send statement. It takes a shared lock per mesh
// (migration 00072), and Postgres's lock table is shared by every connection and sized for
// about 64 locks each: unbounded, statements of 512 meshes from a few replicas at once would
// fill it, and every statement needing a lock would fail.
const maxStatementMeshes = 64

// commitByMeshes commits a batch of more than maxStatementMeshes meshes as several statements,
// one after another (splitByMeshes), each answered before the next starts.
func (c *committer) commitByMeshes(ctx context.Context, batch []sendReq, t *turn) {
	parts := splitByMeshes(batch, maxStatementMeshes)
	if len(parts) == 1 {
		c.commit(ctx, batch, t)
		return
	}
	t.wait()
	for _, p := range parts {
		c.commit(ctx, p, nil)
	}
}

// turn is a statement's place among its lanes' statements. Its lanes may start their next
// statement once it has committed (free), before Postgres has confirmed its flush, so a slow
// flush delays acknowledgements, not the sends behind them (PUSH_BEFORE_FLUSH; commit frees
// only once the statements before it are answered, so a lane has at most two statements
// holding connections). Its senders are answered (acks, this replica's pushes) in their
// lanes' order all the same: after each lane's previous statement (after), then done. A later
// statement commits after this one, so its flush confirms this one's too.
type turn struct {
	free  func()          // the lanes may start their next statement (idempotent)
	after []chan struct{} // the previous statement of each of its lanes: answered first
	done  chan struct{}   // closed once this statement's senders are answered
}

// wait returns once the statements before t in its lanes have answered their senders; nil
// (a statement run on its own) waits for nothing.
func (t *turn) wait() {
	if t == nil {
		return
	}
	for _, prev := range t.after {
		<-prev
	}
}

// splitByMeshes splits a batch into parts of at most max meshes each, every mesh's sends in one
// part and in their order. A sender's messages and a recipient's are all of one mesh, so their
// order holds across the parts.
func splitByMeshes(batch []sendReq, max int) [][]sendReq {
	part := map[string]int{}
	for _, r := range batch {
		if _, ok := part[r.sess.meshID]; !ok {
			part[r.sess.meshID] = len(part) / max
		}
	}
	if len(part) <= max {
		return [][]sendReq{batch}
	}
	parts := make([][]sendReq, (len(part)+max-1)/max)
	for _, r := range batch {
		i := part[r.sess.meshID]
		parts[i] = append(parts[i], r)
	}
	return parts
}

// commit stores and acknowledges one batch, then pushes what it assigned to this node's
// sessions (the other replicas were told by the statement, from its commit or right after).
//
// t (nil: a statement run on its own) lets the lanes go on once the statement has committed,
// and answers the senders in turn (see turn).
func (c *committer) commit(ctx context.Context, batch []sendReq, t *turn) {
	start := time.Now()
	base := ctx // each statement of a refused batch's bisection has a deadline of its own
	ctx, cancel := context.WithTimeout(ctx, c.deadline)
	defer cancel()
	plan := c.planner.plan(batch)
	local, flushed, err := c.persist(ctx, batch, plan)
	if err == nil && t != nil {
		// Committed: the lanes go on once the statements before this one are answered, so at
		// most two statements of a lane hold a connection while their flush is confirmed. A
		// failure keeps the lanes until its senders are answered: isolating a refused send
		// commits the rest of the batch again, before their senders' later sends.
		t.wait()
		t.free()
	}
	if err == nil {
		err = flushed()
	}
	t.wait()
	if err != nil {
		if store.OutcomeUnknown(err) { // first: a flush not confirmed may carry any error
			c.abandon(batch, plan, err)
			return
		}
		if store.RejectedInput(err) {
			c.isolateRejected(base, batch, err)
			return
		}
		c.metrics.warnRepeated(c.log, "send batch failed; refusing its sends", "size", len(batch), "err", err)
		c.metrics.SendFailures.Add(float64(len(batch)))
		for _, r := range batch {
			ackTo(c.log, r.sess, &protocol.Ack{ID: r.msg.ID, Queued: false, Error: ackUnavailable, ReqID: r.msg.ReqID})
		}
		return
	}
	c.metrics.BatchSize.Observe(float64(len(batch)))
	if c.log.Enabled(ctx, slog.LevelDebug) { // per message: only when asked for
		for _, e := range plan.envelopes {
			c.log.Debug("message stored", "mesh", e.MeshID, "message_id", e.ID, "sender", e.SenderPubkey,
				"target", e.TargetSpec, "priority", e.Priority, "size", len(e.Ciphertext))
		}
	}
	c.metrics.CommitSeconds.Observe(time.Since(start).Seconds())
	for i, r := range batch {
		if plan.acks[i].Queued {
			c.metrics.MessagesRouted.WithLabelValues(string(r.msg.Priority)).Inc()
		}
		ackTo(c.log, r.sess, plan.acks[i])
	}
	var push []assigned
	for _, d := range local {
		if !d.Assigned { // too large to assign: the session claims it
			if sess := c.pusher.local(d.PresenceID); sess != nil {
				c.pusher.request(sess)
			}
			continue
		}
		push = append(push, assigned{presenceID: d.PresenceID, id: d.ID,
			priority: protocol.Priority(plan.envelopes[d.Envelope].Priority), frame: plan.frame(d.Envelope)})
	}
	c.pusher.pushAssigned(push)
}

// persist stores the batch in one statement (recipients resolved, envelopes and deliveries
// written, the other replicas told, the audit appended) and returns the deliveries this node
// takes part in.
//
// It returns once the statement has committed; flushed (within ctx) waits for Postgres to
// confirm the commit is on disk, and its error leaves the outcome unknown.
func (c *committer) persist(ctx context.Context, batch []sendReq, plan *batchPlan) ([]store.LocalDelivery, func() error, error) {
	if len(plan.envelopes) == 0 {
		return nil, noFlush, nil
	}
	sent, local, flushed, err := c.store.SendBatchCommitted(ctx, c.nodeID, plan.envelopes)
	// A retry raced its first attempt, committed meanwhile by another replica: run again, the
	// statement now finds that envelope and folds the retry into it (a few races at most).
	for try := 0; try < 3 && store.ClientMessageRace(err); try++ {
		sent, local, flushed, err = c.store.SendBatchCommitted(ctx, c.nodeID, plan.envelopes)
	}
	if err != nil {
		return nil, nil, err
	}
	plan.settle(batch, sent)
	skipped := 0
	for _, s := range sent {
		skipped += s.Skipped
	}
	if skipped > 0 {
		c.metrics.BacklogSkips.Add(float64(skipped))
	}
	return local, flushed, nil
}

func noFlush() error { return nil }

// abandon answers a batch whose commit may or may not have happened: an "unavailable" ack
// would be a lie if it did (the messages arrive), an ack a lie if it did not. Sends the
// planner already refused get their acks; the senders of the others have their sockets closed,
// which every client reads as "stored or not": a retry with the same client_message_id is
// stored once either way. If it did commit, what it assigned to sessions here is claimed again
// by the catch-up, and until then those sessions' new pushes queue behind it (as after lost
// notifications), so order per recipient holds.
func (c *committer) abandon(batch []sendReq, plan *batchPlan, err error) {
	c.metrics.warnRepeated(c.log, "send batch outcome unknown (Postgres did not answer); closing its senders' sockets so they retry",
		"size", len(batch), "err", err)
	unknown := map[*session]bool{}
	for i, r := range batch {
		if plan.acks[i] != nil { // refused before the statement: known
			ackTo(c.log, r.sess, plan.acks[i])
			continue
		}
		c.metrics.SendFailures.Inc()
		r.sess.releasePromise() // its ack will never come; the reader must not wait for it
		unknown[r.sess] = true
	}
	if len(unknown) == 0 {
		return
	}
	for sess := range unknown {
		closeWith(sess.ws, protocol.CloseTryAgainLater, "send_outcome_unknown")
	}
	if c.sessions != nil {
		for _, sess := range c.sessions() {
			sess.takeAllAssigned()
			c.pusher.request(sess)
		}
	}
}

// isolateRejected commits a batch that Postgres refused for its data in halves, so the send at
// fault is found in log2(batch) commits and refused alone; every other sender's sends are
// stored. A batch of one is refused with bad_request.
func (c *committer) isolateRejected(ctx context.Context, batch []sendReq, err error) {
	if len(batch) == 1 {
		r := batch[0]
		c.log.Warn("send refused: Postgres cannot store it", "presence", r.sess.presenceID, "err", err)
		c.metrics.SendFailures.Inc()
		ackTo(c.log, r.sess, &protocol.Ack{ID: r.msg.ID, Queued: false, Error: protocol.CodeBadRequest, ReqID: r.msg.ReqID})
		return
	}
	half := len(batch) / 2
	c.commit(ctx, batch[:half], nil)
	c.commit(ctx, batch[half:], nil)
}

// ackTo writes the ack of a send, whose slot in the sender's reply window was promised.
func ackTo(log *slog.Logger, sess *session, a *protocol.Ack) {
	b, err := protocol.Encode(a)
	if err != nil {
		log.Error("encode ack", "err", err)
		sess.releasePromise()
		return
	}
	sess.send(b, true)
}

// pushFrame encodes an envelope's push: the same bytes for every recipient.
func pushFrame(p *store.Push) []byte {
	// protocol.Encode skips encoding/json's re-validation of the hand-written encoder's output.
	b, _ := protocol.Encode(&protocol.Push{
		MessageID: p.EnvelopeID, MeshID: p.MeshID, SenderPubkey: p.SenderPubkey, SenderMemberPubkey: p.SenderMemberPubkey,
		Priority: protocol.Priority(p.Priority), Nonce: p.Nonce, Ciphertext: p.Ciphertext,
		CreatedAt: protocol.FormatTime(p.CreatedAt), SenderName: p.SenderName, SenderMemberID: p.SenderMemberID,
		ClientMessageID: p.ClientMessageID, RequestFingerprint: p.RequestFingerprint,
	})
	return b
}
