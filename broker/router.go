package broker

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"time"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// pollInterval is the slow catch-up: a lost notification delays a delivery by at most this.
const pollInterval = 3 * time.Second

// router applies what other replicas signal over the bus to this replica's sessions, and
// catches up after every (re)connect of the LISTEN connection, after a queue overflow and on
// a slow poll, so a lost notification only delays, never loses.
type router struct {
	service
	bus     *pgbus.Bus
	store   *store.Store
	hub     *hub
	pusher  *pusher
	nodeID  string
	poll    time.Duration // the catch-up poll's period (pollInterval)
	log     *slog.Logger
	metrics *Metrics
	pushes  []assigned // gathered while applying a run of messages
	// idled: sessions a status notice made idle after a wake-up for a held priority was skipped
	// for them; claimed for once the run's pushes are out (see KindStatus).
	idled []*session
	// fullOwed: a full catch-up failed (the database away or slow); the next poll runs it in
	// full, since only a full one applies the notices lost with the connection or an overflow.
	fullOwed bool
	// stateOwed, stateFrom: shared-state changes from stateFrom (database clock, unix
	// microseconds; 0: from the start) on may not have reached the local sessions (notices lost,
	// a read-back failed); catchUpState tells them, at the next resync or poll.
	stateOwed bool
	stateFrom int64
	// told is what the local sessions were last told of each key (the write's time): a
	// catch-up does not tell them a change again, and a notice applied after a catch-up does
	// not take them back to an older value. Only the router's goroutine touches it.
	told       map[stateKey]int64
	toldPruned int64 // Heard when told was last pruned for room
	// eventsOwed, eventsFrom: as stateOwed and stateFrom, for the system events (peer_joined,
	// peer_left, peer_status) the local sessions may have missed; catchUpEvents tells them.
	eventsOwed bool
	eventsFrom int64
	// seen is what the local sessions were told of each presence (by a notice or a catch-up):
	// a catch-up does not tell an event again, and a notice of what a catch-up told is not sent
	// again. Only the router's goroutine touches it.
	seen       map[string]peerSeen
	seenPruned int64 // Heard when seen was last pruned for room
}

// peerSeen is what the local sessions were told of one presence.
type peerSeen struct {
	joined, left bool
	status       string // the status last told ("": none)
	// caught: status was told by a catch-up, so a notice of the same status is its duplicate.
	caught bool
	// at: the database clock (unix microseconds) at or after every event told of it, by which
	// it is forgotten (pruneSeen).
	at int64
}

// stateKey is a shared-state key of a mesh.
type stateKey struct{ mesh, key string }

// The state catch-up's bounds. stateCatchUpMargin: a write's time is taken before its commit,
// so one committed after the last notice heard may carry a time somewhat before it.
// stateCatchUpPerMesh: a mesh with more changes than this in a gap gets its newest ones (the
// log says some were left out; the sessions are not told, and see the rest on get_state or
// list_state), so the catch-up never floods a socket's queue. stateCatchUpChunk: meshes
// read per statement. maxTold bounds the memo of what was told (a few minutes' writes of busy
// meshes; past it, a catch-up may tell a change twice).
const (
	stateCatchUpMargin  = 10 * time.Second
	stateCatchUpPerMesh = 128
	stateCatchUpChunk   = 16
	maxTold             = 1 << 16
)

// The system events' catch-up bounds, as the state's (same margin and chunk): at most
// eventCatchUpPerMesh presences a mesh, its newest (past it the log says so, and the sessions
// see the rest with list_peers); maxSeen bounds the memo of what was told (past it, an event
// may be told twice).
const (
	eventCatchUpPerMesh = 128
	maxSeen             = 1 << 16
)

// Start applies bus messages until Stop.
func (r *router) Start(ctx context.Context) error {
	return r.start(ctx, func(ctx context.Context) {
		poll := time.NewTicker(r.poll)
		defer poll.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case m := <-r.bus.Messages():
				r.metrics.BusReceived.Inc()
				r.apply(ctx, m)
				// Pushes are gathered over everything already queued, then written: their
				// releases, if any, cost one statement for the lot.
				for more := true; more; {
					select {
					case m := <-r.bus.Messages():
						r.metrics.BusReceived.Inc()
						r.apply(ctx, m)
					default:
						more = false
					}
				}
				r.pusher.pushAssigned(r.pushes)
				r.pushes = r.pushes[:0]
				for _, sess := range r.idled {
					r.pusher.request(sess)
				}
				clear(r.idled)
				r.idled = r.idled[:0]
			case <-r.bus.Resync():
				r.resync(ctx, true)
			case <-poll.C:
				r.resync(ctx, false)
			}
		}
	})
}

func (r *router) apply(ctx context.Context, m pgbus.Message) {
	switch m.Kind {
	case pgbus.KindResync:
		// In order: what came before goes out first; what follows queues behind the catch-up.
		r.pusher.pushAssigned(r.pushes)
		r.pushes = r.pushes[:0]
		r.resync(ctx, true)
	case pgbus.KindDeliveries:
		// The pushes gathered so far go out first. A release sends its inline pushes and then a
		// wake-up for what could not ride along, which is younger: the claim the wake-up starts
		// must find them already in the session's window, not overtake them.
		r.pusher.pushAssigned(r.pushes)
		r.pushes = r.pushes[:0]
		// For the member's sessions, or for one session (a multicast's row for a session in
		// its grace, which a hello may be resuming). A send's wake-up names its priority (Key):
		// a claim for a session that may not take it now would find nothing. (Left to the
		// catch-up poll, as before these wake-ups: a next message whose send committed while
		// a change to idle ran, unseen by its release, and whose wake-up came before the
		// change's notification.)
		sessions := []*session(nil)
		if m.Presence != "" {
			if sess := r.hub.wakeSession(m.Presence); sess != nil {
				sessions = append(sessions, sess)
			}
		} else {
			sessions = r.hub.wakeMember(m.Member)
		}
		for _, sess := range sessions {
			if sess.mayTake(protocol.Priority(m.Key)) {
				r.pusher.request(sess)
			} else {
				sess.heldWakeSkipped()
			}
		}
	case pgbus.KindStatus:
		if sess := r.hub.statusSession(m.Presence); sess != nil {
			if m.Key != "" {
				// From the status statement itself (apply_status), which, for a connected
				// session, also released what it may now take: the inline pushes and a wake-up
				// for the rest follow on this channel. A claim here would only put the session
				// in backlog and send those pushes back to pending to claim them again: two
				// round trips before a held message reaches its recipient.
				sess.setStatus(protocol.Status(m.Key))
				// Unless a wake-up for a held priority was skipped: its send may have read the
				// old status while this change ran, and committed after the release looked, so
				// its row is left pending, and a later send, finding the session idle, would be
				// pushed first. Claimed for after the run's pushes (the release's, if they came
				// along), so those still go straight out; the claim takes the row, and any of
				// the release's still on their way with it, in order.
				if sess.heldWakeTaken() {
					r.idled = append(r.idled, sess)
				}
			} else {
				r.reloadStatus(ctx, sess)
			}
		}
	case pgbus.KindPush:
		var d pgbus.PushData
		if err := json.Unmarshal(m.Data, &d); err != nil {
			r.metrics.BusEvents.WithLabelValues("bad_payload").Inc()
			r.log.Warn("bad push on the bus; resyncing", "err", err)
			// Its delivery stays assigned here: caught up, in order, before what follows.
			r.apply(ctx, pgbus.Message{Kind: pgbus.KindResync})
			return
		}
		r.pushes = append(r.pushes, assigned{presenceID: m.Presence, id: d.DeliveryID, priority: protocol.Priority(d.Priority),
			frame: pushFrame(&store.Push{EnvelopeID: d.EnvelopeID, MeshID: d.MeshID, SenderPubkey: d.SenderPubkey,
				SenderMemberPubkey: d.SenderMemberPubkey, Priority: d.Priority, Nonce: d.Nonce, Ciphertext: d.Ciphertext,
				CreatedAt: time.UnixMicro(d.CreatedMicros), SenderMemberID: d.SenderMemberID, SenderName: d.SenderName,
				ClientMessageID: d.ClientMessageID, RequestFingerprint: d.RequestFingerprint})})
	case pgbus.KindPushFrame:
		r.pushes = append(r.pushes, assigned{presenceID: m.Presence, id: m.ID, priority: protocol.Priority(m.Key), frame: m.Data})
	case pgbus.KindReplace:
		if sess := r.hub.get(m.Presence); sess != nil && m.Node != r.nodeID {
			connOf(sess.ws).end.Set(endReplaced)
			closeWith(sess.ws, protocol.CloseSessionReplaced, protocol.CloseReasonSessionReplaced)
		}
	case pgbus.KindKick:
		reason := m.Key
		switch {
		case reason != "":
		case m.Code == protocol.CloseKicked:
			reason = "kicked"
		default:
			reason = "revoked"
		}
		// Kept for a hello whose statement committed before this notice's and whose session
		// is not in the hub yet: numbered before the lookup (see handleHello).
		r.hub.noteKick(m.Presence, m.Member, m.Code, reason)
		targets := r.hub.memberSessions(m.Member)
		if m.Presence != "" { // one session (kick, ban, replaced): its presence has already ended
			targets = nil
			if sess := r.hub.get(m.Presence); sess != nil {
				targets = append(targets, sess)
			}
		}
		for _, sess := range targets {
			c := connOf(sess.ws)
			if removes(m.Code) { // never undone by a later notice (a takeover's 1000)
				c.removed.Store(true)
			}
			c.end.Set(endNow)
			closeWith(sess.ws, m.Code, reason)
		}
	case pgbus.KindEvent:
		// Remembered even with no session of the mesh here yet: one registering now is told
		// what the notices say from its hello on, and a catch-up must not tell it again.
		var d struct {
			PresenceID string `json:"presenceId"`
			Status     string `json:"status"`
		}
		// Unreadable, or without a presence: sent as it is, not remembered.
		if json.Unmarshal(m.Data, &d) == nil && d.PresenceID != "" && !r.noteEvent(m.Key, d.PresenceID, d.Status) {
			return // a catch-up told it already
		}
		_ = r.tellEvent(m.Mesh, m.Member, m.Key, m.Data, time.Now(), nil)
	case pgbus.KindState:
		if m.ID != 0 && r.told[stateKey{m.Mesh, m.Key}] >= m.ID {
			return // a catch-up told this write, or a later one, already
		}
		change := m.Data
		// Too large to ride along: read it back. set_state writes the line's "x" as null then
		// (json_build_object keeps the member), which is no frame to send.
		if len(change) == 0 || string(change) == "null" {
			qctx, cancel := context.WithTimeout(ctx, opTimeout)
			e, err := r.store.GetState(qctx, m.Mesh, m.Key)
			cancel()
			if err != nil && !errors.Is(err, store.ErrNotFound) {
				r.metrics.backgroundError(r.log, "load_changed_state", err, "mesh", m.Mesh, "retry", "state catch-up")
				if m.ID != 0 {
					r.oweState(m.ID)
				}
				return
			}
			if m.ID != 0 && (err != nil || e.UpdatedAt.UnixMicro() != m.ID) {
				// Changed again or deleted since this write (00059 names it in ID): the later
				// change's own notice follows, and is sent in its turn. Sending what is stored
				// now would tell the sessions the newer value before the ones between.
				return
			}
			if err != nil { // deleted since (null deletes, 00047): the key as readers now see it
				e = store.StateEntry{Key: m.Key, Value: json.RawMessage("null")}
			}
			change, _ = json.Marshal(&protocol.StateChange{Key: e.Key, Value: e.Value, UpdatedBy: e.UpdatedBy})
		}
		if local, _ := r.hub.toMesh(m.Mesh, change, func(s *session) bool { return s.presenceID == m.Presence }); local && m.ID != 0 {
			r.noteTold(stateKey{m.Mesh, m.Key}, m.ID)
		}
	}
}

// tellEvent sends a system event to the local sessions of the mesh that asked for them, never
// to the sessions of the member it is about, nor to those skip names (nil: none), and reports
// how many it was sent to.
func (r *router) tellEvent(mesh, aboutMember, event string, data json.RawMessage, at time.Time, skip func(*session) bool) int {
	frame, _ := protocol.Encode(&protocol.Push{MessageID: "", MeshID: mesh, SenderPubkey: protocol.SenderSystem,
		Priority: protocol.PriorityNow, Subtype: protocol.SubtypeSystem, Event: event, EventData: data,
		CreatedAt: protocol.FormatTime(at)})
	_, sent := r.hub.toMesh(mesh, frame, func(s *session) bool {
		return !s.systemEvents || s.memberID == aboutMember || (skip != nil && skip(s))
	})
	return sent
}

// noteEvent remembers a notice's event about a presence and reports whether to send it: not
// when a catch-up told it already (its notice came after the catch-up's read), nor an event
// about a presence the sessions were told has left (its notice, committed before the end, came
// after a catch-up that told the end).
func (r *router) noteEvent(event, presence, status string) bool {
	e := r.seen[presence]
	switch event {
	case protocol.EventPeerJoined:
		if e.joined || e.left {
			return false
		}
		e.joined, e.status, e.caught = true, status, false
	case protocol.EventPeerStatus:
		if e.left {
			return false
		}
		if e.caught && e.status == status {
			e.caught = false // once: a later notice of the same status is a change of its own
			r.noteSeen(presence, e)
			return false
		}
		e.status, e.caught = status, false
	case protocol.EventPeerLeft:
		if e.left {
			return false
		}
		e.left = true
	default:
		return true
	}
	// The event's time is before its commit, which came before the next ping; a replica whose
	// pings stop for longer than the margin replaces its connection, a gap read from what it
	// heard last.
	e.at = max(e.at, r.bus.Heard()+stateCatchUpMargin.Microseconds())
	r.noteSeen(presence, e)
	return true
}

// noteSeen stores what the local sessions were told of a presence, within maxSeen.
func (r *router) noteSeen(presence string, e peerSeen) {
	if r.seen == nil {
		r.seen = map[string]peerSeen{}
	}
	if _, ok := r.seen[presence]; !ok && len(r.seen) >= maxSeen {
		// At most once per ping heard: in a burst of hellos, a full memo of events all within
		// the margin would otherwise be walked for every one.
		if heard := r.bus.Heard(); heard != r.seenPruned {
			r.seenPruned = heard
			r.pruneSeen()
		}
		if len(r.seen) >= maxSeen {
			return // a later catch-up may tell it again: the same event, harmless
		}
	}
	r.seen[presence] = e
}

// pruneSeen forgets what no catch-up can read again (as pruneTold).
func (r *router) pruneSeen() {
	floor := r.bus.Heard() - stateCatchUpMargin.Microseconds()
	for p, e := range r.seen {
		if e.at < floor {
			delete(r.seen, p)
		}
	}
}

// oweEvents records that the system events from `from` on (database clock, unix microseconds)
// may not have reached the local sessions.
func (r *router) oweEvents(from int64) {
	if !r.eventsOwed || from < r.eventsFrom {
		r.eventsOwed, r.eventsFrom = true, from
	}
}

// oweState records that the shared-state changes from `from` on (database clock, unix
// microseconds) may not have reached the local sessions.
func (r *router) oweState(from int64) {
	if !r.stateOwed || from < r.stateFrom {
		r.stateOwed, r.stateFrom = true, from
	}
}

// noteTold remembers that the local sessions of k's mesh were told k's write of time at.
func (r *router) noteTold(k stateKey, at int64) {
	if r.told == nil {
		r.told = map[stateKey]int64{}
	}
	if _, ok := r.told[k]; !ok && len(r.told) >= maxTold {
		// At most once per ping heard, as noteSeen: a full memo of changes all within the
		// margin (a burst of writes) would otherwise be walked for every one.
		if heard := r.bus.Heard(); heard != r.toldPruned {
			r.toldPruned = heard
			r.pruneTold()
		}
		if len(r.told) >= maxTold {
			return // a later catch-up may tell it again: harmless
		}
	}
	r.told[k] = at
}

// pruneTold forgets what no catch-up can read again: a gap starts at or after what the bus has
// heard, and a catch-up reads from a margin before its start. (Unless the database clock steps
// back meanwhile: then a catch-up may tell a change again, never an older one.)
func (r *router) pruneTold() {
	floor := r.bus.Heard() - stateCatchUpMargin.Microseconds()
	for k, at := range r.told {
		if at < floor {
			delete(r.told, k)
		}
	}
}

// catchUpState tells the local sessions the shared-state changes they may have missed (from
// stateFrom, less the margin), as the notices would have: each mesh's keys written or deleted
// since, oldest first, a deletion as value null, never to the writer's own session, and not
// again what they were told. At most stateCatchUpPerMesh a mesh, its newest.
func (r *router) catchUpState(ctx context.Context) error {
	since := time.UnixMicro(r.stateFrom - stateCatchUpMargin.Microseconds())
	if r.stateFrom == 0 { // nothing was heard before the gap: everything may be new
		since = time.Unix(0, 0)
	}
	return readByMesh(ctx, r.hub.meshIDs(), func(ctx context.Context, chunk []string) ([]store.StateChange, error) {
		return r.store.StateChangesSince(ctx, chunk, since, stateCatchUpPerMesh+1)
	}, func(c store.StateChange) string { return c.MeshID }, r.tellChanges)
}

// readByMesh reads what a catch-up tells, stateCatchUpChunk meshes a statement (each bounded
// by opTimeout), and hands each mesh's rows, which read returns together, to tell.
func readByMesh[T any](ctx context.Context, meshes []string, read func(context.Context, []string) ([]T, error),
	meshOf func(T) string, tell func([]T)) error {
	for len(meshes) > 0 {
		chunk := meshes[:min(len(meshes), stateCatchUpChunk)]
		meshes = meshes[len(chunk):]
		qctx, cancel := context.WithTimeout(ctx, opTimeout)
		rows, err := read(qctx, chunk)
		cancel()
		if err != nil {
			return err
		}
		for len(rows) > 0 {
			n := 1
			for n < len(rows) && meshOf(rows[n]) == meshOf(rows[0]) {
				n++
			}
			tell(rows[:n])
			rows = rows[n:]
		}
	}
	return nil
}

// tellChanges tells the local sessions of one mesh its changes (oldest first).
func (r *router) tellChanges(changes []store.StateChange) {
	mesh := changes[0].MeshID
	if len(changes) > stateCatchUpPerMesh {
		left := len(changes) - stateCatchUpPerMesh
		changes = changes[left:]
		r.metrics.StateCatchUp.WithLabelValues("capped").Inc()
		r.log.Warn("state catch-up capped: the mesh's sessions are told only its newest changes; they see the others with get_state or list_state",
			"mesh", mesh, "told", stateCatchUpPerMesh, "oldest_told", changes[0].At)
	}
	for _, c := range changes {
		k, at := stateKey{mesh, c.Key}, c.At.UnixMicro()
		if r.told[k] >= at {
			continue
		}
		frame, err := protocol.Encode(protocol.StateChange{Key: c.Key, Value: c.Value, UpdatedBy: c.UpdatedBy})
		if err != nil {
			continue
		}
		writer := c.PresenceID
		r.hub.toMesh(mesh, frame, func(s *session) bool { return s.presenceID == writer })
		r.noteTold(k, at)
		r.metrics.StateCatchUp.WithLabelValues("sent").Inc()
	}
}

// catchUpEvents tells the local sessions with system_events the peer_joined, peer_left and
// peer_status they may have missed (from eventsFrom, less the margin), as the notices would
// have, from what the presences are now: a presence that ended, its peer_left; a live one that
// connected since, its peer_joined with its status; another live one whose status changed
// since, its peer_status. Each mesh's oldest first, never to the sessions of the member it is
// about, not what they were told already. At most eventCatchUpPerMesh a mesh, its newest.
func (r *router) catchUpEvents(ctx context.Context) error {
	since := time.UnixMicro(r.eventsFrom - stateCatchUpMargin.Microseconds())
	if r.eventsFrom == 0 { // nothing was heard before the gap: everything may be new
		since = time.Unix(0, 0)
	} else if time.Since(time.UnixMicro(r.eventsFrom)) > store.EndedPresenceRetention {
		// By this replica's clock: the next ping, which says the database's, may not be back yet.
		r.log.Warn("system event catch-up after a gap longer than ended presences are kept: peers that left early in it are not told; sessions see them with list_peers",
			"gap_from", time.UnixMicro(r.eventsFrom), "kept", store.EndedPresenceRetention)
	}
	return readByMesh(ctx, r.hub.meshIDs(), func(ctx context.Context, chunk []string) ([]store.PresenceChange, error) {
		return r.store.PresenceChangesSince(ctx, chunk, since, eventCatchUpPerMesh+1)
	}, func(c store.PresenceChange) string { return c.MeshID },
		func(rows []store.PresenceChange) { r.tellPresenceChanges(rows, since) })
}

// tellPresenceChanges tells the local sessions of one mesh the events of its changed
// presences (oldest first).
func (r *router) tellPresenceChanges(changes []store.PresenceChange, since time.Time) {
	mesh := changes[0].MeshID
	if len(changes) > eventCatchUpPerMesh {
		changes = changes[len(changes)-eventCatchUpPerMesh:]
		r.metrics.EventCatchUp.WithLabelValues("capped").Inc()
		r.log.Warn("system event catch-up capped: the mesh's sessions are told only its newest changes; they see the others with list_peers",
			"mesh", mesh, "told", eventCatchUpPerMesh, "oldest_told", changes[0].At)
	}
	// When the mesh's presences that joined in the window did, local sessions among them: a
	// session is told no join older than its own. A hello with no session of the mesh taking
	// events sends no notice (00073), so no replica remembers that join as told, and the
	// catch-up would tell it, late, to a session that connected after it.
	joinedAt := make(map[string]time.Time, len(changes))
	for _, c := range changes {
		if !c.ConnectedAt.Before(since) {
			joinedAt[c.PresenceID] = c.ConnectedAt
		}
	}
	for _, c := range changes {
		e := r.seen[c.PresenceID]
		toldStatus := e.status // the status the sessions were told before this catch-up ("": none)
		var event string
		switch {
		case c.Ended:
			if e.left {
				continue
			}
			event, e.left = protocol.EventPeerLeft, true
		case e.left: // told it left (an end is final): a row read before it
			continue
		case !e.joined && !c.ConnectedAt.Before(since):
			event, e.joined = protocol.EventPeerJoined, true
		case e.status == c.Status: // what they were told (with its peer_joined, or since)
			continue
		default:
			event = protocol.EventPeerStatus
		}
		status := ""
		if !c.Ended {
			status, e.status, e.caught = c.Status, c.Status, true
		}
		e.at = max(e.at, c.At.UnixMicro())
		// When it happened: it reaches the sessions late.
		var later func(*session) bool
		if event == protocol.EventPeerJoined {
			later = func(s *session) bool { t, ok := joinedAt[s.presenceID]; return ok && t.After(c.ConnectedAt) }
		}
		told := r.tellEvent(mesh, c.MemberID, event, peerEventData(c.PresenceID, c.Pubkey, c.DisplayName, status), c.At, later)
		if later != nil && c.At.After(c.ConnectedAt) && c.Status != toldStatus {
			// The sessions that joined after it saw it in their hellos, with the status it had
			// then; its status changed since (At is the change), and that notice may be the one
			// lost: they are told the status, as they would have been.
			told += r.tellEvent(mesh, c.MemberID, protocol.EventPeerStatus, peerEventData(c.PresenceID, c.Pubkey, c.DisplayName, status),
				c.At, func(s *session) bool {
					t, ok := joinedAt[s.presenceID]
					return !ok || !t.After(c.ConnectedAt) || t.After(c.At)
				})
		}
		r.noteSeen(c.PresenceID, e)
		if told > 0 {
			r.metrics.EventCatchUp.WithLabelValues("sent").Inc()
		}
	}
}

// removes reports whether a close code takes the member out (kicked, banned or revoked): its
// socket takes no more requests. A session replaced or disconnected is still the member's.
func removes(code int) bool { return code == protocol.CloseKicked || code == protocol.CloseRevoked }

// closeStale closes a local socket whose presence is no longer its own, found by a full
// resync: the notice that would have closed it (a kick, a revocation, a takeover) was lost with
// the LISTEN connection or in an overflow, and the socket could still send. Revoked: 4002, as
// the kick says. Taken over here by a newer socket: session_replaced. Ended or moved away (a
// kick, a takeover on another replica, this replica declared dead meanwhile): 1001, so a
// client that still runs reconnects and is told what holds (a revoked or banned member is
// refused at hello). Its end is fenced by its epoch: it ends nothing of a newer socket.
func (r *router) closeStale(sess *session, p store.NodePresence, live bool) {
	closeStale(r.log, sess, p, live)
}

func closeStale(log *slog.Logger, sess *session, p store.NodePresence, live bool) {
	c := connOf(sess.ws)
	switch {
	case live && p.Revoked:
		c.removed.Store(true)
		c.end.Set(endNow)
		closeWith(sess.ws, protocol.CloseRevoked, "revoked")
	case live:
		c.end.Set(endReplaced)
		closeWith(sess.ws, protocol.CloseSessionReplaced, protocol.CloseReasonSessionReplaced)
	default:
		c.end.Set(endNow)
		closeWith(sess.ws, protocol.CloseGoingAway, "session ended")
	}
	log.Info("closed a socket whose presence is no longer its own", "presence", sess.presenceID,
		"revoked", p.Revoked, "live_here", live)
}

// reloadStatus reads a local session's status from the table (the truth) and releases held
// messages if it is idle. When the read fails, the next poll re-reads every local status.
func (r *router) reloadStatus(ctx context.Context, sess *session) {
	if !reloadStatus(ctx, r.store, r.pusher, r.metrics, r.log, sess) {
		r.fullOwed = true
	}
}

func reloadStatus(ctx context.Context, st *store.Store, p *pusher, m *Metrics, log *slog.Logger, sess *session) bool {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	status, err := st.PresenceStatus(ctx, sess.presenceID)
	if err != nil {
		m.backgroundError(log, "reload_status", err, "presence", sess.presenceID, "retry", "next poll")
		return false
	}
	noteStatus(p, sess, protocol.Status(status))
	return true
}

// resync claims for this node's sessions that have something claimable, as one indexed query
// asks, taking their status from the table first (the truth: a lost status notification must
// not keep held messages held). After a (re)connect of the LISTEN connection or an overflow
// (full), every local status is re-read too, since anything may have been missed; a full one
// that failed runs in full at the next poll (fullOwed). A replica
// whose sessions are caught up polls with one read-only query and takes no row locks, whatever
// its number of sessions (a second statement gives back orphaned pushes, when there are any).
func (r *router) resync(ctx context.Context, full bool) {
	root := ctx // the state and event catch-ups bound each of their statements themselves
	// Also with no session here: pushes assigned here to sessions that left may wait for it.
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	full = full || r.fullOwed
	if full {
		r.hub.woke() // it claims for the sessions in the hub: a hello not yet there claims itself
		if from, ok := r.bus.TakeGap(); ok {
			r.oweState(from)
			r.oweEvents(from)
		}
	}
	if full && r.hub.len() > 0 {
		// Every session here now registered before the read below: its hello committed first.
		before := r.hub.all()
		statuses, err := r.store.NodeStatuses(ctx, r.nodeID)
		if err != nil {
			r.fullOwed = true
			r.metrics.backgroundError(r.log, "resync", err, "retry", "next poll, in full")
			return
		}
		for _, sess := range before {
			if p, ok := statuses[sess.presenceID]; ok && p.Epoch == sess.epoch && !p.Revoked {
				sess.setStatus(protocol.Status(p.Status))
			} else {
				r.closeStale(sess, p, ok)
			}
		}
		// Pushes assigned to our sessions while notifications were lost are taken by a claim
		// now; until it has run, the pushes that do arrive queue behind them (the session is
		// in backlog): order per recipient holds.
		for _, sess := range r.hub.all() {
			sess.takeAllAssigned()
			r.pusher.request(sess)
		}
	}
	if full {
		r.fullOwed = false
	}
	if r.stateOwed {
		if err := r.catchUpState(root); err != nil {
			r.metrics.backgroundError(r.log, "state_catch_up", err, "retry", "next poll")
		} else {
			r.stateOwed = false
		}
	}
	if r.eventsOwed {
		if err := r.catchUpEvents(root); err != nil {
			r.metrics.backgroundError(r.log, "event_catch_up", err, "retry", "next poll")
		} else {
			r.eventsOwed = false
		}
	}
	if len(r.told) > maxTold/2 {
		r.pruneTold()
	}
	if len(r.seen) > maxSeen/2 {
		r.pruneSeen()
	}
	claimable, orphans, err := r.store.SessionsWithClaimable(ctx, r.nodeID)
	if err != nil {
		r.metrics.backgroundError(r.log, "catch_up", err, "retry", "next poll")
		return
	}
	if len(orphans) > 0 {
		// Assigned here to a session that moved or ended, and never given back: pending again,
		// every replica woken for the member (else its next connection takes them).
		n, err := r.store.GiveBack(ctx, r.nodeID, orphans)
		if err != nil {
			r.metrics.backgroundError(r.log, "catch_up", err, "give_back", len(orphans), "retry", "next poll")
		} else if n > 0 {
			r.log.Info("gave back pushes assigned to sessions gone from this node", "count", n)
		}
	}
	for id, st := range claimable {
		if sess := r.hub.wakeSession(id); sess != nil {
			sess.setStatus(protocol.Status(st))
			r.pusher.request(sess)
		}
	}
}
