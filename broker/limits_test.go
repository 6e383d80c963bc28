package broker

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// A member's writes and reads beyond their buckets are refused rate_limited with the request's
// _reqId, before the database: nothing refused is stored, the session stays open, the member's
// other sessions on the replica share the bucket, and other members are not slowed.
func TestRequestsBeyondTheMembersRateAreRefused(t *testing.T) {
	t.Parallel()
	const burst, sent = 5, 20
	c := newCluster(t, 1, func(cfg *Config) {
		cfg.WriteRatePerMember, cfg.WriteBurstPerMember = 1, burst
		cfg.ReadRatePerMember, cfg.ReadBurstPerMember = 1, burst
	})
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	a2 := m.dial(0, alice, func(o *client.Options) { o.SessionID = "s-alice-2" })
	b := m.dial(0, bob)
	ctx := ctxT(t)

	// rateLimited drains cl's unmatched errors, which a request answered after them makes
	// complete (replies come in request order), and returns the _reqIds refused rate_limited.
	rateLimited := func(cl *client.Client) map[string]bool {
		t.Helper()
		_, _ = cl.GetState(ctx, "barrier") // its own refusal, if any, is its answer
		out := map[string]bool{}
		for {
			select {
			case e := <-cl.Errors():
				require.Equal(t, protocol.CodeRateLimited, e.Code, e.Message)
				require.Contains(t, e.Message, "WRITE_RATE_PER_MEMBER")
				out[e.ReqID] = true
			default:
				return out
			}
		}
	}

	start := time.Now()
	reqs := make([]*protocol.SetState, sent)
	for i := range reqs {
		reqs[i] = &protocol.SetState{Key: fmt.Sprintf("k%02d", i), Value: []byte(`1`)}
		require.NoError(t, a.Notify(ctx, reqs[i]))
	}
	refused := rateLimited(a)
	// The bucket holds burst tokens and gains one a second.
	require.GreaterOrEqual(t, len(refused), sent-burst-1-int(time.Since(start).Seconds()))
	require.NotEmpty(t, refused)
	// Exactly the writes not refused were stored, and bob was told of those only.
	list, err := b.ListState(ctx)
	require.NoError(t, err)
	stored := map[string]bool{}
	for _, e := range list {
		stored[e.Key] = true
	}
	for _, r := range reqs {
		require.NotEqual(t, refused[r.ReqID], stored[r.Key], "%s (%s): refused %v, stored %v", r.Key, r.ReqID, refused[r.ReqID], stored[r.Key])
	}
	require.Len(t, stored, sent-len(refused))
	for range stored {
		nextStateChange(t, b, 5*time.Second)
	}

	// alice's other session shares her bucket; bob has his own.
	require.NoError(t, a2.SetState(ctx, "from-a2", 1))
	require.Len(t, rateLimited(a2), 1, "alice's second session is refused too")
	for i := range burst {
		require.NoError(t, b.SetState(ctx, fmt.Sprintf("bob%d", i), i))
	}
	require.Empty(t, rateLimited(b), "bob is not slowed by alice")

	// Reads have their own bucket: a refusal is the reply to the request, with its _reqId.
	var readRefusals int
	for range sent {
		_, err := a.ListPeers(ctx)
		var pe *protocol.Error
		if errors.As(err, &pe) {
			require.Equal(t, protocol.CodeRateLimited, pe.Code)
			require.Contains(t, pe.Message, "list_peers: ")
			require.Contains(t, pe.Message, "READ_RATE_PER_MEMBER")
			readRefusals++
			continue
		}
		require.NoError(t, err)
	}
	require.Positive(t, readRefusals)

	// Still open: once the bucket has a token again, alice writes.
	select {
	case <-a.Done():
		t.Fatalf("alice's session ended: %v", a.Err())
	default:
	}
	dbtest.WaitFor(t, 10*time.Second, "alice writes again once her bucket has a token", func() bool {
		require.NoError(t, a.SetState(ctx, "later", 1))
		return len(rateLimited(a)) == 0
	})
	require.Equal(t, "later", nextStateChange(t, b, 5*time.Second).Key)
}

// A member can't refill its buckets by reconnecting: its last session here gone, the next one
// (under a fresh session id) takes up the same buckets, while a member that never spent
// anything leaves nothing behind.
func TestReconnectingKeepsTheMembersBuckets(t *testing.T) {
	t.Parallel()
	const burst = 20
	c := newCluster(t, 1, func(cfg *Config) { cfg.ReadRatePerMember, cfg.ReadBurstPerMember = 1, burst })
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	ctx := ctxT(t)
	h := c.nodes[0].hub
	gone := func(mem *testMember) func() bool {
		return func() bool {
			h.mu.RLock()
			defer h.mu.RUnlock()
			return len(h.byMember[mem.id]) == 0
		}
	}
	// refusals sends n reads and counts those refused rate_limited.
	refusals := func(cl *client.Client, n int) int {
		t.Helper()
		refused := 0
		for range n {
			_, err := cl.ListPeers(ctx)
			var pe *protocol.Error
			if errors.As(err, &pe) {
				require.Equal(t, protocol.CodeRateLimited, pe.Code, pe.Message)
				refused++
				continue
			}
			require.NoError(t, err)
		}
		return refused
	}

	start := time.Now()
	a := m.dial(0, alice)
	require.Positive(t, refusals(a, burst+1), "alice spent her bucket")
	require.NoError(t, a.Close())
	dbtest.WaitFor(t, 10*time.Second, "alice's session gone from the replica", gone(alice))
	a2 := m.dial(0, alice, func(o *client.Options) { o.SessionID = "fresh-id" })
	// A token a second comes back meanwhile, no more.
	require.GreaterOrEqual(t, refusals(a2, burst), burst-1-int(time.Since(start).Seconds()),
		"alice's new session starts from her spent bucket, not a full one")

	b := m.dial(0, bob)
	require.NoError(t, b.Close())
	dbtest.WaitFor(t, 10*time.Second, "bob's session gone from the replica", gone(bob))
	h.mu.RLock()
	require.False(t, h.spentLimits.Contains(bob.id), "bob spent nothing: nothing kept")
	h.mu.RUnlock()
	require.Zero(t, refusals(m.dial(0, bob), burst), "bob's bucket is full")
}

// dialFat dials a session of mem whose listing is as large as the protocol lets a client make
// it: cwd, groups, names and summary at their limits, in characters JSON escapes as six bytes
// where the frame leaves room. A list_peers answers each such session with about 97 KB.
func dialFat(t *testing.T, m *testMesh, node int, mem *testMember, sessionID string) *client.Client {
	t.Helper()
	groups := make([]protocol.Group, protocol.MaxGroups)
	for i := range groups {
		groups[i] = protocol.Group{Name: fmt.Sprintf("%s%03d", strings.Repeat("g", protocol.MaxGroupNameLen-3), i),
			Role: strings.Repeat("\x01", protocol.MaxRoleLen)}
	}
	long := strings.Repeat("h", protocol.MaxDisplayNameLen)
	cl := m.dial(node, mem, func(o *client.Options) {
		o.SessionID, o.CWD, o.Groups, o.DisplayName = sessionID, strings.Repeat("\x01", protocol.MaxCWDLen), groups, long
		o.Hostname, o.Model, o.PeerType, o.Channel = long, long, long[:protocol.MaxRoleLen], long[:protocol.MaxRoleLen]
	})
	ctx := ctxT(t)
	require.NoError(t, cl.SetSummary(ctx, strings.Repeat("\x01", protocol.MaxSummaryLen)))
	_, err := cl.GetState(ctx, "barrier") // answered once the summary is stored
	require.NoError(t, err)
	return cl
}

// A list_peers is a few bytes and answers the whole mesh: with sessions whose summaries, cwds
// and groups are at their limits, about 97 KB each, 9.7 MB for a mesh of 100, which one member
// could ask for 20 times a second (READ_RATE_PER_MEMBER) and, from sessions that do not read,
// leave queued. A member's list replies on a replica are bounded in bytes: beyond, its lists are
// refused rate_limited (before any database work) until the bucket refills; its other reads and
// other members' lists go on.
func TestListRepliesAreBoundedInBytes(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.listBytesRate, cfg.listBytesBurst = 1, 256<<10 })
	m := c.mesh(0)
	alice, bob, carol := m.member("alice"), m.member("bob"), m.member("carol")
	for i := range 3 {
		dialFat(t, m, 0, alice, fmt.Sprint("fat-", i))
	}
	b, cl := m.dial(0, bob), m.dial(0, carol)
	ctx := ctxT(t)
	peers, err := b.ListPeers(ctx)
	require.NoError(t, err, "a reply larger than the bucket still goes out once")
	require.Len(t, peers, 5)
	_, err = b.ListPeers(ctx)
	var pe *protocol.Error
	require.ErrorAs(t, err, &pe, "the next list waits for the bucket")
	require.Equal(t, protocol.CodeRateLimited, pe.Code)
	require.Contains(t, pe.Message, "list_peers and list_state replies")
	_, err = b.ListState(ctx)
	require.ErrorAs(t, err, &pe, "list_state shares the bucket")
	_, err = b.GetState(ctx, "k")
	require.NoError(t, err, "other reads go on")
	_, err = cl.ListPeers(ctx)
	require.NoError(t, err, "another member has its own bucket")
}
