package broker

import (
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// Unit tests of the parts that need no database: the ordering rule and windows a session
// keeps, the hub's index and fan-out, and the planner.

// sink is a socket that records what is queued on it.
type sink struct {
	mu     sync.Mutex
	frames [][]byte
	yield  bool // let other goroutines run before the frame is queued
}

func (k *sink) Write(b []byte) error {
	if k.yield {
		runtime.Gosched()
	}
	k.mu.Lock()
	k.frames = append(k.frames, b)
	k.mu.Unlock()
	return nil
}

func (k *sink) count() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.frames)
}

func testSession(presence, mesh, member string, groups ...string) (*session, *sink) {
	k := &sink{}
	s := &session{out: k, presenceID: presence, meshID: mesh, memberID: member, memberPubkey: member + "-key",
		sessionID: presence + "-sid", status: protocol.StatusIdle}
	for _, g := range groups {
		s.groups = append(s.groups, groupEntry{Name: g})
	}
	return s, k
}

func TestSessionOrderingRule(t *testing.T) {
	s, _ := testSession("p", "m", "a")
	require.True(t, s.reserve(protocol.PriorityNext), "idle, no backlog: a direct push may go")
	s.unreserve()

	// While pending deliveries may exist, new ones queue behind them.
	require.True(t, s.requestPush())
	require.False(t, s.reserve(protocol.PriorityNow), "behind the backlog")
	limit, idle, req, ok := s.claimStart(claimPage)
	require.True(t, ok)
	require.True(t, idle)
	require.Equal(t, pushWindow, limit, "a claim takes at most the window")
	// A request that arrives during the claim means the claim may have missed something.
	require.True(t, s.requestPush())
	require.Equal(t, claimAgain, s.claimDone(0, limit, req))
	require.False(t, s.reserve(protocol.PriorityNow))
	limit, _, req, _ = s.claimStart(claimPage)
	require.Equal(t, claimCaughtUp, s.claimDone(0, limit, req), "fewer than asked and no new request: caught up")
	require.True(t, s.reserve(protocol.PriorityNow), "backlog cleared")
	s.unreserve()

	// Held priorities don't go straight to a busy session; now does.
	s.setStatus(protocol.StatusWorking)
	require.False(t, s.reserve(protocol.PriorityNext))
	require.False(t, s.reserve(protocol.PriorityLow))
	require.True(t, s.reserve(protocol.PriorityNow))
	s.unreserve()
	_, idle, _, _ = s.claimStart(claimPage)
	require.False(t, idle, "a claim for a busy session leaves held priorities")

	s.markClosed()
	require.False(t, s.reserve(protocol.PriorityNow))
	require.False(t, s.requestPush())
	_, _, _, ok = s.claimStart(claimPage)
	require.False(t, ok)
}

// A push that can't go in order is recorded for a retake, and its request follows; a claim
// round may end in between. It must not take the session for caught up: the retake would be
// dropped, the row left assigned until it went stale, and later pushes would overtake it (a
// burst arrived with 51 messages out of place under a loaded test run).
func TestRetakeRecordedDuringAClaimRoundIsKept(t *testing.T) {
	for name, record := range map[string]func(*session){
		"retake":   func(s *session) { s.toRetake(42) },
		"take all": func(s *session) { s.takeAllAssigned() },
	} {
		t.Run(name, func(t *testing.T) {
			s, _ := testSession("p", "m", "a")
			require.True(t, s.requestPush())
			limit, _, req, _ := s.claimStart(claimPage)
			record(s) // the pusher's request comes after
			require.Equal(t, claimAgain, s.claimDone(0, limit, req), "not caught up: something to retake came during the round")
			require.False(t, s.reserve(protocol.PriorityNow), "later pushes still queue behind it")
			retake, all := s.claimAssigned()
			require.True(t, slices.Equal(retake, []int64{42}) || all, "the next round takes it")
		})
	}
	// Recorded while no round runs: later pushes queue behind it even before the request.
	s, _ := testSession("p", "m", "a")
	s.toRetake(7)
	require.False(t, s.reserve(protocol.PriorityNow))
}

func TestSessionPushWindow(t *testing.T) {
	s, k := testSession("p", "m", "a")
	// Fill the window from a claim.
	limit, _, req, _ := s.claimStart(claimPage)
	frames := make([][]byte, limit)
	for i := range frames {
		frames[i] = []byte{byte(i), 1}
		require.True(t, s.push(frames[i], int64(i+1), true, false))
	}
	require.Equal(t, claimParked, s.claimDone(limit, limit, req), "a full window parks the claim")
	require.Equal(t, pushWindow, k.count())
	require.False(t, s.reserve(protocol.PriorityNow), "no slot for a direct push")
	parked, stalled := s.stalled(time.Now().Add(time.Hour), time.Second)
	require.True(t, parked)
	require.True(t, stalled, "nothing written for longer than the stall timeout")

	// A reply written in between is not a push.
	_, push, _, _ := s.written([]byte("reply"))
	require.False(t, push)
	// Pushes are reported written in order; the claim wakes at half the window.
	woke := false
	for i, f := range frames {
		d, push, wake, _ := s.written(f)
		require.True(t, push)
		require.Equal(t, int64(i+1), d.id)
		require.False(t, d.assigned, "claimed, not assigned")
		if wake {
			require.False(t, woke, "woken once")
			require.Equal(t, pushWindow/2-1, i, "woken when half the window is free")
			woke = true
		}
	}
	require.True(t, woke)
	require.Nil(t, s.inflight, "an idle session holds no window memory")
}

// Pushes reach one session from several goroutines at once (the committer's lanes, the bus
// listener, claim rounds). The socket must write them in the order the window holds them: a
// push written ahead of an older one was taken for a reply, the older one then never left the
// window, and once the window filled the session was closed as a slow consumer (4008) while
// its peer was reading (about one session in 70 at saturation).
func TestConcurrentPushesLeaveTheWindowAsTheyAreWritten(t *testing.T) {
	s, k := testSession("p", "m", "a")
	k.yield = true // the socket's queue takes each frame a little later, as a busy core would
	const pushers, each, rounds = 2, pushWindow / 2, 200
	for round := range rounds {
		var wg sync.WaitGroup
		for g := range pushers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range each {
					assert.True(t, s.push([]byte{byte(g), byte(i)}, int64(1+g*each+i), false, true))
				}
			}()
		}
		wg.Wait()
		// The write pump: every frame, in the queue's order.
		k.mu.Lock()
		queued := k.frames
		k.frames = nil
		k.mu.Unlock()
		for _, f := range queued {
			_, push, _, _ := s.written(f)
			require.True(t, push, "round %d: a push written was taken for a reply", round)
		}
		require.Empty(t, s.inflight, "round %d: every written push left the window", round)
	}
}

// A burst of events beyond the socket's share for them waits in the session, in order, and
// goes out as the socket writes: the queue never overflows; a spill that fills up closes the
// socket (the peer is not reading).
func TestSessionSpill(t *testing.T) {
	s, k := testSession("p", "m", "a")
	closed := 0
	s.overflow = func() { closed++ }
	frames := make([][]byte, otherOnWire+maxSpill)
	for i := range frames {
		frames[i] = []byte(fmt.Sprint("event ", i))
		s.send(frames[i], false)
	}
	require.Equal(t, otherOnWire, k.count(), "only the events' share of the queue is used")
	require.Len(t, s.spill, maxSpill)
	require.Zero(t, closed)
	s.send([]byte("one too many"), false)
	require.Equal(t, 1, closed, "a full spill closes the socket")
	// Each frame written lets the next spilled one out, in order.
	for i := range frames {
		_, push, _, next := s.written(frames[i])
		require.False(t, push)
		if j := i + otherOnWire; j < len(frames) {
			require.Equal(t, frames[j], next)
		} else {
			require.Nil(t, next)
		}
	}
	require.Nil(t, s.spill, "the spill's memory goes with the burst")
}

func TestSessionReplyWindow(t *testing.T) {
	s, _ := testSession("p", "m", "a")
	for range replyWindow {
		s.promise()
	}
	done := make(chan bool)
	go func() { done <- s.awaitReplyRoom(10 * time.Second) }()
	select {
	case <-done:
		t.Fatal("a full reply window must hold the reader")
	default:
	}
	s.send([]byte("ack"), true)
	s.written([]byte("ack")) // one reply written: room again
	require.True(t, <-done)
	for range replyWindow {
		s.promise()
	}
	require.False(t, s.awaitReplyRoom(10*time.Millisecond), "no write at all: the peer stopped reading")
}

// Large replies hold the reader by their bytes, well before the window's count: a client that
// pipelines big requests (list_peers of a mesh with long summaries) and reads slowly holds a
// few MiB on the replica, not 64 replies.
func TestSessionReplyBytes(t *testing.T) {
	s, _ := testSession("p", "m", "a")
	big := make([]byte, replyBytes/2)
	s.send(big, false)
	require.True(t, s.awaitReplyRoom(10*time.Millisecond), "under the bound: the next request is read")
	other := make([]byte, replyBytes/2)
	s.send(other, false)
	require.False(t, s.awaitReplyRoom(10*time.Millisecond), "two replies hold the bound's bytes, the peer reads none")
	s.written(big)
	require.True(t, s.awaitReplyRoom(10*time.Millisecond), "one written: room again")
	s.written(other)
	s.written([]byte(`{"type":"hello_ack"}`)) // a frame that never went through send
	s.send(big, false)
	s.send(big, false)
	require.False(t, s.awaitReplyRoom(10*time.Millisecond), "an uncounted frame's write leaves the count at zero, not below")
}

// A drain closes a socket once every ack it owes is on the socket's queue: not while a send it
// accepted is still being stored, nor while the ack waits in the spill (the close frame would
// overtake it). Sends after that are refused.
func TestStopSendsWaitsForTheAcksOwed(t *testing.T) {
	s, _ := testSession("p", "m", "a")
	open := func(ch <-chan struct{}) bool {
		select {
		case <-ch:
			return false
		default:
			return true
		}
	}
	require.True(t, s.promise())
	require.True(t, s.promise())
	owed := s.stopSends()
	require.False(t, s.promise(), "no send is taken any more")
	s.send([]byte("ack 1"), true)
	require.True(t, open(owed), "one ack still owed")
	s.releasePromise() // its outcome is unknown: that ack never comes
	require.False(t, open(owed))

	s, _ = testSession("p", "m", "a")
	for i := range otherOnWire {
		s.send(fmt.Appendf(nil, "event %d", i), false)
	}
	require.True(t, s.promise())
	owed = s.stopSends()
	ack := []byte("ack")
	s.send(ack, true)
	require.True(t, open(owed), "the ack waits in the spill")
	_, _, _, next := s.written([]byte("event 0"))
	require.Equal(t, ack, next)
	s.spillWritten()
	require.False(t, open(owed), "the ack is on the socket's queue")
	idle, _ := testSession("p", "m", "a")
	require.False(t, open(idle.stopSends()), "a session owing nothing closes at once")
}

func TestHubIndexAndFanOut(t *testing.T) {
	h := newHub()
	a, ka := testSession("pa", "m", "alice")
	b, kb := testSession("pb", "m", "bob")
	c, kc := testSession("pc", "m", "carol")
	o, ko := testSession("po", "other", "dave")
	for _, s := range []*session{a, b, c, o} {
		old, added := h.add(s)
		require.Nil(t, old)
		require.True(t, added)
	}
	h.toMesh("m", []byte("event"), func(s *session) bool { return s.memberID == "bob" })
	require.Equal(t, 1, ka.count())
	require.Equal(t, 0, kb.count(), "skipped")
	require.Equal(t, 1, kc.count())
	require.Equal(t, 0, ko.count(), "another mesh")

	a2, _ := testSession("pa2", "m", "alice")
	h.add(a2)
	require.ElementsMatch(t, []*session{a, a2}, h.memberSessions("alice"))

	// The same presence reconnecting replaces the old session; removing the old one is a no-op.
	a3, _ := testSession("pa", "m", "alice")
	old, added := h.add(a3)
	require.True(t, added)
	require.Equal(t, a, old)
	require.False(t, h.remove(a))
	require.Equal(t, a3, h.get("pa"))
	require.True(t, h.remove(a3))
	require.Nil(t, h.get("pa"))
	require.Equal(t, 4, h.len())

	// A hello at an earlier epoch that reaches the hub after a later one of the same session
	// is not registered: the later one stays.
	later, _ := testSession("pe", "m", "erin")
	later.epoch = 7
	earlier, _ := testSession("pe", "m", "erin")
	earlier.epoch = 6
	_, added = h.add(later)
	require.True(t, added)
	old, added = h.add(earlier)
	require.False(t, added)
	require.Equal(t, later, old)
	require.Equal(t, later, h.get("pe"))
	require.ElementsMatch(t, []*session{later}, h.memberSessions("erin"))
}

func TestPlannerAndSettle(t *testing.T) {
	sender, _ := testSession("p-sender", "m", "alice")
	sender.sessionPubkey = strings.Repeat("c", 64)
	p := &planner{ttl: time.Hour, now: time.Now}
	member := strings.Repeat("AB", 32)
	send := func(target string) sendReq {
		return sendReq{sess: sender, msg: &protocol.Send{TargetSpec: target, Priority: protocol.PriorityNext, Nonce: "n", Ciphertext: "c", ID: "c-" + target}}
	}
	batch := []sendReq{send(member), send("not-a-key"), send("*"), send("@all"), send("@eng/web"), send("@")}
	plan := p.plan(batch)
	require.Len(t, plan.envelopes, 4, "an invalid target is refused before the store")
	require.Equal(t, protocol.CodeNoRecipient, plan.acks[1].Error)
	require.Equal(t, protocol.CodeNoRecipient, plan.acks[5].Error)
	e := plan.envelopes[0]
	require.Equal(t, store.SendDirect, e.Kind)
	require.Equal(t, strings.ToLower(member), e.Key, "keys are normalized")
	require.Equal(t, sender.sessionPubkey, e.SenderPubkey, "the sender's session key when it has one")
	require.Equal(t, sender.memberPubkey, e.SenderMemberPubkey)
	require.Equal(t, store.SendAll, plan.envelopes[1].Kind)
	require.Equal(t, store.SendAll, plan.envelopes[2].Kind)
	require.Equal(t, store.SendGroup, plan.envelopes[3].Kind)
	require.Equal(t, "eng/web", plan.envelopes[3].Key)

	plan.settle(batch, []store.SentEnvelope{{Queued: false}, {Queued: true, Recipients: 3}, {Queued: true}, {Queued: true}})
	require.Equal(t, protocol.CodeNoRecipient, plan.acks[0].Error, "no member or session key with that key")
	require.True(t, plan.acks[2].Queued)
	require.Equal(t, plan.envelopes[1].ID, plan.acks[2].MessageID)
	require.Equal(t, "c-*", plan.acks[2].ID)
	// One encoding of an envelope serves every local recipient.
	f := plan.frame(1)
	require.Same(t, &f[0], &plan.frame(1)[0])
}

// pushAssigned keeps each session's order: once one delivery can't go into its window, every
// later one of that session stays assigned for its next claim, which takes them in order (its
// pusher runs); one for a session not here goes back to pending; one a claim already pushed is
// not pushed again.
func TestPushAssignedKeepsOrder(t *testing.T) {
	h := newHub()
	a, ka := testSession("pa", "m", "alice")
	b, kb := testSession("pb", "m", "bob")
	h.add(a)
	h.add(b)
	p := newPusher(nil, "n0", nil, nil, h)
	var back []int64
	p.giveBack = func(ids []int64) { back = append(back, ids...) }
	for range pushWindow - 1 { // a's window has one slot left
		require.True(t, a.reserve(protocol.PriorityNow))
	}
	frame := func(id int64) assigned {
		return assigned{presenceID: "pa", id: id, priority: protocol.PriorityNow, frame: []byte{byte(id)}}
	}
	b.pushedClaimed(2) // a claim pushed 2 first
	a.pushedClaimed(6) // and a's 6, behind a's 2 that can't go: not retaken either
	items := []assigned{frame(1), frame(2), {presenceID: "pb", id: 3, priority: protocol.PriorityNow, frame: []byte{3}}, frame(4),
		{presenceID: "gone", id: 5, priority: protocol.PriorityNow, frame: []byte{5}},
		{presenceID: "pb", id: 2, priority: protocol.PriorityNow, frame: []byte{2}}, frame(6)}
	p.pushAssigned(items)
	require.Equal(t, 1, ka.count(), "one fitted")
	require.Equal(t, 1, kb.count(), "3 pushed; 2 was claimed already")
	require.Equal(t, []int64{5}, back, "only the one for a session not here")
	require.Contains(t, p.dirty, a, "a's pusher runs to claim the rest in order")
	require.True(t, a.backlog)
	retake, _ := a.claimAssigned()
	require.Equal(t, []int64{2, 4}, retake, "its claims take the ones that stayed assigned")
}

// A held message assigned to a session this replica still takes for busy was assigned after a
// status change that has not reached the replica yet; that change released older held messages,
// whose notification comes later. The session's next claim takes everything assigned to it, in
// id order, so the newer one can't overtake them (from the same sender, its order would break).
func TestHeldMessageAssignedBeforeTheStatusChangeArrivesWaitsForOlderOnes(t *testing.T) {
	h := newHub()
	s, k := testSession("ps", "m", "sam")
	s.setStatus(protocol.StatusWorking) // the replica's copy: the hook's change to idle is on its way
	h.add(s)
	p := newPusher(nil, "n0", nil, nil, h)
	p.pushAssigned([]assigned{{presenceID: "ps", id: 9, priority: protocol.PriorityNext, frame: []byte{9}}})
	require.Zero(t, k.count(), "not pushed ahead of what the change released")
	require.Contains(t, p.dirty, s, "its claim runs")
	_, all := s.claimAssigned()
	require.True(t, all, "the claim takes all that is assigned to the session, the older ones first")
	limit, held, req, _ := s.claimStart(claimPage)
	require.True(t, held, "and the held ones the change left pending (the claim reads the database's status)")
	require.Equal(t, claimCaughtUp, s.claimDone(0, limit, req))
	_, held, _, _ = s.claimStart(claimPage)
	require.False(t, held, "once caught up, this replica's status decides again")

	// A push the session may take now is no sign of a late status: it only waits its turn.
	r, _ := testSession("pr", "m", "rob")
	r.setStatus(protocol.StatusWorking)
	require.True(t, r.requestPush()) // a backlog to keep order behind
	h.add(r)
	p.pushAssigned([]assigned{{presenceID: "pr", id: 10, priority: protocol.PriorityNow, frame: []byte{10}}})
	retake, all := r.claimAssigned()
	require.Equal(t, []int64{10}, retake)
	require.False(t, all)

	// Nor is a held one for a session this replica knows is idle: it waits behind a backlog.
	q, _ := testSession("pq", "m", "quinn")
	require.True(t, q.requestPush())
	h.add(q)
	p.pushAssigned([]assigned{{presenceID: "pq", id: 11, priority: protocol.PriorityNext, frame: []byte{11}}})
	retake, all = q.claimAssigned()
	require.Equal(t, []int64{11}, retake)
	require.False(t, all)
}

// A claim that takes all that is assigned to a session (its status here was late, its list
// too long, its notifications lost) can take deliveries their notifications already put in
// its window, before their records are written. They are not pushed twice; the rest are.
func TestClaimDoesNotPushAgainWhatItsNotificationPushed(t *testing.T) {
	h := newHub()
	s, k := testSession("ps", "m", "sam")
	h.add(s)
	p := newPusher(nil, "n0", nil, nil, h)
	var notified []assigned
	for id := range int64(3) {
		notified = append(notified, assigned{presenceID: "ps", id: id + 1, priority: protocol.PriorityNow, frame: []byte{byte(id + 1)}})
	}
	p.pushAssigned(notified)
	require.Equal(t, 3, k.count())
	s.takeAllAssigned()
	limit, _, req, _ := s.claimStart(claimPage)
	got := []store.Claimed{{ID: 1, FromAssigned: true}, {ID: 2, FromAssigned: true}, {ID: 3, FromAssigned: true}, {ID: 4, FromAssigned: true}}
	require.Empty(t, pushClaimed(s, got))
	require.Equal(t, 4, k.count(), "only 4 was pushed again")
	s.claimDone(len(got), limit, req)
	for _, f := range k.frames {
		s.written(f)
	}
	require.Equal(t, pushWindow, s.room(), "the skipped ones gave their slots back")
}

// A session whose window stays full while a burst of assigned deliveries arrives (a mesh's
// broadcasts to a slow reader) keeps a bounded list of them: beyond maxRetake its claims take
// all that is assigned to it. The list had grown with every delivery and gone out whole with
// every claim (50 MB of parameters per replica in a broadcast-heavy saturation run).
func TestRetakeListIsBounded(t *testing.T) {
	s, _ := testSession("p", "m", "a")
	for id := range int64(maxRetake) {
		s.toRetake(id + 1)
	}
	retake, all := s.claimAssigned()
	require.Len(t, retake, maxRetake, "up to the bound, the list")
	require.False(t, all)
	for id := range int64(9 * maxRetake) {
		s.toRetake(maxRetake + id + 1)
	}
	retake, all = s.claimAssigned()
	require.True(t, all, "beyond it, the claims take all that is assigned to the session")
	require.Empty(t, retake)
	require.Nil(t, s.retake, "the list's memory goes")
	require.True(t, s.backlog, "later pushes still queue behind them")
}

// A taken push's record waits for its ack: a flush takes the pushes written before its cutoff,
// in order, and leaves the younger ones queued for theirs.
func TestRecorderKeepsYoungTakenPushesForTheirAcks(t *testing.T) {
	t0 := time.Unix(1000, 0)
	now := t0
	r := newRecorder(nil, nil, nil)
	r.now = func() time.Time { return now }
	for i, at := range []time.Duration{0, 5 * time.Millisecond, 30 * time.Millisecond} {
		now = t0.Add(at)
		r.took(int64(i+1), 7)
	}
	require.Equal(t, []store.Taken{{ID: 1, Epoch: 7}, {ID: 2, Epoch: 7}}, r.takeTaken(t0.Add(10*time.Millisecond)))
	first, ok := r.oldestTaken()
	require.True(t, ok)
	require.Equal(t, t0.Add(30*time.Millisecond), first)
	require.Empty(t, r.takeTaken(t0.Add(10*time.Millisecond)))
	require.Equal(t, []store.Taken{{ID: 3, Epoch: 7}}, r.takeTaken(time.Time{}), "on the way out, everything")
	_, ok = r.oldestTaken()
	require.False(t, ok)
}

// A wake-up for pending deliveries names a member (a direct message: any of its sessions may
// take it) or one session ("p": a multicast's row for a session in its grace, which a hello
// may be resuming). The first claims for the member's sessions that may take its priority now,
// the second for that session only.
func TestWakeUpsClaimForTheSessionsTheyName(t *testing.T) {
	h := newHub()
	a1, _ := testSession("pa1", "m", "alice")
	a2, _ := testSession("pa2", "m", "alice")
	a3, _ := testSession("pa3", "m", "alice")
	a3.setStatus(protocol.StatusWorking)
	b, _ := testSession("pb", "m", "bob")
	for _, s := range []*session{a1, a2, a3, b} {
		h.add(s)
	}
	p := newPusher(nil, "n0", nil, nil, h)
	r := &router{hub: h, pusher: p, nodeID: "n0"}
	woken := func(m pgbus.Message) []*session {
		t.Helper()
		p.dirty = map[*session]struct{}{}
		r.apply(t.Context(), m)
		var out []*session
		for _, s := range []*session{a1, a2, a3, b} {
			if _, ok := p.dirty[s]; ok {
				out = append(out, s)
			}
		}
		return out
	}
	require.Equal(t, []*session{a1, a2, a3}, woken(pgbus.Message{Kind: pgbus.KindDeliveries, Member: "alice", Key: "now"}))
	require.Equal(t, []*session{a1, a2}, woken(pgbus.Message{Kind: pgbus.KindDeliveries, Member: "alice", Key: "next"}),
		"not the session at work, for a next message")
	require.Equal(t, []*session{a2}, woken(pgbus.Message{Kind: pgbus.KindDeliveries, Member: "alice", Presence: "pa2", Key: "low"}),
		"the one session named")
	require.Empty(t, woken(pgbus.Message{Kind: pgbus.KindDeliveries, Member: "alice", Presence: "pa3", Key: "low"}),
		"named, but at work for a low message")
	require.Empty(t, woken(pgbus.Message{Kind: pgbus.KindDeliveries, Member: "alice", Presence: "elsewhere", Key: "now"}),
		"a session not on this replica")
}

// A session skipped by claim after claim (its row held by a transaction left open) is claimed
// for less and less often, waiting as long as the row has been held (50 ms to 1.6 s), with one
// timed claim at a time however many wake-ups meanwhile; its reserved slots come back each time,
// and a claim that takes its turn starts over.
func TestClaimsOfAHeldSessionBackOff(t *testing.T) {
	s, _ := testSession("p", "m", "a")
	t0 := time.Now()
	skip := func(at time.Duration) (bool, time.Duration, time.Duration) {
		t.Helper()
		limit, _, _, ok := s.claimStart(claimPage)
		require.True(t, ok)
		return s.claimSkipped(limit, t0.Add(at))
	}
	ms := time.Millisecond
	arm, wait, held := skip(0)
	require.Equal(t, []any{true, 50 * ms, time.Duration(0)}, []any{arm, wait, held})
	arm, _, _ = skip(10 * ms)
	require.False(t, arm, "a wake-up's claim meanwhile times no second one")
	s.retryFired()
	arm, wait, held = skip(400 * ms)
	require.Equal(t, []any{true, 400 * ms, 400 * ms}, []any{arm, wait, held})
	s.retryFired()
	arm, wait, held = skip(10 * time.Second)
	require.Equal(t, []any{true, 1600 * ms, 10 * time.Second}, []any{arm, wait, held})
	require.Equal(t, pushWindow, s.room(), "no slot kept by the skipped claims")

	s.retryFired()
	limit, _, req, _ := s.claimStart(claimPage)
	s.claimDone(0, limit, req)
	_, wait, held = skip(11 * time.Second)
	require.Equal(t, []any{50 * ms, time.Duration(0)}, []any{wait, held}, "the count starts over")
}

// A client_ack has no reply, so the reply window does not slow a client that floods them. The
// replica holds at most maxQueuedAcks before recording them: past that, an acking session's
// read waits until the recorder takes the queue (or ackWait passes, then queues its frame
// anyway); nothing acked is dropped.
func TestAcksQueuedForRecordingAreBounded(t *testing.T) {
	r := newRecorder(nil, nil, nil)
	s, _ := testSession("p", "m", "a")
	r.acks.add(make([]store.Ack, maxQueuedAcks)...)
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.acked(s, []string{"e1", "e2"})
	}()
	dbtest.WaitFor(t, 10*time.Second, "the ack waiting for room", func() bool { return r.ackWaiters.Load() == 1 })
	require.Equal(t, maxQueuedAcks, r.acks.len(), "not queued while the queue is full")
	require.Len(t, r.takeAcks(), maxQueuedAcks)
	<-done
	require.Equal(t, []string{"e1", "e2"}, []string{r.acks.items[0].EnvelopeID, r.acks.items[1].EnvelopeID}, "queued once there was room")

	// A recorder that does not catch up within ackWait: the frame is queued anyway.
	r.ackWait = time.Millisecond
	r.acks.add(make([]store.Ack, maxQueuedAcks)...)
	r.acked(s, []string{"e3"})
	require.Equal(t, maxQueuedAcks+3, r.acks.len())

	// A closed session's read does not wait: its acks are queued at once.
	r.ackWait = time.Hour
	s.markClosed()
	r.acked(s, []string{"e4"})
	require.Equal(t, maxQueuedAcks+4, r.acks.len())
}

// A socket's client_acks are recorded up to the pushes written to it plus ackSlack: a client
// that acks everything it is pushed never reaches the bound, however many it was pushed.
func TestAckAllowanceFollowsPushesWritten(t *testing.T) {
	s, _ := testSession("p", "m", "a")
	require.Equal(t, ackSlack, s.ackAllowance(ackSlack+5), "a frame's worth before any push")
	require.Equal(t, 0, s.ackAllowance(1), "nothing was pushed")
	for i := range 3 * ackSlack {
		frame := []byte(fmt.Sprint("push ", i))
		require.True(t, s.push(frame, int64(i), false, false))
		_, push, _, _ := s.written(frame)
		require.True(t, push)
		require.Equal(t, 1, s.ackAllowance(1), "each push written may be acked")
	}
	require.Equal(t, 0, s.ackAllowance(protocol.MaxAckIDs))
}
