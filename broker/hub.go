package broker

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// hub is this replica's sessions: indexed by presence, mesh and member, so routing never scans
// all sessions, and the one place that fans a pre-encoded frame out to many of them. It holds
// no SQL and does no socket I/O beyond queueing frames. (Group sends are resolved by the store
// in the statement that stores them, from the stored groups, so the hub keeps no group index.)
type hub struct {
	mu         sync.RWMutex
	byPresence map[string]*session
	byMesh     map[string]map[*session]struct{}
	byMember   map[string]map[*session]struct{}
	// newLimits makes a member's request rate limiters, shared by its sessions on this replica
	// (nil: no limit).
	newLimits func() *memberLimits
	// spentLimits keeps the limiters of members whose last session here left before their
	// buckets filled again, for their next session: else a member could reset its budget
	// (a send burst, say) by reconnecting under a fresh session id. Least recently used out
	// past spentLimitsKeys; a member whose buckets are full leaves nothing to keep.
	spentLimits *simplelru.LRU[string, *memberLimits]
	// bySlot spreads the sessions over the ping slots (by their lane hash), so each tick of the
	// guard pings one slot's sessions without walking the others.
	bySlot []map[*session]struct{}
	// wakes numbers the lookups of sessions for something to deliver (a send's rows, a bus
	// message, a release, a catch-up), each numbered before it looks; wokeAt keeps, per bucket
	// of the id looked up, the highest number of a lookup in it, and wokeAll that of the last
	// full catch-up (which looks at every session). A hello that read wakes before its
	// statement, and finds no higher number in its session's bucket, its member's or wokeAll
	// once its session joined the hub, and whose session had nothing waiting when it
	// committed, missed no delivery lookup. Lookups for other sessions meanwhile (steady
	// traffic) rarely share its buckets, so they rarely make it claim.
	wakes   atomic.Uint64
	wokeAt  [wakeBuckets]atomic.Uint64
	wokeAll atomic.Uint64
	// statusAt does for the bus's status changes what wokeAt does for deliveries: one that
	// came for a session not yet in the hub was dropped, and its hello re-reads the status.
	statusAt [wakeBuckets]atomic.Uint64
	// kicks are the recent close notices (kick, ban, revocation, takeover), numbered as the
	// wake-ups are, before their lookup: one that came for a session not yet in the hub found
	// nothing to close, and its hello closes it (kickedSince). kickFloor is the number of the
	// newest notice dropped to keep the list short: a hello that started before it checks with
	// the database.
	kickMu    sync.Mutex
	kicks     []kickNote
	kickFloor uint64
}

// kickNote is a close notice: for one presence, or (presence "") for every session of a member.
type kickNote struct {
	seq      uint64
	at       time.Time
	presence string
	member   string
	code     int
	reason   string
}

// kickKeep is how long a close notice is kept for the hellos registering meanwhile: well past
// the longest a hello runs (helloTimeout). maxKicks bounds the list.
const (
	kickKeep = 30 * time.Second
	maxKicks = 4096
)

// noteKick numbers a close notice and keeps it, before the lookup of the sessions it closes.
func (h *hub) noteKick(presence, member string, code int, reason string) {
	n := kickNote{seq: h.wakes.Add(1), at: time.Now(), presence: presence, member: member, code: code, reason: reason}
	h.kickMu.Lock()
	defer h.kickMu.Unlock()
	drop := 0
	for drop < len(h.kicks) && (n.at.Sub(h.kicks[drop].at) > kickKeep || len(h.kicks)-drop >= maxKicks) {
		h.kickFloor = max(h.kickFloor, h.kicks[drop].seq)
		drop++
	}
	h.kicks = append(h.kicks[drop:], n)
}

// kickedSince finds a close notice numbered after mark that was for this presence or this
// member: its session may have joined the hub after the notice looked for it. unsure says that
// notices from after mark were dropped, so the database must tell.
func (h *hub) kickedSince(mark uint64, presenceID, memberID string) (k kickNote, found, unsure bool) {
	h.kickMu.Lock()
	defer h.kickMu.Unlock()
	for i := len(h.kicks) - 1; i >= 0 && h.kicks[i].seq > mark; i-- {
		if n := h.kicks[i]; n.presence == presenceID || (n.presence == "" && n.member == memberID) {
			return n, true, false
		}
	}
	return kickNote{}, false, h.kickFloor > mark
}

// wakeBuckets is how many buckets the lookups are numbered in, by id: with 4,096, a hello whose
// registration takes 50 ms on a replica looking up 170 other sessions a second shares a
// bucket with one of them 0.4 % of the time.
const wakeBuckets = 4096

// wakeBucket is the bucket of a presence's or a member's lookups (FNV-1a).
func wakeBucket(id string) int {
	h := uint32(2166136261)
	for i := 0; i < len(id); i++ {
		h = (h ^ uint32(id[i])) * 16777619
	}
	return int(h % wakeBuckets)
}

// raise sets v to n unless it already holds more: numbers taken in one order may be stored in
// another.
func raise(v *atomic.Uint64, n uint64) {
	for {
		old := v.Load()
		if n <= old || v.CompareAndSwap(old, n) {
			return
		}
	}
}

// woke numbers a wake-up that looks at every session (a full catch-up), before it looks.
func (h *hub) woke() { raise(&h.wokeAll, h.wakes.Add(1)) }

// wakeMark is the number of the last lookup so far: what a hello compares with once its
// session is in the hub (wokeSince).
func (h *hub) wakeMark() uint64 { return h.wakes.Load() }

// wokeSince says whether a lookup that could have been for this presence or member, or a full
// catch-up, was numbered after the mark.
func (h *hub) wokeSince(mark uint64, presenceID, memberID string) bool {
	return h.wokeAll.Load() > mark || h.wokeAt[wakeBucket(presenceID)].Load() > mark ||
		h.wokeAt[wakeBucket(memberID)].Load() > mark
}

// wakeSession is get for a delivery: the lookup is counted first.
func (h *hub) wakeSession(presenceID string) *session {
	raise(&h.wokeAt[wakeBucket(presenceID)], h.wakes.Add(1))
	return h.get(presenceID)
}

// statusSession is get for a status change from the bus: the lookup is counted first.
func (h *hub) statusSession(presenceID string) *session {
	raise(&h.statusAt[wakeBucket(presenceID)], h.wakes.Add(1))
	return h.get(presenceID)
}

// statusMissed says whether a status change that could have been for this presence, or a full
// catch-up (which reloads the statuses of the sessions in the hub), was numbered after the mark.
func (h *hub) statusMissed(mark uint64, presenceID string) bool {
	return h.wokeAll.Load() > mark || h.statusAt[wakeBucket(presenceID)].Load() > mark
}

// wakeMember is memberSessions for a delivery: the lookup is counted first.
func (h *hub) wakeMember(memberID string) []*session {
	raise(&h.wokeAt[wakeBucket(memberID)], h.wakes.Add(1))
	return h.memberSessions(memberID)
}

// setPingSlots spreads the sessions over n ping slots (the ping period over the guard's tick).
func (h *hub) setPingSlots(n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.bySlot = make([]map[*session]struct{}, max(n, 1))
	for i := range h.bySlot {
		h.bySlot[i] = map[*session]struct{}{}
	}
	for _, s := range h.byPresence {
		h.bySlot[s.lane%uint32(len(h.bySlot))][s] = struct{}{}
	}
}

// spentLimitsKeys bounds the limiters kept for members with no session here: about 500 bytes
// each, 8 MB at most. Evicting one early only gives its member the fresh budget it would have
// had a few seconds later (the longest refill at the default rates is 10 s).
const spentLimitsKeys = 16_384

func newHub() *hub {
	spent, err := simplelru.NewLRU[string, *memberLimits](spentLimitsKeys, nil)
	if err != nil {
		panic(err) // a positive constant size cannot fail
	}
	return &hub{
		byPresence:  map[string]*session{},
		byMesh:      map[string]map[*session]struct{}{},
		byMember:    map[string]map[*session]struct{}{},
		spentLimits: spent,
	}
}

func addTo[K comparable](m map[K]map[*session]struct{}, k K, s *session) {
	set := m[k]
	if set == nil {
		set = map[*session]struct{}{}
		m[k] = set
	}
	set[s] = struct{}{}
}

func removeFrom[K comparable](m map[K]map[*session]struct{}, k K, s *session) {
	if set := m[k]; set != nil {
		delete(set, s)
		if len(set) == 0 {
			delete(m, k)
		}
	}
}

// add registers s; it returns the session it replaced on this node (same presence), if any.
// A session registered at a later epoch than s's stays, and s is not added (added false, old
// the one that stays): two hellos for one session, batched into one statement, come back
// from it in their epochs' order but may reach the hub in the other.
func (h *hub) add(s *session) (old *session, added bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	old = h.byPresence[s.presenceID]
	if old != nil && old.epoch > s.epoch {
		return old, false
	}
	if old != nil {
		h.removeLocked(old)
	}
	if s.limits == nil && h.newLimits != nil {
		for other := range h.byMember[s.memberID] {
			s.limits = other.limits
			break
		}
		if s.limits == nil {
			if l, ok := h.spentLimits.Get(s.memberID); ok {
				h.spentLimits.Remove(s.memberID)
				s.limits = l
			} else {
				s.limits = h.newLimits()
			}
		}
	}
	h.byPresence[s.presenceID] = s
	if len(h.bySlot) > 0 {
		h.bySlot[s.lane%uint32(len(h.bySlot))][s] = struct{}{}
	}
	addTo(h.byMesh, s.meshID, s)
	addTo(h.byMember, s.memberID, s)
	return old, true
}

// remove unregisters s if it is still the registered session of its presence.
func (h *hub) remove(s *session) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.byPresence[s.presenceID] != s {
		return false
	}
	h.removeLocked(s)
	return true
}

func (h *hub) removeLocked(s *session) {
	delete(h.byPresence, s.presenceID)
	if len(h.bySlot) > 0 {
		delete(h.bySlot[s.lane%uint32(len(h.bySlot))], s)
	}
	removeFrom(h.byMesh, s.meshID, s)
	removeFrom(h.byMember, s.memberID, s)
	if _, more := h.byMember[s.memberID]; !more && s.limits != nil && !s.limits.full() {
		h.spentLimits.Add(s.memberID, s.limits)
	}
}

func (h *hub) get(presenceID string) *session {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.byPresence[presenceID]
}

func collect(set map[*session]struct{}) []*session {
	out := make([]*session, 0, len(set))
	for s := range set {
		out = append(out, s)
	}
	return out
}

// meshSessions returns the local sessions of a mesh (at most its session limit).
func (h *hub) meshSessions(meshID string) []*session {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return collect(h.byMesh[meshID])
}

func (h *hub) memberSessions(memberID string) []*session {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return collect(h.byMember[memberID])
}

// meshIDs returns the meshes that have sessions here.
func (h *hub) meshIDs() []string {
	h.mu.RLock()
	defer h.mu.RUnlock()
	out := make([]string, 0, len(h.byMesh))
	for id := range h.byMesh {
		out = append(out, id)
	}
	return out
}

// toMesh queues frame on every session of the mesh that skip does not exclude, and reports
// whether the mesh has sessions here and how many got the frame. The frame is encoded once by
// the caller; every recipient gets the same bytes.
func (h *hub) toMesh(meshID string, frame []byte, skip func(*session) bool) (local bool, sent int) {
	h.mu.RLock()
	local = len(h.byMesh[meshID]) > 0
	targets := make([]*session, 0, len(h.byMesh[meshID]))
	for s := range h.byMesh[meshID] {
		if skip == nil || !skip(s) {
			targets = append(targets, s)
		}
	}
	h.mu.RUnlock()
	for _, s := range targets { // queueing never blocks, but outside the lock all the same
		s.send(frame, false)
	}
	return local, len(targets)
}

// pingWait bounds the ping of a quiet session (nothing queued or written for writeWait): its
// write goes into a drained socket buffer at once. The margin covers a burst queued between
// the check and the write; the ticker waits that long only then.
const pingWait = time.Second

// ping sends a WebSocket ping to the sessions of one ping slot (see setPingSlots). One ticker
// pings the whole replica in turn: no timer and no write-pump wake-up per socket, and the
// pings of a period are spread over it.
func (h *hub) ping(slot int, now time.Time) {
	h.mu.RLock()
	var due []*session
	if slot < len(h.bySlot) {
		due = make([]*session, 0, len(h.bySlot[slot]))
		for s := range h.bySlot[slot] {
			due = append(due, s)
		}
	}
	h.mu.RUnlock()
	for _, s := range due {
		if s.ws == nil {
			continue
		}
		wc := s.ws.WebsocketConnection()
		if wc == nil {
			continue
		}
		if s.quiet(now) {
			// Each write's deadline from the clock, not the tick: a late tick must not
			// leave the slot's later pings already expired (skipped unwritten).
			_ = wc.WriteControl(websocket.PingMessage, nil, time.Now().Add(pingWait))
			continue
		}
		// Frames on their way or just written: the ping waits its turn with the write
		// timeout every write has (melody's own pings did the same), off the ticker, one at a
		// time per session. A short deadline could expire mid-write on a full socket, and
		// gorilla then gives the connection up before the stall guard's 4008 is written.
		if s.pinging.CompareAndSwap(false, true) {
			go func() {
				defer s.pinging.Store(false)
				_ = wc.WriteControl(websocket.PingMessage, nil, time.Now().Add(writeWait))
			}()
		}
	}
}

// all returns every local session (for resync, drain and shutdown only).
func (h *hub) all() []*session {
	h.mu.RLock()
	defer h.mu.RUnlock()
	out := make([]*session, 0, len(h.byPresence))
	for _, s := range h.byPresence {
		out = append(out, s)
	}
	return out
}

func (h *hub) len() int {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return len(h.byPresence)
}
