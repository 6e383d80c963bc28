package broker

import (
	"context"
	"fmt"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// KickMember closes every live session of a member on every replica (close code 4002 for a
// revocation, 4001 for an admin kick). It only needs the database, so the admin CLI, a
// separate process, uses it too. namespace "" is the default bus namespace.
func KickMember(ctx context.Context, exec store.DBTX, namespace, memberID string, code int) error {
	if namespace == "" {
		namespace = pgbus.DefaultNamespace
	}
	var o pgbus.Outbox
	o.Add(pgbus.ClusterChannel(namespace), pgbus.Message{Kind: pgbus.KindKick, Member: memberID, Code: code})
	return store.Notify(ctx, exec, &o)
}

// RevokeHook is the membership OnRevoke callback: in the revocation's transaction, it tells
// every replica to close the member's sessions (the notice leaves with the commit). A notice
// lost anyway, with a replica's LISTEN connection, is applied by that replica's resync.
func RevokeHook(namespace string) func(ctx context.Context, tx store.DBTX, meshID, memberID string) error {
	return func(ctx context.Context, tx store.DBTX, meshID, memberID string) error {
		if err := KickMember(ctx, tx, namespace, memberID, protocol.CloseRevoked); err != nil {
			return fmt.Errorf("notify the replicas to close the member's sessions: %w", err)
		}
		return nil
	}
}
