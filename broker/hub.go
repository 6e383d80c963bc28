package broker

import (
	"strings"
	"sync"
)

// hub indexes this replica's live sessions by presence, mesh, member and group, so routing a
// message never scans all sessions. It holds no SQL and no sockets' I/O.
type hub struct {
	mu         sync.RWMutex
	byPresence map[string]*session
	byMesh     map[string]map[*session]struct{}
	byMember   map[string]map[*session]struct{}
	// byGroup: mesh → group name → sessions; a session in "eng/web" is indexed under "eng/web"
	// only, and group lookups walk the mesh's group names (few) to include sub-groups.
	byGroup map[string]map[string]map[*session]struct{}
}

func newHub() *hub {
	return &hub{
		byPresence: map[string]*session{},
		byMesh:     map[string]map[*session]struct{}{},
		byMember:   map[string]map[*session]struct{}{},
		byGroup:    map[string]map[string]map[*session]struct{}{},
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
func (h *hub) add(s *session) *session {
	h.mu.Lock()
	defer h.mu.Unlock()
	old := h.byPresence[s.presenceID]
	if old != nil {
		h.removeLocked(old)
	}
	h.byPresence[s.presenceID] = s
	addTo(h.byMesh, s.meshID, s)
	addTo(h.byMember, s.memberID, s)
	for _, g := range s.groupNames() {
		h.addGroupLocked(s, g)
	}
	return old
}

func (h *hub) addGroupLocked(s *session, g string) {
	mg := h.byGroup[s.meshID]
	if mg == nil {
		mg = map[string]map[*session]struct{}{}
		h.byGroup[s.meshID] = mg
	}
	addTo(mg, g, s)
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
	removeFrom(h.byMesh, s.meshID, s)
	removeFrom(h.byMember, s.memberID, s)
	if mg := h.byGroup[s.meshID]; mg != nil {
		for _, g := range s.groupNames() {
			removeFrom(mg, g, s)
		}
		if len(mg) == 0 {
			delete(h.byGroup, s.meshID)
		}
	}
}

// setGroups replaces s's group index entries (after join_group/leave_group).
func (h *hub) setGroups(s *session, groups []groupEntry) {
	h.mu.Lock()
	defer h.mu.Unlock()
	registered := h.byPresence[s.presenceID] == s
	if registered {
		if mg := h.byGroup[s.meshID]; mg != nil {
			for _, g := range s.groupNames() {
				removeFrom(mg, g, s)
			}
		}
	}
	s.mu.Lock()
	s.groups = groups
	s.mu.Unlock()
	if registered {
		for _, g := range s.groupNames() {
			h.addGroupLocked(s, g)
		}
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

// inGroup reports whether a session's group g matches target group name: itself or a sub-group.
func inGroup(g, target string) bool {
	return g == target || strings.HasPrefix(g, target+"/")
}
