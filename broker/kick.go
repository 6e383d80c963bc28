package broker

import (
	"context"
	"log/slog"

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

// RevokeHook is the membership OnRevoke callback that closes a revoked member's sessions.
func RevokeHook(exec store.DBTX, namespace string, logger *slog.Logger) func(ctx context.Context, meshID, memberID string) {
	return func(ctx context.Context, meshID, memberID string) {
		if err := KickMember(ctx, exec, namespace, memberID, protocol.CloseRevoked); err != nil && logger != nil {
			logger.Warn("close revoked member's sessions; they end at their next hello", "mesh", meshID, "member", memberID, "err", err)
		}
	}
}
