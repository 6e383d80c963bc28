package broker

import (
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/protocol"
)

// A key that is a member of two meshes sees each mesh apart: what a mesh's members send,
// store or ask about never reaches or answers for the other, whatever they name.
func TestMeshesStayApartForAMemberOfBoth(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m1, m2 := c.mesh(0), c.mesh(0)
	alice := m1.member("alice")
	bob, dave := m2.member("bob"), m2.member("dave")
	both1 := m1.member("both")
	both2 := m2.member("both")
	both2.key, both2.pub = both1.key, both1.pub
	_, err := c.pool.Exec(ctxT(t), `UPDATE claudemesh.member SET pubkey = $1 WHERE id = $2`, both1.pub, both2.id)
	require.NoError(t, err)

	a := m1.dial(0, alice)
	in1 := m1.dial(0, both1, func(o *client.Options) { o.SessionID = "in-1" })
	in2 := m2.dial(0, both2, func(o *client.Options) { o.SessionID = "in-2" })
	b, d := m2.dial(0, bob), m2.dial(0, dave)
	require.NoError(t, in1.JoinGroup(ctxT(t), "ops", ""))
	require.NoError(t, b.JoinGroup(ctxT(t), "ops", ""))
	_, err = b.ListPeers(ctxT(t)) // the join is stored before the sends below
	require.NoError(t, err)
	_, err = in1.ListPeers(ctxT(t))
	require.NoError(t, err)

	// Sends of mesh 1 to everyone, to a group and to a key of mesh 2 only.
	for _, target := range []string{"*", "@all", "@ops"} {
		ack, err := a.Send(ctxT(t), target, protocol.PriorityNow, "n", "m1 "+target, "")
		require.NoError(t, err)
		require.True(t, ack.Queued, ack.Error)
		require.Equal(t, "m1 "+target, nextPush(t, in1, 5*time.Second).Ciphertext)
	}
	ack, err := a.Send(ctxT(t), bob.pub, protocol.PriorityNow, "n", "to bob", "")
	require.Equal(t, protocol.CodeNoRecipient, ack.Error, "a key of another mesh is no recipient (%v)", err)
	probe(t, d, "*", b, in2)

	// The same client_message_id in both meshes: two messages, each delivered.
	first, err := in1.SendMessage(ctxT(t), &protocol.Send{TargetSpec: alice.pub, Priority: protocol.PriorityNow,
		Nonce: "n", Ciphertext: "one", ClientMessageID: "same"})
	require.NoError(t, err)
	second, err := in2.SendMessage(ctxT(t), &protocol.Send{TargetSpec: bob.pub, Priority: protocol.PriorityNow,
		Nonce: "n", Ciphertext: "two", ClientMessageID: "same"})
	require.NoError(t, err)
	require.False(t, second.Duplicate)
	require.NotEqual(t, first.MessageID, second.MessageID)
	p := nextPush(t, b, 5*time.Second)
	require.Equal(t, "two", p.Ciphertext)
	require.Equal(t, both2.id, p.SenderMemberID, "the sender as the mesh knows it")

	// message_status of mesh 1's message, asked in mesh 2 by a party to it.
	_, err = in2.MessageStatus(ctxT(t), first.MessageID)
	var perr *protocol.Error
	require.True(t, errors.As(err, &perr), "%v", err)
	require.Equal(t, protocol.CodeNotFound, perr.Code)

	// Shared state and its changes.
	require.NoError(t, in1.SetState(ctxT(t), "secret", "m1"))
	got, err := in1.GetState(ctxT(t), "secret")
	require.NoError(t, err)
	require.JSONEq(t, `"m1"`, string(got.Value))
	got, err = in2.GetState(ctxT(t), "secret")
	require.NoError(t, err)
	require.Equal(t, "null", string(orNull(got.Value)))
	entries, err := b.ListState(ctxT(t))
	require.NoError(t, err)
	require.Empty(t, entries)
	require.NoError(t, d.SetState(ctxT(t), "mine", "m2"))
	select {
	case sc := <-b.StateChanges():
		require.Equal(t, "mine", sc.Key, "mesh 1's change is not told in mesh 2")
	case <-time.After(5 * time.Second):
		t.Fatal("no state_change within 5s")
	}

	// Peers.
	peers, err := b.ListPeers(ctxT(t))
	require.NoError(t, err)
	require.Len(t, peers, 3)
	for _, pr := range peers {
		require.NotEqual(t, alice.pub, pr.Pubkey)
		require.NotEqual(t, "in-1", pr.SessionID)
	}
}

func orNull(v json.RawMessage) json.RawMessage {
	if len(v) == 0 {
		return json.RawMessage("null")
	}
	return v
}
