package broker

import (
	"encoding/json"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// signals builds the bus messages a change sends to other replicas, into the outbox of the
// transaction that makes the change.
type signals struct {
	bus    *pgbus.Bus
	nodeID string
}

func peerEventData(presenceID, pubkey, displayName, status string) json.RawMessage {
	b, _ := json.Marshal(map[string]string{"presenceId": presenceID, "pubkey": pubkey, "displayName": displayName, "status": status})
	return b
}

// event queues a system event for every replica (each pushes it to its own sessions).
func (n signals) event(o *pgbus.Outbox, meshID, aboutMember, event string, data json.RawMessage) {
	o.Add(n.bus.ClusterChannel(), pgbus.Message{Kind: pgbus.KindEvent, Mesh: meshID, Member: aboutMember, Key: event, Data: data})
}

// statusChanged queues the owning node's wake-up and the mesh's peer_status event.
func (n signals) statusChanged(o *pgbus.Outbox, c store.StatusChange) {
	o.Add(n.bus.NodeChannel(c.NodeID), pgbus.Message{Kind: pgbus.KindStatus, Presence: c.ID})
	n.event(o, c.MeshID, c.MemberID, protocol.EventPeerStatus, peerEventData(c.ID, c.RoutingKey(), c.DisplayName, c.Status))
}

// presenceEnded queues the peer_left event and returns the audit entry of an ended presence.
func (n signals) presenceEnded(o *pgbus.Outbox, p store.EndedPresence) audit.Entry {
	n.event(o, p.MeshID, p.MemberID, protocol.EventPeerLeft, peerEventData(p.ID, p.RoutingKey(), p.DisplayName, ""))
	return audit.Entry{MeshID: p.MeshID, Type: audit.PeerDisconnected, Actor: p.RoutingKey(),
		Data: map[string]any{"presence_id": p.ID, "node": n.nodeID}}
}

// pendingFor wakes every replica for members with deliveries pending again: each looks for its
// own sessions of them, including one registering right now (see migration 00040).
func (n signals) pendingFor(o *pgbus.Outbox, members []string) {
	for _, m := range members {
		o.Add(n.bus.ClusterChannel(), pgbus.Message{Kind: pgbus.KindDeliveries, Member: m})
	}
}
