package broker

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/protocol"
)

// Unit tests of the parts that need no database: the ordering rule and windows a session
// keeps, the hub's index and fan-out, and the planner.

// sink is a socket that records what is queued on it.
type sink struct {
	mu     sync.Mutex
	frames [][]byte
}

func (k *sink) Write(b []byte) error {
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

func TestSessionPushWindow(t *testing.T) {
	s, k := testSession("p", "m", "a")
	// Fill the window from a claim.
	limit, _, req, _ := s.claimStart(claimPage)
	frames := make([][]byte, limit)
	for i := range frames {
		frames[i] = []byte{byte(i), 1}
		require.True(t, s.push(frames[i], int64(i+1), true))
	}
	require.Equal(t, claimParked, s.claimDone(limit, limit, req), "a full window parks the claim")
	require.Equal(t, pushWindow, k.count())
	require.False(t, s.reserve(protocol.PriorityNow), "no slot for a direct push")
	parked, stalled := s.stalled(time.Now().Add(time.Hour), time.Second)
	require.True(t, parked)
	require.True(t, stalled, "nothing written for longer than the stall timeout")

	// A reply written in between is not a push.
	_, push, _ := s.written([]byte("reply"))
	require.False(t, push)
	// Pushes are reported written in order; the claim wakes at half the window.
	woke := false
	for i, f := range frames {
		id, push, wake := s.written(f)
		require.True(t, push)
		require.Equal(t, int64(i+1), id)
		if wake {
			require.False(t, woke, "woken once")
			require.Equal(t, pushWindow/2-1, i, "woken when half the window is free")
			woke = true
		}
	}
	require.True(t, woke)
	require.Nil(t, s.inflight, "an idle session holds no window memory")
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

func TestHubIndexAndFanOut(t *testing.T) {
	h := newHub()
	a, ka := testSession("pa", "m", "alice", "eng/web")
	b, kb := testSession("pb", "m", "bob", "eng")
	c, kc := testSession("pc", "m", "carol", "eng2")
	o, ko := testSession("po", "other", "dave", "eng")
	for _, s := range []*session{a, b, c, o} {
		require.Nil(t, h.add(s))
	}
	ids := func(ss []*session) []string {
		out := []string{}
		for _, s := range ss {
			out = append(out, s.presenceID)
		}
		return out
	}
	require.ElementsMatch(t, []string{"pa", "pb"}, ids(h.inGroup("m", "eng")), "a group and its sub-groups, not eng2, not another mesh")
	require.ElementsMatch(t, []string{"pa"}, ids(h.inGroup("m", "eng/web")))
	require.Empty(t, h.inGroup("m", "web"))

	h.toMesh("m", []byte("event"), func(s *session) bool { return s.memberID == "bob" })
	require.Equal(t, 1, ka.count())
	require.Equal(t, 0, kb.count(), "skipped")
	require.Equal(t, 1, kc.count())
	require.Equal(t, 0, ko.count(), "another mesh")

	h.setGroups(c, []groupEntry{{Name: "eng/db"}})
	require.ElementsMatch(t, []string{"pa", "pb", "pc"}, ids(h.inGroup("m", "eng")), "re-indexed")

	// The same presence reconnecting replaces the old session; removing the old one is a no-op.
	a2, _ := testSession("pa", "m", "alice")
	require.Equal(t, a, h.add(a2))
	require.False(t, h.remove(a))
	require.ElementsMatch(t, []string{"pb", "pc"}, ids(h.inGroup("m", "eng")), "the new session has no groups")
	require.True(t, h.remove(a2))
	require.Equal(t, 3, h.len())
}

func TestPlanner(t *testing.T) {
	h := newHub()
	sender, _ := testSession("p-sender", "m", "alice")
	localBob, _ := testSession("p-bob", "m", "bob", "eng")
	busyCarol, _ := testSession("p-carol", "m", "carol", "eng/web")
	busyCarol.status = protocol.StatusWorking
	for _, s := range []*session{sender, localBob, busyCarol} {
		h.add(s)
	}
	p := &planner{local: h, nodeID: "n0", ttl: time.Hour, now: time.Now}
	rec := store.Recipients{
		Targets: []store.Target{
			{ID: "p-sender", MeshID: "m", MemberID: "alice", NodeID: "n0"},
			{ID: "p-bob", MeshID: "m", MemberID: "bob", NodeID: "n0", GroupNames: []string{"eng"}},
			{ID: "p-carol", MeshID: "m", MemberID: "carol", NodeID: "n0", GroupNames: []string{"eng/web"}},
			{ID: "p-dan", MeshID: "m", MemberID: "dan", NodeID: "n1", GroupNames: []string{"eng"}},
			// Erin's session on this node is in its grace: no socket, but it is a recipient.
			{ID: "p-erin", MeshID: "m", MemberID: "erin", NodeID: "n0", GroupNames: []string{"eng"}},
			{ID: "p-alice2", MeshID: "m", MemberID: "alice", NodeID: "n1", GroupNames: []string{"eng"}},
		},
		Members: map[store.MeshKey]string{{MeshID: "m", Key: "bobkey"}: "bob", {MeshID: "m", Key: "dankey"}: "dan"},
	}
	send := func(target string, prio protocol.Priority) sendReq {
		return sendReq{sess: sender, msg: &protocol.Send{TargetSpec: target, Priority: prio, Nonce: "n", Ciphertext: "c"}}
	}
	key := func(s string) string { // a syntactically valid pubkey standing for a member
		k := s
		for len(k) < 64 {
			k += "0"
		}
		return k
	}
	rec.Members = map[store.MeshKey]string{{MeshID: "m", Key: key("b")}: "bob", {MeshID: "m", Key: key("d")}: "dan"}

	plan := p.plan([]sendReq{
		send(key("b"), protocol.PriorityNext), // local, idle: pushed at once
		send(key("d"), protocol.PriorityNow),  // remote: pending, n1 woken
		send(key("e"), protocol.PriorityNow),  // no such member
		send("@eng", protocol.PriorityNext),   // bob (local), carol (local, busy: held), dan, erin; not alice's own
		send("*", protocol.PriorityNow),
	}, rec)

	require.True(t, plan.acks[0].Queued)
	require.True(t, plan.acks[1].Queued)
	require.False(t, plan.acks[2].Queued)
	require.Equal(t, protocol.CodeNoRecipient, plan.acks[2].Error)
	require.Len(t, plan.envelopes, 4)

	type got struct {
		env            int
		member, pushed string
	}
	var ds []got
	for _, d := range plan.deliv {
		ds = append(ds, got{d.Envelope, d.MemberID, d.PushedTo})
	}
	require.ElementsMatch(t, []got{
		{0, "bob", "p-bob"},
		{1, "dan", ""},
		{2, "bob", "p-bob"}, {2, "carol", ""}, {2, "dan", ""}, {2, "erin", ""},
		{3, "bob", "p-bob"}, {3, "carol", "p-carol"}, {3, "dan", ""}, {3, "erin", ""},
	}, ds)
	require.Contains(t, plan.wake, store.Holder{NodeID: "n1", MemberID: "dan"})
	require.Contains(t, plan.request, busyCarol, "carol's held message waits; her pusher runs after commit")
	for i, d := range plan.deliv {
		require.Equal(t, d.PushedTo != "", plan.local[i] != nil)
	}
	plan.unreserve()
	require.Equal(t, 0, localBob.reserved)
	require.Equal(t, 0, busyCarol.reserved)
}
