package protocol

import (
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestAppendStringMatchesEncodingJSON(t *testing.T) {
	t.Parallel()
	cases := []string{
		"", "plain", `quote " and backslash \`, "ctl \x00\x01\x1f\x7f", "\n\r\t\b\f",
		"é ✓ 😀", "bad \xff utf8 \xc3", "seps \u2028 \u2029", "<html>&amp;", strings.Repeat("QUJD", 100) + "\"",
		"exactly8", "1234567\"", "12345678\\", "\xe2\x80",
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		b := make([]byte, rng.IntN(40))
		for i := range b {
			switch rng.IntN(4) {
			case 0:
				b[i] = byte(rng.IntN(256))
			case 1:
				b[i] = `"\<>&`[rng.IntN(5)]
			default:
				b[i] = byte('a' + rng.IntN(26))
			}
		}
		cases = append(cases, string(b))
	}
	for _, s := range cases {
		got := appendString(nil, s)
		require.True(t, json.Valid(got), "%q -> %s", s, got)
		want, err := json.Marshal(s)
		require.NoError(t, err)
		var a, b string
		require.NoError(t, json.Unmarshal(got, &a))
		require.NoError(t, json.Unmarshal(want, &b))
		require.Equal(t, b, a, "%q", s)
		if !strings.ContainsAny(s, "<>&\b\f") {
			require.Equal(t, string(want), string(got), "%q", s)
		}
	}
}

func TestPushAndSendEncodeLikeEncodingJSON(t *testing.T) {
	t.Parallel()
	p := Push{MessageID: "m", MeshID: "mesh", SenderPubkey: "s", SenderMemberPubkey: "mk", Priority: PriorityNext,
		Nonce: "n", Ciphertext: "c\"\n", CreatedAt: "t", Subtype: SubtypeSystem, Event: EventPeerStatus,
		EventData: json.RawMessage(`{ "status" : "idle" }`)}
	got, err := Encode(p)
	require.NoError(t, err)
	type wire Push
	want, err := json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypePush, wire(p)})
	require.NoError(t, err)
	require.Equal(t, string(want), string(got))

	_, err = Encode(Push{EventData: json.RawMessage(`{bad`)})
	require.Error(t, err)

	s := Send{TargetSpec: "@g", Priority: PriorityLow, Nonce: "n", Ciphertext: "c", ID: "i", ReqID: "r"}
	got, err = Encode(s)
	require.NoError(t, err)
	type swire Send
	want, err = json.Marshal(struct {
		Type string `json:"type"`
		swire
	}{TypeSend, swire(s)})
	require.NoError(t, err)
	require.Equal(t, string(want), string(got))
}
