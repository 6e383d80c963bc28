package broker

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// registerNode writes this replica's node row. Presences reference it, so a hello on a
// replica that is not registered yet would fail: Start registers before it serves.
func (s *Server) registerNode(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Heartbeat)
	defer cancel()
	if _, err := s.q.NodeRegister(ctx, db.NodeRegisterParams{ID: s.nodeID, Region: s.cfg.Region, Address: s.Addr(), Version: Version}); err != nil {
		if ctx.Err() == nil {
			s.log.Warn("register node", "err", err)
		}
		return false
	}
	return true
}

// runNode heartbeats the node row and takes over nodes that went silent. A registration
// that failed at Start is retried on every beat, so a replica started while Postgres is
// down joins when it returns.
func (s *Server) runNode(ctx context.Context, registered bool) {
	var dbUpSince time.Time // start of the current unbroken run of successful heartbeats
	lastOK := time.Now()
	sentAway := false // sessions already sent elsewhere during this outage
	t := time.NewTicker(s.cfg.Heartbeat)
	defer t.Stop()
	for {
		opCtx, cancel := context.WithTimeout(ctx, s.cfg.Heartbeat)
		ok := false
		if !registered {
			registered = s.registerNode(ctx)
			ok = registered
		} else if _, err := s.q.NodeHeartbeat(opCtx, s.nodeID); err != nil {
			if errors.Is(err, pgx.ErrNoRows) {
				// Another replica declared us dead (we were cut off from Postgres): our
				// presences were handed to the grace sweep. Re-register, and send our peers
				// to reconnect so their presences are registered afresh.
				s.log.Warn("this node was declared dead by a peer; re-registering and asking sessions to reconnect")
				registered = false
				s.reconnectAll()
			} else if ctx.Err() == nil {
				s.log.Warn("heartbeat", "err", err)
			}
		} else {
			ok = true
		}
		cancel()
		if ok {
			lastOK, sentAway = time.Now(), false
			if dbUpSince.IsZero() {
				dbUpSince = time.Now()
			}
			// Judge others only once we have been connected for a whole deadline ourselves:
			// after a Postgres outage every heartbeat is stale, and the first replica back
			// must not declare all the others dead.
			if time.Since(dbUpSince) > s.cfg.NodeDeadAfter {
				s.takeOverDeadNodes(ctx)
			}
		} else {
			dbUpSince = time.Time{}
			// Cut off from Postgres we can neither store nor route: send the peers to a
			// healthy replica before the others declare us dead, so they resume there
			// instead of being listed as gone.
			if !sentAway && time.Since(lastOK) > s.cfg.NodeDeadAfter/2 && s.hub.len() > 0 {
				s.log.Warn("Postgres unreachable; asking sessions to reconnect to another replica", "sessions", s.hub.len())
				s.reconnectAll()
				sentAway = true
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// reconnectAll closes every local session with 1012 so its peer reconnects (anywhere).
func (s *Server) reconnectAll() {
	for _, sess := range s.hub.all() {
		closeWith(sess.ws, protocol.CloseDraining, "reconnect")
	}
}

// takeOverDeadNodes marks silent nodes dead, puts their presences in grace and releases
// their unacked pushes, then wakes the replicas holding the recipients. Several replicas may
// race here; the UPDATE decides who handles each node.
func (s *Server) takeOverDeadNodes(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var dead []string
	err := s.inTx(ctx, func(q *db.Queries, o *pgbus.Outbox) ([]audit.Entry, error) {
		nodes, err := q.MarkDeadNodes(ctx, s.cfg.NodeDeadAfter.Seconds())
		if err != nil {
			return nil, err
		}
		for _, n := range nodes {
			dead = append(dead, n.ID)
			until := n.HeartbeatAt.Add(s.cfg.Grace())
			if err := q.GraceDeadNodePresence(ctx, db.GraceDeadNodePresenceParams{NodeID: n.ID, GraceUntil: &until}); err != nil {
				return nil, err
			}
			released, err := q.ReleaseNodePushes(ctx, &n.ID)
			if err != nil {
				return nil, err
			}
			byMesh := map[string][]string{}
			for _, r := range released {
				byMesh[r.MeshID] = append(byMesh[r.MeshID], r.RecipientMemberID)
			}
			if err := s.wakeHolders(ctx, q, o, byMesh); err != nil {
				return nil, err
			}
		}
		return nil, nil
	})
	if err != nil {
		if ctx.Err() == nil {
			s.log.Warn("dead node takeover", "err", err)
		}
		return
	}
	for _, id := range dead {
		s.metrics.DeadNodes.Inc()
		s.log.Warn("node declared dead; its sessions are in grace and its unacked pushes released", "dead_node", id)
	}
	if len(dead) > 0 {
		s.sweepGrace(ctx) // presences whose grace already ran out leave now
	}
}
