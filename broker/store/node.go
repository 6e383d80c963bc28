package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/db"
)

// TakeOverDeadNodes marks nodes silent past deadAfter dead, then, for every dead node (those
// just marked and any left over from earlier checks), puts its presences in grace (counted
// from its last heartbeat) and releases its unacked pushes. Several replicas may race here:
// the UPDATE decides who marks each node, and rows another statement holds are left to the
// next check. It returns the nodes it marked and the members whose pushes it released.
func (t *Tx) TakeOverDeadNodes(ctx context.Context, deadAfter, grace time.Duration) ([]DeadNode, []string, error) {
	nodes, err := t.q.MarkDeadNodes(ctx, deadAfter.Seconds())
	if err != nil {
		return nil, nil, fmt.Errorf("mark dead nodes: %w", err)
	}
	marked := make([]DeadNode, 0, len(nodes))
	for _, n := range nodes {
		marked = append(marked, DeadNode{ID: n.ID, HeartbeatAt: n.HeartbeatAt})
	}
	if err := t.q.GraceDeadNodesPresences(ctx, grace.Seconds()); err != nil {
		return nil, nil, fmt.Errorf("grace dead nodes' presences: %w", err)
	}
	members, err := t.q.ReleaseDeadNodesPushes(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("release dead nodes' pushes: %w", err)
	}
	return marked, members, nil
}

// StatusPageNode is one node as the status page shows it.
type StatusPageNode struct {
	ID, Region, Version     string
	StartedAt               time.Time
	Stopped, Dead           bool
	HeartbeatAgeSeconds     float64
	Sessions, GraceSessions int64
}

// StatusPageMesh is one busy mesh with its first peers.
type StatusPageMesh struct {
	ID, Slug, Name                                    string
	LiveSessions, GraceSessions, LiveMembers, Members int64
	Peers                                             []StatusPagePeer
}

// StatusPagePeer is one peer of a listed mesh; keys leave the database as short prefixes only.
type StatusPagePeer struct {
	DisplayName, KeyPrefix, NodeID, Status, StatusSource string
	InGrace                                              bool
	ConnectedSeconds                                     float64
}

// StatusPage is the cluster view of the admin status page.
type StatusPage struct {
	Nodes                []StatusPageNode
	Meshes               []StatusPageMesh
	MeshTotal            int64
	Pending, Pushed      int64
	OldestPendingSeconds float64
}

// StatusPageLimits caps every list of the status page.
type StatusPageLimits struct {
	RecentGone                   time.Duration
	MaxNodes, MaxMeshes, PerMesh int
}

// StatusPage reads the cluster view in one read-only snapshot, so its counts agree.
func (s *Store) StatusPage(ctx context.Context, lim StatusPageLimits) (StatusPage, error) {
	var page StatusPage
	err := pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		q := s.q.WithTx(tx)
		nodes, err := q.StatusNodes(ctx, db.StatusNodesParams{RecentSeconds: lim.RecentGone.Seconds(), MaxNodes: int32(lim.MaxNodes)})
		if err != nil {
			return fmt.Errorf("status nodes: %w", err)
		}
		for _, n := range nodes {
			page.Nodes = append(page.Nodes, StatusPageNode{ID: n.ID, Region: n.Region, Version: n.Version, StartedAt: n.StartedAt,
				Stopped: n.StoppedAt != nil, Dead: n.DeadAt != nil, HeartbeatAgeSeconds: n.HeartbeatAgeSeconds,
				Sessions: n.Sessions, GraceSessions: n.GraceSessions})
		}
		meshes, err := q.StatusMeshes(ctx, int32(lim.MaxMeshes))
		if err != nil {
			return fmt.Errorf("status meshes: %w", err)
		}
		if page.MeshTotal, err = q.StatusMeshCount(ctx); err != nil {
			return fmt.Errorf("status mesh count: %w", err)
		}
		ids := make([]string, 0, len(meshes))
		index := make(map[string]int, len(meshes))
		for i, m := range meshes {
			ids = append(ids, m.ID)
			index[m.ID] = i
			page.Meshes = append(page.Meshes, StatusPageMesh{ID: m.ID, Slug: m.Slug, Name: m.Name, LiveSessions: m.LiveSessions,
				GraceSessions: m.GraceSessions, LiveMembers: m.LiveMembers, Members: m.Members})
		}
		peers, err := q.StatusPeers(ctx, db.StatusPeersParams{MeshIds: ids, PerMesh: int64(lim.PerMesh)})
		if err != nil {
			return fmt.Errorf("status peers: %w", err)
		}
		for _, p := range peers {
			m := &page.Meshes[index[p.MeshID]]
			m.Peers = append(m.Peers, StatusPagePeer{DisplayName: p.DisplayName, KeyPrefix: p.MemberKeyPrefix, NodeID: p.NodeID,
				Status: p.Status, StatusSource: p.StatusSource, InGrace: p.InGrace, ConnectedSeconds: p.ConnectedSeconds})
		}
		d, err := q.StatusDeliveries(ctx)
		if err != nil {
			return fmt.Errorf("status deliveries: %w", err)
		}
		page.Pending, page.Pushed, page.OldestPendingSeconds = d.Pending, d.Pushed, d.OldestSeconds
		return nil
	})
	return page, err
}

// statisticsTables are the tables a hello reads by key, where a plan made while their
// statistics said they were nearly empty walks a whole index or table (migration 00021). The
// message tables are left to autovacuum: their functions' plans are forced to index probes
// whatever the statistics (00012, 00013, 00015, 00018), and analyzing them as they fill would
// only make every connection plan the send statement again.
var statisticsTables = []string{"member", "mesh", "presence", "session_key"}

const (
	// statisticsMinRows leaves small tables to autovacuum: walking them costs little.
	statisticsMinRows = 1000
	// statisticsGrowth: a table is analyzed once its live rows reach this multiple of the rows
	// its last ANALYZE counted, so a filling table is analyzed each time it doubles.
	statisticsGrowth = 2.0
)

// RefreshStatistics analyzes the tables that outgrew their statistics (a fresh database
// filling up, a surge after a quiet spell) and returns their names. One replica does it at a
// time; the others get none. A table another maintenance command holds is skipped until the
// next call.
func (s *Store) RefreshStatistics(ctx context.Context) ([]string, error) {
	names, err := s.q.RefreshStatistics(ctx, db.RefreshStatisticsParams{
		Tables: statisticsTables, MinRows: statisticsMinRows, Growth: statisticsGrowth})
	if err != nil {
		return nil, fmt.Errorf("refresh statistics: %w", err)
	}
	return names, nil
}
