package broker

import (
	"context"
	"log/slog"

	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/pgbus"
	"github.com/claudemesh/broker/protocol"
)

// KickMember closes every live session of a member on every replica (close code 4002 for
// a revocation, 4001 for an admin kick). It only needs the database, so the admin CLI, a
// separate process, uses it too. namespace "" is the default bus namespace.
func KickMember(ctx context.Context, q db.DBTX, namespace, memberID string, code int) error {
	if namespace == "" {
		namespace = pgbus.DefaultNamespace
	}
	var o pgbus.Outbox
	o.Add(pgbus.ClusterChannel(namespace), pgbus.Message{Kind: pgbus.KindKick, Member: memberID, Code: code})
	_, err := pgbus.Send(ctx, db.New(q), &o)
	return err
}

// RevokeHook is the membership OnRevoke callback that closes a revoked member's sessions.
func RevokeHook(q db.DBTX, namespace string, logger *slog.Logger) func(ctx context.Context, meshID, memberID string) {
	return func(ctx context.Context, meshID, memberID string) {
		if err := KickMember(ctx, q, namespace, memberID, protocol.CloseRevoked); err != nil && logger != nil {
			logger.Warn("close revoked member's sessions; they end at their next hello", "mesh", meshID, "member", memberID, "err", err)
		}
	}
}
