package broker

import (
	"encoding/hex"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/protocol"
)

func TestDirectAcrossReplicas(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	b := m.dial(1, bob)
	ctx := ctxT(t)

	ack, err := a.Send(ctx, bob.pub, protocol.PriorityNow, "bm9uY2U=", "Y2lwaGVy", "c1")
	require.NoError(t, err)
	require.True(t, ack.Queued)
	require.Equal(t, "c1", ack.ID)
	p := nextPush(t, b, 5*time.Second)
	require.Equal(t, ack.MessageID, p.MessageID)
	require.Equal(t, alice.pub, p.SenderPubkey)
	require.Equal(t, "Y2lwaGVy", p.Ciphertext)
	require.Equal(t, "bm9uY2U=", p.Nonce)
	require.Equal(t, m.id, p.MeshID)

	// And back, to a member on the other replica; an unknown key is refused.
	ack2, err := b.Send(ctx, alice.pub, protocol.PriorityNext, "n", "c", "")
	require.NoError(t, err)
	require.Equal(t, ack2.MessageID, nextPush(t, a, 5*time.Second).MessageID)
	_, err = a.Send(ctx, "ab"+alice.pub[2:], protocol.PriorityNow, "n", "c", "x")
	require.ErrorContains(t, err, protocol.CodeNoRecipient)
}

func TestBroadcastAndGroupsReachEveryReplica(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	m := c.mesh(0)
	sender := m.member("sender")
	// The sender's second session (another replica) must not get its own broadcast.
	s1 := m.dial(0, sender)
	s2 := m.dial(2, sender, func(o *client.Options) { o.SessionID = "second" })
	eng := m.dial(1, m.member("eng"), func(o *client.Options) { o.Groups = []protocol.Group{{Name: "eng"}} })
	web := m.dial(2, m.member("web"), func(o *client.Options) { o.Groups = []protocol.Group{{Name: "eng/web"}} })
	ops := m.dial(0, m.member("ops"), func(o *client.Options) { o.Groups = []protocol.Group{{Name: "ops"}} })
	engineer := m.dial(1, m.member("engineering"), func(o *client.Options) { o.Groups = []protocol.Group{{Name: "engineering"}} })
	ctx := ctxT(t)

	ack, err := s1.Send(ctx, "*", protocol.PriorityNow, "n", "all", "")
	require.NoError(t, err)
	for _, cl := range []*client.Client{eng, web, ops, engineer} {
		require.Equal(t, ack.MessageID, nextPush(t, cl, 5*time.Second).MessageID)
	}
	ack, err = s1.Send(ctx, "@all", protocol.PriorityNow, "n", "all2", "")
	require.NoError(t, err)
	for _, cl := range []*client.Client{eng, web, ops, engineer} {
		require.Equal(t, ack.MessageID, nextPush(t, cl, 5*time.Second).MessageID)
	}

	gack, err := s1.Send(ctx, "@eng", protocol.PriorityNow, "n", "grp", "")
	require.NoError(t, err)
	require.Equal(t, gack.MessageID, nextPush(t, eng, 5*time.Second).MessageID)
	require.Equal(t, gack.MessageID, nextPush(t, web, 5*time.Second).MessageID, "sub-group eng/web is in @eng")

	// A later broadcast arrives next at ops and engineering: they never saw the @eng message.
	last, err := s1.Send(ctx, "*", protocol.PriorityNow, "n", "fin", "")
	require.NoError(t, err)
	require.Equal(t, last.MessageID, nextPush(t, ops, 5*time.Second).MessageID)
	require.Equal(t, last.MessageID, nextPush(t, engineer, 5*time.Second).MessageID, "@eng must not match engineering")
	// The sender's own sessions got none of its sends: a broadcast by ops is their next push.
	probe(t, ops, "*", s1, s2)
}

// A member with two sessions on two replicas: a send to a session key reaches that session
// only, a send to the member key reaches exactly one of them.
func TestDirectToSessionKeyAcrossReplicas(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	m := c.mesh(0)
	alice, carol := m.member("alice"), m.member("carol")
	k1, _, err := generateKey()
	require.NoError(t, err)
	k2, _, err := generateKey()
	require.NoError(t, err)
	a := m.dial(0, alice)
	s1 := m.dial(1, carol, func(o *client.Options) { o.SessionKey = k1; o.SessionID = "one" })
	s2 := m.dial(2, carol, func(o *client.Options) { o.SessionKey = k2; o.SessionID = "two" })
	ctx := ctxT(t)

	send := func(to string) string {
		t.Helper()
		ack, err := a.Send(ctx, to, protocol.PriorityNow, "bm9uY2U=", "Y2lwaGVy", "")
		require.NoError(t, err)
		return ack.MessageID
	}
	to2 := send(hex.EncodeToString(k2))
	to1 := send(hex.EncodeToString(k1))
	// Each session's next push is the one addressed to it: the other one never arrived first.
	require.Equal(t, to2, nextPush(t, s2, 5*time.Second).MessageID)
	require.Equal(t, to1, nextPush(t, s1, 5*time.Second).MessageID)

	toMember := send(carol.pub)
	marker1, marker2 := send(hex.EncodeToString(k1)), send(hex.EncodeToString(k2))
	got := []string{nextPush(t, s1, 5*time.Second).MessageID, nextPush(t, s2, 5*time.Second).MessageID}
	switch {
	case got[0] == toMember: // session one took it; session two's next is its marker
		require.Equal(t, marker2, got[1])
		require.Equal(t, marker1, nextPush(t, s1, 5*time.Second).MessageID)
	case got[1] == toMember:
		require.Equal(t, marker1, got[0])
		require.Equal(t, marker2, nextPush(t, s2, 5*time.Second).MessageID)
	default:
		t.Fatalf("member-addressed message %s reached neither session first: %v", toMember, got)
	}
}

// A hello that names a group twice is in it once, with the later role, as join_group has it.
func TestHelloNamingAGroupTwiceJoinsItOnce(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	bob := m.dial(0, m.member("bob"), func(o *client.Options) {
		o.Groups = []protocol.Group{{Name: "eng", Role: "member"}, {Name: "ops"}, {Name: "eng", Role: "lead"}}
	})
	peers, err := bob.ListPeers(ctxT(t))
	require.NoError(t, err)
	require.Len(t, peers, 1)
	require.Equal(t, []protocol.Group{{Name: "eng", Role: "lead"}, {Name: "ops"}}, peers[0].Groups)
}
