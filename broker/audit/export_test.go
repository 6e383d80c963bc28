package audit

import (
	"context"

	"github.com/claudemesh/broker/db"
)

// VerifyPaged is Verify reading pages of pageSize entries and calling between(seq) after each
// page is checked, seq being the entry checked last: tests put page ends where they want them
// and act between pages.
func VerifyPaged(ctx context.Context, q db.DBTX, meshID string, pageSize int32, between func(seq int64)) (int, error) {
	return verify(ctx, q, meshID, walk{pageSize: pageSize, between: between})
}
