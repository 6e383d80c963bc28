package broker

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/olahol/melody"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

type groupEntry = store.Group

// frameWriter queues a text frame on a socket (a melody session; tests use a fake).
type frameWriter interface{ Write([]byte) error }

// pushWindow bounds the push frames queued on one socket and not yet written. A delivery is
// claimed (or pushed straight after its commit) only into a free slot of the window, so
// deliveries never outrun the socket: what does not fit stays pending in the table and is
// claimed as frames are written. The rest of the socket's queue (socketQueue) is left for
// replies and events.
const pushWindow = socketQueue / 2

// replyWindow bounds the other frames a session has queued or promised (acks of sends in the
// committer, replies, events). While it is full, the session's next request is not read: a
// client that pipelines faster than it reads its acks is slowed down instead of growing its
// spill. It is larger than the socket queue's share for them: the excess waits in the spill.
const replyWindow = 64

// replyBytes bounds the bytes of those frames a session has queued, as replyWindow bounds
// their number: the next request is not read while this much waits. A request is read only
// once the one before it has queued its reply (sends aside, whose acks are small), so a
// session holds at most this plus one reply: without it, 64 pipelined list_peers of a mesh
// whose sessions carry long summaries and cwds held about 2 MB each, 128 MB a session. One
// reply can be nearly 10 MB (every field at its limit); the member's list bytes bound those
// (memberLimits.listBytes).
const replyBytes = 4 << 20

// otherOnWire bounds the frames other than pushes handed to the socket's queue at once; the
// rest of the queue is the push window's, and two slots stay free for a close frame. Frames
// beyond it (a burst of events, say a mesh reconnecting) wait in the session's spill, which is
// allocated only while used, and go out as the socket writes: the queue every session pays for
// stays small, and a burst never overflows it.
const otherOnWire = socketQueue - pushWindow - 2

// maxSpill bounds the spill: a peer that lets this many frames wait is not reading, and is
// closed as a slow consumer (its messages stay pending for the next connection).
const maxSpill = 512

// session is one authenticated WebSocket on this replica. Identity fields are set once at
// hello; the rest is guarded by mu and changed only through the methods below.
type session struct {
	ws  *melody.Session // for closing; nil in unit tests
	out frameWriter     // where frames go: ws in production

	presenceID    string
	meshID        string
	memberID      string
	memberPubkey  string
	sessionPubkey string // "" when the peer has no session key
	sessionID     string
	role          string // control-plane (plain hello) or session (session_hello)
	systemEvents  bool
	// clientAck: the peer acks pushes (capability, today's CLI's acking sockets, or since its
	// first client_ack), so a written push waits for its ack.
	clientAck atomic.Bool
	// limits are the member's request rates on this replica, shared by its sessions (nil: none).
	limits *memberLimits
	epoch  int64  // the presence registration this socket owns
	lane   uint32 // the committer lane its sends go through (their order is kept)

	// pushOrder is held from a push's place in the window to its place in the socket's queue
	// (taken before mu).
	pushOrder   sync.Mutex
	mu          sync.Mutex
	displayName string
	status      protocol.Status
	groups      []groupEntry
	// backlog: pending deliveries may exist for this session, so new ones must queue behind
	// them (through the pusher) instead of being pushed directly: per-recipient order.
	backlog  bool
	requests uint64 // push requests so far; a claim round that saw fewer must run again
	closed   bool
	// The push window: frames queued on the socket (oldest first), slots promised to a
	// commit in flight, and whether the pusher waits for room (since when, for the stall check).
	inflight []inflightPush
	reserved int
	// retake: deliveries assigned here that could not be pushed in order (the window full, a
	// backlog ahead of them): the next claims take them, with what is pending, in id order.
	// takeAll: the claims take all that is assigned here (the replica's notifications were
	// lost, its status for the session was late, or the retake list grew too long). Both hold until a claim round catches up. claimedAssigned: assigned deliveries a
	// claim pushed, whose notification may still come (then it is not pushed twice); the last
	// few, kept only while claims take assigned ones.
	retake          []int64
	takeAll         bool
	claimedAssigned []int64
	// statusLate: a held priority was assigned here while this replica still took the session
	// for busy, so the change to idle, and what it released, is still on its way. Until a claim
	// round catches up, claims take held priorities (the claim reads the database's status,
	// never older than this replica's) and all that is assigned here, so nothing the change
	// released is overtaken.
	statusLate bool
	// heldWake: a wake-up for a held priority was skipped (the session at work, as this
	// replica knew it) and no status notice has made the session idle since. Its row may have
	// escaped the release of the change to idle (the send read the old status, the release
	// ran before the send committed), so that change's notice claims (heldWakeTaken).
	heldWake bool
	// skippedSince: when claims began skipping the session because another transaction held
	// its row (zero while they don't); retryArmed: a claim for it is timed (claimSkipped).
	skippedSince time.Time
	retryArmed   bool
	// notified: the last assigned deliveries pushed from their notifications, a ring allocated
	// at the first. A claim that takes all assigned ones may take one of these again before its
	// record is written; it is not pushed twice.
	notified    []int64
	notifiedAt  int
	parked      bool
	stalledFrom time.Time
	lastWrite   time.Time   // when melody last wrote a frame to the socket (quiet)
	pinging     atomic.Bool // a ping is waiting its turn on a busy socket
	// queued: frames other than pushes queued on the socket or promised (acks to come);
	// roomWait is signalled when a reader blocked on a full reply window may go on.
	queued      int
	queuedBytes int // of those frames that are queued (not the promised ones)
	roomWait    chan struct{}
	// promised: acks the committer owes (sends accepted, not yet answered). sendsStopped: the
	// socket is about to close for a drain, and takes no more sends; acksOwed is closed after
	// that once every ack owed is on the socket's queue (none owed, none in the spill).
	promised     int
	sendsStopped bool
	acksOwed     chan struct{}
	// pushesWritten and idsAcked bound what the socket's client_acks cost Postgres: a client
	// acks what it was pushed (see ackAllowance).
	pushesWritten int
	idsAcked      int
	// otherWire: frames other than pushes in the socket's queue; spill: those waiting for room
	// (see otherOnWire); overflow closes the socket when the spill is full (nil in unit tests).
	otherWire int
	spill     [][]byte
	overflow  func()
}

// inflightPush is a push frame queued on the socket. frame identifies the queued bytes: melody
// reports each written frame with the same slice, in queue order.
type inflightPush struct {
	frame    *byte
	id       int64 // delivery id
	assigned bool  // assigned by a commit (not claimed): taking it must be recorded
}

// routingKey is the pubkey others see and target: the session key if any, else the member key.
func (s *session) routingKey() string {
	if s.sessionPubkey != "" {
		return s.sessionPubkey
	}
	return s.memberPubkey
}

// groupsCopy returns the session's groups, for a change that is stored before it is applied.
func (s *session) groupsCopy() []groupEntry {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]groupEntry(nil), s.groups...)
}

func (s *session) setGroups(groups []groupEntry) {
	s.mu.Lock()
	s.groups = groups
	s.mu.Unlock()
}

func (s *session) setStatus(st protocol.Status) {
	s.mu.Lock()
	s.status = st
	s.mu.Unlock()
}

// mayTake says whether a wake-up for deliveries of priority p ("" when it does not say) is
// worth a claim for the session now, by this replica's copy of its status: a session at work or
// dnd takes only "now" messages, and a claim for it would find nothing.
func (s *session) mayTake(p protocol.Priority) bool {
	if p == "" || p == protocol.PriorityNow {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status == protocol.StatusIdle
}

// heldWakeSkipped records that a wake-up for a held priority was not claimed for (heldWake).
func (s *session) heldWakeSkipped() {
	s.mu.Lock()
	s.heldWake = true
	s.mu.Unlock()
}

// heldWakeTaken reports, and forgets, a skipped wake-up for a held priority (heldWake), once
// the session is idle.
func (s *session) heldWakeTaken() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.heldWake || s.status != protocol.StatusIdle {
		return false
	}
	s.heldWake = false
	return true
}

// markClosed records that the socket is gone: nothing is queued on it any more.
func (s *session) markClosed() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
}

func (s *session) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *session) name() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.displayName
}

// room is the free part of the push window; mu must be held.
func (s *session) room() int { return pushWindow - len(s.inflight) - s.reserved }

// reserve takes a window slot for a push of priority p straight after its commit, if the
// session may take it now: open, not behind a backlog (order), not holding p, window not full.
func (s *session) reserve(p protocol.Priority) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reserveLocked(p)
}

func (s *session) reserveLocked(p protocol.Priority) bool {
	if s.closed || s.backlog || s.holds(p) || s.room() <= 0 {
		return false
	}
	s.reserved++
	return true
}

// reserveAssigned is reserve for assigned delivery id, unless a claim already pushed it (its
// notification came late: claimed). Both under one lock, so a claim round can't take it between
// the check and the slot. behind: an earlier one of the session's could not go, so this one
// must not either (order); it is only checked. stale: a held priority was assigned while this
// replica still takes the session for busy, so the status change that made it idle (and the
// deliveries that change released, older than this one) has not reached the replica yet.
func (s *session) reserveAssigned(id int64, p protocol.Priority, behind bool) (ok, claimed, stale bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if slices.Contains(s.claimedAssigned, id) {
		return false, true, false
	}
	if behind {
		return false, false, false
	}
	ok = s.reserveLocked(p)
	return ok, false, !ok && !s.closed && s.holds(p)
}

// holds says whether the session, as this replica knows its status, waits before taking
// priority p (next and low wait for idle); mu must be held.
func (s *session) holds(p protocol.Priority) bool {
	return p != protocol.PriorityNow && s.status != protocol.StatusIdle
}

// maxRetake bounds a session's retake list (see toRetake).
const maxRetake = 256

// maxClaimedAssigned bounds the memo of assigned deliveries a claim pushed: their notifications
// come within moments if at all.
const maxClaimedAssigned = 256

// toRetake records an assigned delivery that could not be pushed in order. It counts as a
// request at once, under the same lock: a claim round ending before the caller's request would
// otherwise take the session for caught up, drop the retake and let later pushes overtake it.
func (s *session) toRetake(id int64) {
	s.mu.Lock()
	switch {
	case s.takeAll:
		// The claims take every assigned delivery already.
	case len(s.retake) == maxRetake:
		// A session this far behind (its window full while a burst is assigned to it) would
		// send the whole list with every claim, which takes a window's worth: the claims take
		// all that is assigned to it instead, in id order, and the list's memory goes.
		s.retake, s.takeAll = nil, true
	default:
		s.retake = append(s.retake, id)
	}
	s.backlog = true
	s.requests++
	s.mu.Unlock()
}

// takeAllAssigned makes the claims take everything assigned here (notifications were lost);
// a request at once, as toRetake.
func (s *session) takeAllAssigned() {
	s.mu.Lock()
	s.takeAll = true
	s.backlog = true
	s.requests++
	s.mu.Unlock()
}

// noBacklog clears the backlog (and the claims' taking of all that is assigned) a new session
// starts with, once its hello found nothing that may wait for it, unless a push was refused
// meanwhile: that one's request claims, and the claim clears them when caught up.
func (s *session) noBacklog() {
	s.mu.Lock()
	if s.requests == 0 {
		s.backlog, s.takeAll = false, false
	}
	s.mu.Unlock()
}

// lateStatus records that the session's status here is older than the database's (see
// statusLate); a request at once, as toRetake.
func (s *session) lateStatus() {
	s.mu.Lock()
	s.statusLate, s.takeAll = true, true
	s.backlog = true
	s.requests++
	s.mu.Unlock()
}

// maxNotified bounds the ring of assigned deliveries pushed from their notifications: it
// covers a window and the few written and not yet recorded.
const maxNotified = 64

// pushedFromNotification reports whether assigned delivery id was pushed from its notification
// lately (see notified).
func (s *session) pushedFromNotification(id int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Contains(s.notified, id)
}

// claimAssigned is what a claim round takes besides pending deliveries (see retake).
func (s *session) claimAssigned() (retake []int64, all bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.retake), s.takeAll
}

// pushedClaimed remembers an assigned delivery a claim pushed (see claimedAssigned).
func (s *session) pushedClaimed(id int64) {
	s.mu.Lock()
	if len(s.claimedAssigned) == maxClaimedAssigned {
		s.claimedAssigned = append(s.claimedAssigned[:0], s.claimedAssigned[1:]...)
	}
	s.claimedAssigned = append(s.claimedAssigned, id)
	s.mu.Unlock()
}

// unreserve gives back a slot whose commit failed.
func (s *session) unreserve() {
	s.mu.Lock()
	s.reserved--
	s.mu.Unlock()
}

// push queues a push frame carrying delivery id; fromReserve says it fills a reserved slot,
// assigned that a commit assigned it (rather than a claim). False means the socket is closed:
// the caller releases the delivery.
func (s *session) push(frame []byte, id int64, fromReserve, assigned bool) bool {
	// Pushes come from several goroutines (committer lanes, the bus listener, claim rounds):
	// the window and the socket's queue must take them in the same order, since written
	// matches each written frame against the window's oldest.
	s.pushOrder.Lock()
	defer s.pushOrder.Unlock()
	s.mu.Lock()
	if fromReserve {
		s.reserved--
	}
	if s.closed {
		s.mu.Unlock()
		return false
	}
	s.inflight = append(s.inflight, inflightPush{frame: unsafe.SliceData(frame), id: id, assigned: assigned})
	if assigned {
		if len(s.notified) < maxNotified {
			s.notified = append(s.notified, id)
		} else {
			s.notified[s.notifiedAt] = id
			s.notifiedAt = (s.notifiedAt + 1) % maxNotified
		}
	}
	s.mu.Unlock()
	return s.out.Write(frame) == nil // never blocks: melody's queue refuses when full
}

// send queues a frame other than a push (a reply, an event); promised says its slot in the
// reply window was taken when the request was accepted (an ack). Beyond otherOnWire it waits
// in the spill, in order.
func (s *session) send(frame []byte, promised bool) {
	s.mu.Lock()
	if promised && s.promised > 0 {
		s.promised--
	}
	if s.closed {
		owed := s.owedDone()
		s.mu.Unlock()
		closeChan(owed)
		return
	}
	if !promised {
		s.queued++
	}
	if len(s.spill) > 0 || s.otherWire >= otherOnWire {
		full := len(s.spill) >= maxSpill
		if !full {
			s.spill = append(s.spill, frame)
			s.queuedBytes += len(frame)
		}
		s.mu.Unlock()
		if full && s.overflow != nil {
			s.overflow()
		}
		return
	}
	s.otherWire++
	s.queuedBytes += len(frame)
	owed := s.owedDone()
	s.mu.Unlock()
	_ = s.out.Write(frame)
	closeChan(owed) // after the frame is queued: the close frame goes behind it
}

func closeChan(ch chan struct{}) {
	if ch != nil {
		close(ch)
	}
}

// promise takes a reply-window slot for an ack that the committer will send; false once the
// session takes no more sends (stopSends).
func (s *session) promise() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sendsStopped {
		return false
	}
	s.queued++
	s.promised++
	return true
}

// owedDone returns stopSends' channel, for the caller to close once it has queued the frame
// it is sending, when nothing owed is left unqueued; else nil. s.mu is held.
func (s *session) owedDone() chan struct{} {
	if s.acksOwed == nil || s.promised > 0 || len(s.spill) > 0 {
		return nil
	}
	ch := s.acksOwed
	s.acksOwed = nil
	return ch
}

// spillWritten is told that a spilled frame was handed to the socket's queue.
func (s *session) spillWritten() {
	s.mu.Lock()
	owed := s.owedDone()
	s.mu.Unlock()
	closeChan(owed)
}

// stopSends makes the session refuse sends from now on (a drain is about to close its socket)
// and returns a channel closed once the acks of the sends it accepted are queued on the socket,
// ahead of the close frame: a send stored and not acked would be sent again by its client, a
// duplicate under a new message id for a client that does not set client_message_id.
func (s *session) stopSends() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sendsStopped = true
	ch := make(chan struct{})
	if s.promised == 0 && len(s.spill) == 0 {
		close(ch)
	} else {
		s.acksOwed = ch
	}
	return ch
}

// releasePromise gives back a reply-window slot whose ack will never be sent (its send's
// outcome is unknown and the socket is being closed), so a reader waiting for room goes on.
func (s *session) releasePromise() {
	s.mu.Lock()
	if s.queued > 0 {
		s.queued--
	}
	if s.promised > 0 {
		s.promised--
	}
	owed := s.owedDone()
	wait := s.roomWait
	s.mu.Unlock()
	closeChan(owed)
	if wait != nil {
		select {
		case wait <- struct{}{}:
		default:
		}
	}
}

// awaitReplyRoom blocks the session's reader while its reply window is full; false when
// nothing was written for stall (the peer stopped reading) or the session closed.
func (s *session) awaitReplyRoom(stall time.Duration) bool {
	var timer *time.Timer
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return false
		}
		if s.queued < replyWindow && s.queuedBytes < replyBytes {
			s.mu.Unlock()
			return true
		}
		if s.roomWait == nil {
			s.roomWait = make(chan struct{}, 1)
		}
		wait := s.roomWait
		s.mu.Unlock()
		if timer == nil {
			timer = time.NewTimer(stall)
			defer timer.Stop()
		}
		select {
		case <-wait: // a frame was written: progress, so the stall clock restarts
			timer.Reset(stall)
		case <-timer.C:
			return false
		}
	}
}

// written is told every text frame melody wrote to the socket. For a push it returns the
// delivery (with whether a commit assigned it), and wake when a claim parked on the full
// window may run again; for another frame, next is the spilled frame that now has room (the
// caller writes it).
func (s *session) written(frame []byte) (p inflightPush, push, wake bool, next []byte) {
	if len(frame) == 0 {
		return p, false, false, nil
	}
	data := unsafe.SliceData(frame)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lastWrite = time.Now()
	if len(s.inflight) == 0 || s.inflight[0].frame != data {
		// A reply or an event.
		if s.queued > 0 {
			s.queued--
		}
		s.queuedBytes = max(0, s.queuedBytes-len(frame)) // a frame sent past send (hello_ack) was never counted
		if s.otherWire > 0 {
			s.otherWire--
		}
		if len(s.spill) > 0 && !s.closed {
			next, s.spill[0] = s.spill[0], nil
			s.spill = s.spill[1:]
			if len(s.spill) == 0 {
				s.spill = nil // the spill's memory goes with the burst
			}
			s.otherWire++
		}
		if s.roomWait != nil {
			select {
			case s.roomWait <- struct{}{}:
			default:
			}
		}
		return p, false, false, next
	}
	p = s.inflight[0]
	s.inflight = s.inflight[1:]
	s.pushesWritten++
	if len(s.inflight) == 0 {
		s.inflight = nil // an idle session holds no window memory
	}
	if s.parked {
		s.stalledFrom = time.Now() // progress
		if s.room() >= pushWindow/2 {
			s.parked, s.stalledFrom, wake = false, time.Time{}, true
		}
	}
	return p, true, wake, nil
}

// ackSlack is how many ids a socket may acknowledge beyond the pushes written to it: a whole
// client_ack frame, an ack read before the write of its push was reported, and the acks a
// reconnecting client still owes for pushes of its previous socket.
const ackSlack = protocol.MaxAckIDs + 1

// ackAllowance returns how many of n acknowledged ids the session may have recorded, and counts
// them. A client_ack has no reply and no rate limit; each id costs an index probe in the record
// statement every session of the replica shares. A client acks what it was pushed, so ids beyond
// the pushes written to this socket (and ackSlack) are made up: recording them would let one
// client keep a Postgres backend busy and fill the replica's ack queue ahead of everyone's acks.
func (s *session) ackAllowance(n int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := min(n, max(0, s.pushesWritten+ackSlack-s.idsAcked))
	s.idsAcked += k
	return k
}

// framesBehind says whether the write pump has frames queued behind the one it is writing (a
// frame stays counted until written reports it): its socket then holds the frame back to write
// the run at once (coalesce.go).
func (s *session) framesBehind() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.inflight)+s.otherWire > 1
}

// requestPush records that pending deliveries may wait for the session: until the pusher
// catches up, new deliveries queue behind them (the backlog) instead of being pushed directly,
// so they arrive in commit order. False when the session is closed.
func (s *session) requestPush() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.backlog = true
	s.requests++
	return true
}

// claimStart snapshots what a claim round needs: how many deliveries it may claim (0 parks the
// session until frames are written), whether held priorities may go, and the request count.
func (s *session) claimStart(page int) (limit int, idle bool, requests uint64, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return 0, false, 0, false
	}
	limit = min(page, s.room())
	if limit <= 0 {
		s.park()
		return 0, false, s.requests, true
	}
	s.reserved += limit // held for the claim in flight; claimDone gives back what it did not use
	return limit, s.status == protocol.StatusIdle || s.statusLate, s.requests, true
}

// park makes the pusher wait for the window; mu must be held.
func (s *session) park() {
	if !s.parked {
		s.parked, s.stalledFrom = true, time.Now()
	}
}

// claimResult says what follows a claim round.
type claimResult int

const (
	claimCaughtUp claimResult = iota // nothing left: the backlog is cleared
	claimAgain                       // more may be pending and the window has room
	claimParked                      // the window is full: wait for frames to be written
)

// claimDone ends a claim round that got got of limit. Caught up (fewer than asked, and no
// request since) clears the backlog; otherwise claim again, or park on a full window.
func (s *session) claimDone(got, limit int, requests uint64) claimResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reserved -= limit - got // the claimed ones were turned into inflight by push
	s.skippedSince = time.Time{}
	if s.closed {
		return claimCaughtUp
	}
	if got < limit && s.requests == requests {
		// Caught up: nothing assigned is left to retake (a retake recorded since would have
		// come with a request).
		s.backlog = false
		s.retake, s.takeAll, s.statusLate = nil, false, false
		return claimCaughtUp
	}
	if s.room() <= 0 {
		s.park()
		return claimParked
	}
	return claimAgain
}

// claimSkipped gives back the slots of a claim that skipped the session (its row was held by
// another transaction), keeping the backlog. It says whether to time a claim for it (none is
// timed yet), how long to wait (as long as the row has been held so far, from 50 ms to 1.6 s:
// a takeover or a change of status is gone within the first; a transaction left open costs a
// claim every 1.6 s, not twenty a second), and how long the row has been held. Claims that
// wake-ups start meanwhile skip it too and time nothing more.
func (s *session) claimSkipped(limit int, now time.Time) (arm bool, wait, held time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reserved -= limit
	if s.skippedSince.IsZero() {
		s.skippedSince = now
	}
	held = now.Sub(s.skippedSince)
	arm, s.retryArmed = !s.retryArmed, true
	return arm, min(max(held, claimRetry), claimRetryMax), held
}

// retryFired clears the timed claim's mark, as its timer runs.
func (s *session) retryFired() {
	s.mu.Lock()
	s.retryArmed = false
	s.mu.Unlock()
}

// claimFailed gives back the slots of a claim that failed; the backlog stays for the retry.
func (s *session) claimFailed(limit int) {
	s.mu.Lock()
	s.reserved -= limit
	s.mu.Unlock()
}

// quiet reports whether nothing is queued for the socket and nothing was written to it for
// longer than writeWait: a ping written now goes into a socket buffer the peer has had time to
// drain, so it cannot block behind (or time out over) a burst, which would leave the
// connection unusable for its close frame.
func (s *session) quiet(now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.closed && len(s.inflight) == 0 && s.otherWire == 0 && len(s.spill) == 0 &&
		now.Sub(s.lastWrite) > writeWait
}

// stalled reports whether the pusher is parked on the session's window, and whether the window
// has been full without a single write for d: the peer stopped reading.
func (s *session) stalled(now time.Time, d time.Duration) (parked, stalled bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	parked = s.parked && !s.closed
	return parked, parked && len(s.inflight) > 0 && now.Sub(s.stalledFrom) >= d
}

// conn is what a melody session carries. The session is set by the read goroutine once hello
// succeeded and read by the write pump too; end is set first by whoever closes the socket.
type conn struct {
	sess       atomic.Pointer[session] // nil until hello succeeded
	end        atomicEnd
	slowClosed atomic.Bool
	// removed: closed by a kick, ban or revocation. Its close frame may wait behind frames a
	// client does not read (up to writeWait); what it sends meanwhile is dropped unread.
	removed atomic.Bool
	// Set before the upgrade, and by the gate (under its lock) while unauthenticated.
	source   string
	admitted time.Time
	ms       *melody.Session
}

func (c *conn) session() *session { return c.sess.Load() }

type atomicEnd struct {
	mu  sync.Mutex
	set bool
	v   endMode
}

// Set records the first reason a socket is closing; later ones don't override it.
func (a *atomicEnd) Set(v endMode) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.set {
		a.set, a.v = true, v
	}
}

func (a *atomicEnd) Get() endMode {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.v
}
