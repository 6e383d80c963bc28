package protocol

import (
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestEncodeServerMessages(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		msg  json.Marshaler
		want string
	}{
		{"hello_ack", HelloAck{PresenceID: "p1", MemberDisplayName: "Alice", ReqID: "r"},
			`{"type":"hello_ack","presenceId":"p1","memberDisplayName":"Alice","_reqId":"r"}`},
		{"hello_ack resumed", HelloAck{PresenceID: "p1", MemberDisplayName: "A", Resumed: true},
			`{"type":"hello_ack","presenceId":"p1","memberDisplayName":"A","resumed":true}`},
		{"ack queued", Ack{ID: "c1", MessageID: "m1", Queued: true, ReqID: "r"},
			`{"type":"ack","id":"c1","messageId":"m1","queued":true,"_reqId":"r"}`},
		{"ack refused", Ack{Error: CodeNoRecipient},
			`{"type":"ack","id":"","messageId":"","queued":false,"error":"no_recipient"}`},
		{"push", Push{MessageID: "m1", MeshID: "mesh", SenderPubkey: "s", Priority: PriorityNow, Nonce: "n", Ciphertext: "c", CreatedAt: "2024-01-02T03:04:05.006Z"},
			`{"type":"push","messageId":"m1","meshId":"mesh","senderPubkey":"s","priority":"now","nonce":"n","ciphertext":"c","createdAt":"2024-01-02T03:04:05.006Z"}`},
		{"system push", Push{MessageID: "m2", MeshID: "mesh", SenderPubkey: SenderSystem, Priority: PriorityLow, CreatedAt: "t",
			Subtype: SubtypeSystem, Event: EventPeerJoined, EventData: json.RawMessage(`{"pubkey":"k"}`)},
			`{"type":"push","messageId":"m2","meshId":"mesh","senderPubkey":"system","priority":"low","nonce":"","ciphertext":"","createdAt":"t","subtype":"system","event":"peer_joined","eventData":{"pubkey":"k"}}`},
		{"peers_list empty", PeersList{ReqID: "r"}, `{"type":"peers_list","peers":[],"_reqId":"r"}`},
		{"peers_list nil groups", PeersList{Peers: []Peer{{Pubkey: "k", DisplayName: "d", Status: StatusIdle, SessionID: "s", ConnectedAt: "t"}}},
			`{"type":"peers_list","peers":[{"pubkey":"k","displayName":"d","status":"idle","summary":"","groups":[],"sessionId":"s","connectedAt":"t"}]}`},
		{"state_change", StateChange{Key: "k", Value: json.RawMessage(`{"a":1}`), UpdatedBy: "u"},
			`{"type":"state_change","key":"k","value":{"a":1},"updatedBy":"u"}`},
		{"state_result missing", StateResult{Key: "k", ReqID: "r"},
			`{"type":"state_result","key":"k","value":null,"updatedBy":"","updatedAt":"","_reqId":"r"}`},
		{"state_list empty", StateList{}, `{"type":"state_list","entries":[]}`},
		{"message_status_result pending", MessageStatusResult{MessageID: "m", TargetSpec: "@g"},
			`{"type":"message_status_result","messageId":"m","targetSpec":"@g","delivered":false,"recipients":[],"deliveredAt":null}`},
		{"message_status_result delivered", MessageStatusResult{MessageID: "m", TargetSpec: "k", Delivered: true, DeliveredAt: "t",
			Recipients: []RecipientStatus{{Name: "a", Pubkey: "k", Status: RecipientDelivered}}},
			`{"type":"message_status_result","messageId":"m","targetSpec":"k","delivered":true,"recipients":[{"name":"a","pubkey":"k","status":"delivered"}],"deliveredAt":"t"}`},
		{"error", Error{Code: CodeBadRequest, Message: "targetSpec: required string", ID: "c", ReqID: "r"},
			`{"type":"error","code":"bad_request","message":"targetSpec: required string","id":"c","_reqId":"r"}`},
	}
	for _, tt := range tests {
		got, err := Encode(tt.msg)
		require.NoError(t, err, tt.name)
		require.JSONEq(t, tt.want, string(got), tt.name)
		// json.Marshal agrees with Encode.
		viaJSON, err := json.Marshal(tt.msg)
		require.NoError(t, err)
		require.Equal(t, string(got), string(viaJSON), tt.name)

		m, err := DecodeServer(got)
		require.NoError(t, err, tt.name)
		again, err := Encode(m.(json.Marshaler))
		require.NoError(t, err)
		require.JSONEq(t, tt.want, string(again), tt.name)
	}
}

func TestDecodeServer(t *testing.T) {
	t.Parallel()
	m, err := DecodeServer([]byte(`{"type":"ack","id":"c","messageId":"m","queued":true,"_reqId":"r","future":1}`))
	require.NoError(t, err)
	require.Equal(t, &Ack{ID: "c", MessageID: "m", Queued: true, ReqID: "r"}, m)
	require.Equal(t, "r", m.RequestID())
	require.Equal(t, TypeAck, m.Type())

	m, err = DecodeServer([]byte(`{"type":"message_status_result","messageId":"m","deliveredAt":null,"recipients":[]}`))
	require.NoError(t, err)
	require.Empty(t, m.(*MessageStatusResult).DeliveredAt)

	m, err = DecodeServer([]byte(`{"type":"push","messageId":"m"}`))
	require.NoError(t, err)
	require.Empty(t, m.RequestID())

	_, err = DecodeServer([]byte(`{"type":"stream_data"}`))
	require.ErrorIs(t, err, ErrUnknownType)
	_, err = DecodeServer([]byte(`{"x":1}`))
	require.Error(t, err)
	_, err = DecodeServer([]byte(`nope`))
	require.Error(t, err)
	_, err = DecodeServer([]byte(`{"type":"ack","queued":"yes"}`))
	require.Error(t, err)
	require.False(t, errors.Is(err, ErrUnknownType))
}

func TestFormatTime(t *testing.T) {
	t.Parallel()
	tm := time.Date(2024, 1, 2, 3, 4, 5, 6_789_000, time.FixedZone("x", 3600))
	require.Equal(t, "2024-01-02T02:04:05.006Z", FormatTime(tm))
}

func TestEnums(t *testing.T) {
	t.Parallel()
	require.True(t, PriorityNext.Valid())
	require.False(t, Priority("urgent").Valid())
	require.True(t, StatusDND.Valid())
	require.False(t, Status("away").Valid())
	h := &Hello{Capabilities: []string{CapClientAck}}
	require.True(t, h.HasCapability(CapClientAck))
	require.False(t, h.HasCapability(CapSystemEvents))
	a := &ClientAck{BrokerMessageID: "a", BrokerMessageIDs: []string{"b"}}
	require.Equal(t, []string{"a", "b"}, a.IDs())
	require.Equal(t, []string{"b"}, (&ClientAck{BrokerMessageIDs: []string{"b"}}).IDs())
	require.True(t, (&Push{Subtype: SubtypeSystem}).IsSystem())
}
