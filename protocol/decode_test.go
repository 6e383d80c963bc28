package protocol

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

var (
	testPubkey = strings.Repeat("ab", 32)
	testSig    = strings.Repeat("cd", 64)
)

func TestDecodeClientValid(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		frame string
		want  ClientMessage
	}{
		{
			name: "hello minimal",
			frame: `{"type":"hello","meshId":"m1","memberId":"u1","pubkey":"` + testPubkey + `",
				"sessionId":"s1","pid":42,"cwd":"/w","timestamp":1700000000000,"signature":"` + testSig + `"}`,
			want: &Hello{MeshID: "m1", MemberID: "u1", Pubkey: testPubkey, SessionID: "s1", PID: 42,
				CWD: "/w", Timestamp: 1700000000000, Signature: testSig},
		},
		{
			name: "hello full with unknown fields and reqId",
			frame: `{"type":"hello","_reqId":"r1","meshId":"m1","memberId":"u1","pubkey":"ABC",
				"sessionPubkey":"def","displayName":"Alice","sessionId":"s1","pid":0,"cwd":"",
				"groups":[{"name":"eng/backend","role":"lead"},{"name":"ops"}],
				"timestamp":-5,"signature":"zz","protocolVersion":1,
				"capabilities":["client_ack","system_events","grants"],
				"hostname":"box","peerType":"ai","model":{"nested":[1,2,{"x":null}]},
				"channel":"claudemesh-session","futureField":[true]}`,
			want: &Hello{MeshID: "m1", MemberID: "u1", Pubkey: "ABC", SessionPubkey: "def",
				DisplayName: "Alice", SessionID: "s1", CWD: "",
				Groups:    []Group{{Name: "eng/backend", Role: "lead"}, {Name: "ops"}},
				Timestamp: -5, Signature: "zz", ProtocolVersion: 1,
				Capabilities: []string{"client_ack", "system_events", "grants"}, ReqID: "r1",
				// model was not a string: a label, so dropped rather than refused.
				Hostname: "box", PeerType: "ai", Channel: "claudemesh-session"},
		},
		{
			name: "hello optional nulls",
			frame: `{"type":"hello","meshId":"m","memberId":"u","pubkey":"p","sessionPubkey":null,
				"displayName":null,"sessionId":"s","pid":1,"cwd":"/","groups":null,"timestamp":1,
				"signature":"s","protocolVersion":null,"capabilities":null}`,
			want: &Hello{MeshID: "m", MemberID: "u", Pubkey: "p", SessionID: "s", PID: 1, CWD: "/",
				Timestamp: 1, Signature: "s"},
		},
		{
			name:  "send",
			frame: `{"type":"send","targetSpec":"@eng","priority":"next","nonce":"bm9uY2U=","ciphertext":"Y2lwaGVy","id":"c1","_reqId":"r2"}`,
			want: &Send{TargetSpec: "@eng", Priority: PriorityNext, Nonce: "bm9uY2U=",
				Ciphertext: "Y2lwaGVy", ID: "c1", ReqID: "r2"},
		},
		{
			name:  "send opaque content never interpreted",
			frame: `{"type":"send","targetSpec":"*","priority":"now","nonce":"","ciphertext":"plain \"text\" \u00e9 ✓ <>&"}`,
			want:  &Send{TargetSpec: "*", Priority: PriorityNow, Ciphertext: `plain "text" é ✓ <>&`},
		},
		{
			name:  "send with whitespace everywhere",
			frame: " \n{ \"type\" : \"send\" ,\t\"targetSpec\":\"@all\", \"priority\":\"low\",\"nonce\":\"n\",\"ciphertext\":\"c\" , \"id\" : null } \r\n",
			want:  &Send{TargetSpec: "@all", Priority: PriorityLow, Nonce: "n", Ciphertext: "c"},
		},
		{
			name:  "client_ack one",
			frame: `{"type":"client_ack","brokerMessageId":"b1"}`,
			want:  &ClientAck{BrokerMessageID: "b1"},
		},
		{
			name:  "client_ack list",
			frame: `{"type":"client_ack","brokerMessageIds":["b1","b2"],"_reqId":"x"}`,
			want:  &ClientAck{BrokerMessageIDs: []string{"b1", "b2"}, ReqID: "x"},
		},
		{name: "list_peers", frame: `{"type":"list_peers","_reqId":"r"}`, want: &ListPeers{ReqID: "r"}},
		{name: "set_status", frame: `{"type":"set_status","status":"dnd"}`, want: &SetStatus{Status: StatusDND}},
		{name: "set_summary", frame: `{"type":"set_summary","summary":"fixing \ud83d\ude00"}`, want: &SetSummary{Summary: "fixing 😀"}},
		{name: "set_summary empty", frame: `{"type":"set_summary","summary":""}`, want: &SetSummary{}},
		{name: "join_group", frame: `{"type":"join_group","name":"eng","role":"lead"}`, want: &JoinGroup{Name: "eng", Role: "lead"}},
		{name: "join_group no role", frame: `{"type":"join_group","name":"é/ü"}`, want: &JoinGroup{Name: "é/ü"}},
		{name: "leave_group", frame: `{"type":"leave_group","name":"eng"}`, want: &LeaveGroup{Name: "eng"}},
		{
			name:  "set_state object compacted",
			frame: `{"type":"set_state","key":"k","value":{ "a" : [1, 2.5e3, true, null, "x"] }}`,
			want:  &SetState{Key: "k", Value: json.RawMessage(`{"a":[1,2.5e3,true,null,"x"]}`)},
		},
		{name: "set_state null", frame: `{"type":"set_state","key":"k","value":null}`, want: &SetState{Key: "k", Value: json.RawMessage(`null`)}},
		{name: "set_state string", frame: `{"type":"set_state","key":"k","value":"v"}`, want: &SetState{Key: "k", Value: json.RawMessage(`"v"`)}},
		{name: "get_state", frame: `{"type":"get_state","key":"k","_reqId":"q"}`, want: &GetState{Key: "k", ReqID: "q"}},
		{name: "list_state", frame: `{"type":"list_state"}`, want: &ListState{}},
		{name: "message_status", frame: `{"type":"message_status","messageId":"m1"}`, want: &MessageStatus{MessageID: "m1"}},
		{name: "escaped key", frame: `{"\u0074ype":"list_peers"}`, want: &ListPeers{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := DecodeClient([]byte(tt.frame))
			require.NoError(t, err)
			require.Equal(t, tt.want, got)
			require.Equal(t, tt.want.Type(), got.Type())
			require.Equal(t, tt.want.RequestID(), got.RequestID())

			// Re-encoding gives a frame that decodes to the same message.
			enc, err := Encode(got.(json.Marshaler))
			require.NoError(t, err)
			require.True(t, strings.HasPrefix(string(enc), `{"type":"`+got.Type()+`"`), string(enc))
			again, err := DecodeClient(enc)
			require.NoError(t, err, string(enc))
			require.Equal(t, got, again)
		})
	}
}

// Values jsonb stores are accepted: surrogate pairs in either case, and an escaped backslash
// before "u0000" (text, not NUL).
func TestDecodeClientStorableValues(t *testing.T) {
	for _, v := range []string{`"\ud83d\ude00"`, `{"a":"\uD83D\uDE00"}`, `"\\u0000"`, `["\\\\","\u00e9"]`} {
		m, err := DecodeClient([]byte(`{"type":"set_state","key":"k","value":` + v + `}`))
		require.NoError(t, err, v)
		require.Equal(t, v, string(m.(*SetState).Value))
	}
}

func TestDecodeClientErrors(t *testing.T) {
	t.Parallel()
	send := func(fields string) string {
		return `{"type":"send","_reqId":"r9",` + fields + `}`
	}
	long := func(n int) string { return strings.Repeat("x", n) }
	tests := []struct {
		name    string
		frame   string
		code    string
		message string // substring
		reqID   string
	}{
		{"empty", ``, CodeBadRequest, "invalid JSON", ""},
		{"not object", `[1]`, CodeBadRequest, "want a JSON object", ""},
		{"truncated", `{"type":"send"`, CodeBadRequest, "unexpected end", ""},
		{"trailing data", `{"type":"list_peers"} x`, CodeBadRequest, "data after the object", ""},
		{"two objects", `{"type":"list_peers"}{}`, CodeBadRequest, "data after the object", ""},
		{"bad literal", `{"type":"list_peers","x":tru}`, CodeBadRequest, "invalid literal", ""},
		{"bad number", `{"type":"list_peers","x":01}`, CodeBadRequest, "want ',' or '}'", ""},
		{"bad number 2", `{"type":"list_peers","x":-}`, CodeBadRequest, "invalid number", ""},
		{"bad escape", `{"type":"list_peers","x":"\q"}`, CodeBadRequest, "invalid escape", ""},
		{"bad unicode escape", `{"type":"list_peers","x":"\u12G4"}`, CodeBadRequest, "invalid \\u escape", ""},
		{"control char", "{\"type\":\"list_peers\",\"x\":\"a\x01\"}", CodeBadRequest, "control character", ""},
		{"unterminated", `{"type":"list_peers","x":"abc`, CodeBadRequest, "unterminated string", ""},
		{"single quotes", `{'type':'list_peers'}`, CodeBadRequest, "want a string key", ""},
		{"trailing comma", `{"type":"list_peers",}`, CodeBadRequest, "want a string key", ""},
		{"too deep", `{"type":"list_peers","x":` + strings.Repeat("[", MaxDepth+1) + strings.Repeat("]", MaxDepth+1) + `}`, CodeBadRequest, "nesting too deep", ""},
		{"syntax error after reqId keeps it", `{"_reqId":"early","type":"send",`, CodeBadRequest, "unexpected end", "early"},
		{"syntax error before reqId", `{"type":"send",x,"_reqId":"late"}`, CodeBadRequest, "want a string key", ""},
		{"reqId wrong type", `{"type":"list_peers","_reqId":5}`, CodeBadRequest, "_reqId: must be a string", ""},
		{"reqId too long", `{"type":"list_peers","_reqId":"` + long(MaxIDLen+1) + `"}`, CodeBadRequest, "_reqId: too long", ""},
		{"reqId duplicate", `{"type":"list_peers","_reqId":"a","_reqId":"b"}`, CodeBadRequest, "_reqId: duplicate field", ""},
		{"missing type", `{"_reqId":"r1"}`, CodeBadRequest, "type: required string", "r1"},
		{"type null", `{"type":null,"_reqId":"r1"}`, CodeBadRequest, "type: required string", "r1"},
		{"type not string", `{"type":7,"_reqId":"r1"}`, CodeBadRequest, "type: must be a string", "r1"},
		{"unknown type", `{"type":"teleport","_reqId":"r1"}`, CodeUnknownMessageType, `unknown message type "teleport"`, "r1"},
		{"unknown type wrong case", `{"type":"SEND"}`, CodeUnknownMessageType, "SEND", ""},
		{"wrong key case", `{"Type":"send"}`, CodeBadRequest, "type: required string", ""},
		{"duplicate known field", send(`"targetSpec":"a","targetSpec":"b","priority":"now","nonce":"","ciphertext":""`), CodeBadRequest, "targetSpec: duplicate field", "r9"},
		{"too many fields", `{"type":"list_peers",` + manyFields(MaxFields) + `}`, CodeBadRequest, "more than", ""},

		// send
		{"send missing targetSpec", send(`"priority":"now","nonce":"n","ciphertext":"c"`), CodeBadRequest, "targetSpec: required string", "r9"},
		{"send targetSpec null", send(`"targetSpec":null,"priority":"now","nonce":"n","ciphertext":"c"`), CodeBadRequest, "targetSpec: required string", "r9"},
		{"send targetSpec number", send(`"targetSpec":1,"priority":"now","nonce":"n","ciphertext":"c"`), CodeBadRequest, "targetSpec: must be a string", "r9"},
		{"send targetSpec empty", send(`"targetSpec":"","priority":"now","nonce":"n","ciphertext":"c"`), CodeBadRequest, "targetSpec: must not be empty", "r9"},
		{"send targetSpec too long", send(`"targetSpec":"` + long(MaxTargetSpecLen+1) + `","priority":"now","nonce":"n","ciphertext":"c"`), CodeBadRequest, "targetSpec: too long (max 256 bytes)", "r9"},
		{"send missing priority", send(`"targetSpec":"*","nonce":"n","ciphertext":"c"`), CodeBadRequest, "priority: required string", "r9"},
		{"send bad priority", send(`"targetSpec":"*","priority":"urgent","nonce":"n","ciphertext":"c"`), CodeBadRequest, "priority: must be one of now, next, low", "r9"},
		{"send priority wrong case", send(`"targetSpec":"*","priority":"NOW","nonce":"n","ciphertext":"c"`), CodeBadRequest, "priority: must be one of", "r9"},
		{"send missing nonce", send(`"targetSpec":"*","priority":"now","ciphertext":"c"`), CodeBadRequest, "nonce: required string", "r9"},
		{"send nonce object", send(`"targetSpec":"*","priority":"now","nonce":{},"ciphertext":"c"`), CodeBadRequest, "nonce: must be a string", "r9"},
		{"send missing ciphertext", send(`"targetSpec":"*","priority":"now","nonce":"n"`), CodeBadRequest, "ciphertext: required string", "r9"},
		{"send ciphertext array", send(`"targetSpec":"*","priority":"now","nonce":"n","ciphertext":["c"]`), CodeBadRequest, "ciphertext: must be a string", "r9"},
		{"send id number", send(`"targetSpec":"*","priority":"now","nonce":"n","ciphertext":"c","id":5`), CodeBadRequest, "id: must be a string", "r9"},
		{"send id too long", send(`"targetSpec":"*","priority":"now","nonce":"n","ciphertext":"c","id":"` + long(MaxIDLen+1) + `"`), CodeBadRequest, "id: too long", "r9"},

		// hello
		{"hello missing meshId", hello(`"meshId"`, ""), CodeBadRequest, "meshId: required string", "h"},
		{"hello memberId number", hello(`"memberId"`, `"memberId":1`), CodeBadRequest, "memberId: must be a string", "h"},
		{"hello missing pubkey", hello(`"pubkey"`, ""), CodeBadRequest, "pubkey: required string", "h"},
		{"hello pubkey number", hello(`"pubkey"`, `"pubkey":12`), CodeBadRequest, "pubkey: must be a string", "h"},
		{"hello sessionPubkey bool", hello("", `"sessionPubkey":true`), CodeBadRequest, "sessionPubkey: must be a string", "h"},
		{"hello displayName too long", hello("", `"displayName":"`+long(MaxDisplayNameLen+1)+`"`), CodeBadRequest, "displayName: too long", "h"},
		{"hello missing sessionId", hello(`"sessionId"`, ""), CodeBadRequest, "sessionId: required string", "h"},
		{"hello missing pid", hello(`"pid"`, ""), CodeBadRequest, "pid: required integer", "h"},
		{"hello pid string", hello(`"pid"`, `"pid":"42"`), CodeBadRequest, "pid: must be an integer", "h"},
		{"hello pid float", hello(`"pid"`, `"pid":4.5`), CodeBadRequest, "pid: must be an integer", "h"},
		{"hello pid exponent", hello(`"pid"`, `"pid":1e3`), CodeBadRequest, "pid: must be an integer", "h"},
		{"hello pid negative", hello(`"pid"`, `"pid":-1`), CodeBadRequest, "pid: must be a non-negative integer", "h"},
		{"hello pid overflow", hello(`"pid"`, `"pid":99999999999999999999`), CodeBadRequest, "pid: must be an integer", "h"},
		{"hello missing cwd", hello(`"cwd"`, ""), CodeBadRequest, "cwd: required string", "h"},
		{"hello cwd too long", hello(`"cwd"`, `"cwd":"`+long(MaxCWDLen+1)+`"`), CodeBadRequest, "cwd: too long", "h"},
		{"hello missing timestamp", hello(`"timestamp"`, ""), CodeBadRequest, "timestamp: required integer", "h"},
		{"hello timestamp string", hello(`"timestamp"`, `"timestamp":"1700000000000"`), CodeBadRequest, "timestamp: must be an integer", "h"},
		{"hello timestamp float", hello(`"timestamp"`, `"timestamp":1700000000000.5`), CodeBadRequest, "timestamp: must be an integer", "h"},
		{"hello missing signature", hello(`"signature"`, ""), CodeBadRequest, "signature: required string", "h"},
		{"hello groups object", hello("", `"groups":{"name":"x"}`), CodeBadRequest, "groups: must be a list", "h"},
		{"hello groups item string", hello("", `"groups":["eng"]`), CodeBadRequest, "groups[0]: must be an object", "h"},
		{"hello groups missing name", hello("", `"groups":[{"name":"a"},{"role":"x"}]`), CodeBadRequest, "groups[1].name: required string", "h"},
		{"hello groups name space", hello("", `"groups":[{"name":"a b"}]`), CodeBadRequest, "groups[0].name: must not contain whitespace", "h"},
		{"hello groups name empty", hello("", `"groups":[{"name":""}]`), CodeBadRequest, "groups[0].name: must not be empty", "h"},
		{"hello groups role number", hello("", `"groups":[{"name":"a","role":1}]`), CodeBadRequest, "groups[0].role: must be a string", "h"},
		{"hello too many groups", hello("", `"groups":[`+repeatJoin(`{"name":"g"}`, MaxGroups+1)+`]`), CodeBadRequest, "groups: too many items (max 64)", "h"},
		{"hello capabilities string", hello("", `"capabilities":"client_ack"`), CodeBadRequest, "capabilities: must be a list", "h"},
		{"hello capabilities item number", hello("", `"capabilities":["client_ack",3]`), CodeBadRequest, "capabilities[1]: must be a string", "h"},
		{"hello capability too long", hello("", `"capabilities":["`+long(MaxCapabilityLen+1)+`"]`), CodeBadRequest, "capabilities[0]: too long", "h"},
		{"hello too many capabilities", hello("", `"capabilities":[`+repeatJoin(`"c"`, MaxCapabilities+1)+`]`), CodeBadRequest, "capabilities: too many items", "h"},
		{"hello protocolVersion string", hello("", `"protocolVersion":"1"`), CodeBadRequest, "protocolVersion: must be an integer", "h"},

		// client_ack
		{"client_ack missing", `{"type":"client_ack","_reqId":"a"}`, CodeBadRequest, "brokerMessageId: required string", "a"},
		{"client_ack empty list", `{"type":"client_ack","brokerMessageIds":[]}`, CodeBadRequest, "brokerMessageId: required string", ""},
		{"client_ack id number", `{"type":"client_ack","brokerMessageId":1}`, CodeBadRequest, "brokerMessageId: must be a string", ""},
		{"client_ack ids not list", `{"type":"client_ack","brokerMessageIds":"b1"}`, CodeBadRequest, "brokerMessageIds: must be a list", ""},
		{"client_ack ids item", `{"type":"client_ack","brokerMessageIds":["b1",null]}`, CodeBadRequest, "brokerMessageIds[1]: must be a string", ""},
		{"client_ack ids empty item", `{"type":"client_ack","brokerMessageIds":[""]}`, CodeBadRequest, "brokerMessageIds[0]: must not be empty", ""},
		{"client_ack too many", `{"type":"client_ack","brokerMessageIds":[` + repeatJoin(`"b"`, MaxAckIDs+1) + `]}`, CodeBadRequest, "too many items", ""},
		{"client_ack id too long", `{"type":"client_ack","brokerMessageId":"` + long(MaxIDLen+1) + `"}`, CodeBadRequest, "brokerMessageId: too long", ""},

		// the rest
		{"set_status missing", `{"type":"set_status","_reqId":"s"}`, CodeBadRequest, "status: required string", "s"},
		{"set_status bad enum", `{"type":"set_status","status":"away"}`, CodeBadRequest, "status: must be one of idle, working, dnd", ""},
		{"set_status number", `{"type":"set_status","status":1}`, CodeBadRequest, "status: must be a string", ""},
		{"set_summary missing", `{"type":"set_summary"}`, CodeBadRequest, "summary: required string", ""},
		{"set_summary null", `{"type":"set_summary","summary":null}`, CodeBadRequest, "summary: required string", ""},
		{"set_summary too long", `{"type":"set_summary","summary":"` + long(MaxSummaryLen+1) + `"}`, CodeBadRequest, "summary: too long (max 8192 bytes)", ""},
		{"join_group missing name", `{"type":"join_group"}`, CodeBadRequest, "name: required string", ""},
		{"join_group empty name", `{"type":"join_group","name":""}`, CodeBadRequest, "name: must not be empty", ""},
		{"join_group tab in name", `{"type":"join_group","name":"a\tb"}`, CodeBadRequest, "name: must not contain whitespace", ""},
		{"join_group nbsp in name", `{"type":"join_group","name":"a\u00a0b"}`, CodeBadRequest, "name: must not contain whitespace", ""},
		{"join_group control in name", `{"type":"join_group","name":"a\u0007b"}`, CodeBadRequest, "name: must not contain whitespace or control", ""},
		{"join_group NUL in name", `{"type":"join_group","name":"a\u0000b"}`, CodeBadRequest, "name: must not contain the NUL character", ""},
		{"send NUL in ciphertext", `{"type":"send","targetSpec":"*","priority":"now","nonce":"n","ciphertext":"a\u0000"}`, CodeBadRequest, "ciphertext: must not contain the NUL character", ""},
		{"send NUL in nonce", `{"type":"send","targetSpec":"*","priority":"now","nonce":"\u0000","ciphertext":"c"}`, CodeBadRequest, "nonce: must not contain the NUL character", ""},
		{"send NUL in id", `{"type":"send","targetSpec":"*","priority":"now","nonce":"n","ciphertext":"c","id":"\u0000"}`, CodeBadRequest, "id: must not contain the NUL character", ""},
		{"summary NUL", `{"type":"set_summary","summary":"x\u0000"}`, CodeBadRequest, "summary: must not contain the NUL character", ""},
		{"state key NUL", `{"type":"set_state","key":"k\u0000","value":1}`, CodeBadRequest, "key: must not contain the NUL character", ""},
		{"state value NUL", `{"type":"set_state","key":"k","value":{"a":"\u0000"}}`, CodeBadRequest, "value: must not contain the NUL character", ""},
		{"state value NUL in key", `{"type":"set_state","key":"k","value":{"\u0000":1}}`, CodeBadRequest, "value: must not contain the NUL character", ""},
		{"state value lone surrogate", `{"type":"set_state","key":"k","value":"\ud800x"}`, CodeBadRequest, "value: unpaired UTF-16 surrogate", ""},
		{"state value low surrogate first", `{"type":"set_state","key":"k","value":"\udc00\ud800"}`, CodeBadRequest, "value: unpaired UTF-16 surrogate", ""},
		{"hello NUL in displayName", `{"type":"hello","meshId":"m","memberId":"x","pubkey":"p","displayName":"\u0000","sessionId":"s","pid":1,"cwd":"/","timestamp":1,"signature":"s"}`, CodeBadRequest, "displayName: must not contain the NUL character", ""},
		{"hello NUL in cwd", `{"type":"hello","meshId":"m","memberId":"x","pubkey":"p","sessionId":"s","pid":1,"cwd":"/\u0000","timestamp":1,"signature":"s"}`, CodeBadRequest, "cwd: must not contain the NUL character", ""},
		{"hello NUL in group", `{"type":"hello","meshId":"m","memberId":"x","pubkey":"p","sessionId":"s","pid":1,"cwd":"/","groups":[{"name":"g","role":"\u0000"}],"timestamp":1,"signature":"s"}`, CodeBadRequest, "role: must not contain the NUL character", ""},
		{"hello pid too large", `{"type":"hello","meshId":"m","memberId":"x","pubkey":"p","sessionId":"s","pid":2147483648,"cwd":"/","timestamp":1,"signature":"s"}`, CodeBadRequest, "pid: must be a non-negative integer", ""},
		{"join_group name too long", `{"type":"join_group","name":"` + long(MaxGroupNameLen+1) + `"}`, CodeBadRequest, "name: too long (max 128 bytes)", ""},
		{"join_group role number", `{"type":"join_group","name":"a","role":2}`, CodeBadRequest, "role: must be a string", ""},
		{"join_group role too long", `{"type":"join_group","name":"a","role":"` + long(MaxRoleLen+1) + `"}`, CodeBadRequest, "role: too long", ""},
		{"leave_group missing", `{"type":"leave_group"}`, CodeBadRequest, "name: required string", ""},
		{"leave_group space", `{"type":"leave_group","name":" "}`, CodeBadRequest, "name: must not contain whitespace", ""},
		{"set_state missing key", `{"type":"set_state","value":1}`, CodeBadRequest, "key: required string", ""},
		{"set_state empty key", `{"type":"set_state","key":"","value":1}`, CodeBadRequest, "key: must not be empty", ""},
		{"set_state key too long", `{"type":"set_state","key":"` + long(MaxStateKeyLen+1) + `","value":1}`, CodeBadRequest, "key: too long", ""},
		{"set_state missing value", `{"type":"set_state","key":"k"}`, CodeBadRequest, "value: required", ""},
		{"set_state duplicate value", `{"type":"set_state","key":"k","value":1,"value":2}`, CodeBadRequest, "value: duplicate field", ""},
		{"get_state missing key", `{"type":"get_state"}`, CodeBadRequest, "key: required string", ""},
		{"get_state key number", `{"type":"get_state","key":1}`, CodeBadRequest, "key: must be a string", ""},
		{"message_status missing", `{"type":"message_status"}`, CodeBadRequest, "messageId: required string", ""},
		{"message_status empty", `{"type":"message_status","messageId":""}`, CodeBadRequest, "messageId: must not be empty", ""},
		{"message_status too long", `{"type":"message_status","messageId":"` + long(MaxIDLen+1) + `"}`, CodeBadRequest, "messageId: too long", ""},
		{"kick target and stale", `{"type":"kick","target":"bob","stale":60000}`, CodeBadRequest, "kick: give one of target, stale and all", ""},
		{"disconnect target and all", `{"type":"disconnect","target":"bob","all":true}`, CodeBadRequest, "disconnect: give one of", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m, err := DecodeClient([]byte(tt.frame))
			require.Nil(t, m)
			require.Error(t, err)
			var pe *Error
			require.True(t, errors.As(err, &pe), "error is %T", err)
			require.Equal(t, tt.code, pe.Code, pe.Message)
			require.Contains(t, pe.Message, tt.message)
			require.Equal(t, tt.reqID, pe.ReqID)
			require.Contains(t, pe.Error(), tt.code)
			require.Empty(t, pe.ID)
		})
	}
}

// hello returns a valid hello frame with _reqId "h", with the field named
// drop removed and extra added.
func hello(drop, extra string) string {
	fields := []string{
		`"type":"hello"`, `"_reqId":"h"`, `"meshId":"m"`, `"memberId":"u"`,
		`"pubkey":"` + testPubkey + `"`, `"sessionId":"s"`, `"pid":1`, `"cwd":"/"`,
		`"timestamp":1`, `"signature":"` + testSig + `"`,
	}
	var out []string
	for _, f := range fields {
		if drop == "" || !strings.HasPrefix(f, drop+":") {
			out = append(out, f)
		}
	}
	if extra != "" {
		out = append(out, extra)
	}
	return "{" + strings.Join(out, ",") + "}"
}

func repeatJoin(s string, n int) string {
	parts := make([]string, n)
	for i := range parts {
		parts[i] = s
	}
	return strings.Join(parts, ",")
}

func manyFields(n int) string {
	parts := make([]string, n)
	for i := range parts {
		parts[i] = `"f` + strings.Repeat("x", i) + `":1`
	}
	return strings.Join(parts, ",")
}

func TestDecodeClientSendErrorEchoesID(t *testing.T) {
	t.Parallel()
	_, err := DecodeClient([]byte(`{"type":"send","_reqId":"r","id":"c7","targetSpec":"*","priority":"soon","nonce":"","ciphertext":""}`))
	var pe *Error
	require.ErrorAs(t, err, &pe)
	require.Equal(t, "c7", pe.ID)
	require.Equal(t, "r", pe.ReqID)
	_, err = DecodeClient([]byte(`{"type":"set_status","id":"c7"}`))
	require.ErrorAs(t, err, &pe)
	require.Empty(t, pe.ID)
}

func TestDecodeClientHelloValidAfterHelper(t *testing.T) {
	t.Parallel()
	m, err := DecodeClient([]byte(hello("", "")))
	require.NoError(t, err)
	require.Equal(t, "h", m.RequestID())
}

func TestDecodeClientDoesNotAliasFrame(t *testing.T) {
	t.Parallel()
	frame := []byte(`{"type":"send","targetSpec":"*","priority":"now","nonce":"nn","ciphertext":"cc","_reqId":"r"}`)
	m, err := DecodeClient(frame)
	require.NoError(t, err)
	for i := range frame {
		frame[i] = 'X'
	}
	require.Equal(t, &Send{TargetSpec: "*", Priority: PriorityNow, Nonce: "nn", Ciphertext: "cc", ReqID: "r"}, m)
}

func TestDecodeClientInvalidUTF8(t *testing.T) {
	t.Parallel()
	m, err := DecodeClient([]byte("{\"type\":\"set_summary\",\"summary\":\"a\xffb\"}"))
	require.NoError(t, err)
	require.Equal(t, "a\uFFFDb", m.(*SetSummary).Summary)
}

func TestDecodeClientMatchesEncodingJSONValidity(t *testing.T) {
	t.Parallel()
	// A few frames where a hand-written scanner could be more lenient than
	// the JSON grammar.
	for _, f := range []string{
		`{"type":"list_peers","x":1.}`, `{"type":"list_peers","x":.5}`, `{"type":"list_peers","x":1e}`,
		`{"type":"list_peers","x":+1}`, `{"type":"list_peers","x":[1,]}`, `{"type":"list_peers","x":{"a"}}`,
		`{"type":"list_peers","x":NaN}`, `{"type":"list_peers","x":"\u00"}`, `{"type":"list_peers" "x":1}`,
		`{"type":"list_peers","x":nul}`, `{"type":"list_peers","x":[1 2]}`, `{"type":"list_peers","x":{"a":1,}}`,
	} {
		require.False(t, json.Valid([]byte(f)), f)
		_, err := DecodeClient([]byte(f))
		require.Error(t, err, f)
	}
}
