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

// RevokeHook is the membership OnRevoke callback: in the revocation's transaction, it ends
// the member's presences and tells every replica to close the member's sessions (the notice leaves with the commit). A notice
// lost anyway, with a replica's LISTEN connection, is applied by that replica's resync.
func RevokeHook(namespace string) func(ctx context.Context, tx store.DBTX, meshID, memberID string) error {
	if namespace == "" {
		namespace = pgbus.DefaultNamespace
	}
	return func(ctx context.Context, tx store.DBTX, meshID, memberID string) error {
		// Its presences end with the revocation, those in their grace (or on a replica that
		// died) too, as a ban's do: each live one's replica is told to close it (4002).
		if _, err := store.EndMemberSessions(ctx, tx, namespace, meshID, memberID, protocol.CloseRevoked, "revoked"); err != nil {
			return err
		}
		// And, as before, the member-wide notice (redundant now, harmless: a socket closes once).
		if err := KickMember(ctx, tx, namespace, memberID, protocol.CloseRevoked); err != nil {
			return fmt.Errorf("notify the replicas to close the member's sessions: %w", err)
		}
		return nil
	}
}
