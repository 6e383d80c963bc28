package protocol

import (
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestParseJoinRequestPayloadForms(t *testing.T) {
	t.Parallel()
	p := signedInvite(t)
	token, err := EncodeInviteToken(p)
	require.NoError(t, err)
	payloadJSON, err := json.Marshal(p)
	require.NoError(t, err)
	peer := strings.Repeat("AB", 32)

	body := func(payload string) string {
		b := `{"invite_token":"` + token + `","peer_pubkey":"` + peer + `","display_name":"alice"`
		if payload != "" {
			b += `,"invite_payload":` + payload
		}
		return b + "}"
	}
	forms := map[string]string{
		"object":             string(payloadJSON),
		"string of JSON":     strconv.Quote(string(payloadJSON)),
		"string of token":    strconv.Quote(token),
		"string of link":     strconv.Quote(InviteLink(token)),
		"absent, from token": "",
		"null, from token":   "null",
	}
	for name, form := range forms {
		r, err := ParseJoinRequest([]byte(body(form)))
		require.NoError(t, err, name)
		require.Equal(t, token, r.InviteToken, name)
		require.Equal(t, *p, r.InvitePayload, name)
		require.Equal(t, strings.ToLower(peer), r.PeerPubkey, name)
		require.Equal(t, "alice", r.DisplayName, name)
		require.NoError(t, VerifyInvite(&r.InvitePayload), name)
	}

	// The token may be given as a link, too.
	r, err := ParseJoinRequest([]byte(`{"invite_token":"` + InviteLink(token) + `","peer_pubkey":"` + peer + `"}`))
	require.NoError(t, err)
	require.Equal(t, token, r.InviteToken)
	require.Empty(t, r.DisplayName)

	// A JoinRequest re-encodes to a body that parses the same.
	enc, err := json.Marshal(r)
	require.NoError(t, err)
	again, err := ParseJoinRequest(enc)
	require.NoError(t, err)
	require.Equal(t, r, again)
}

func TestParseJoinRequestErrors(t *testing.T) {
	t.Parallel()
	p := signedInvite(t)
	token, err := EncodeInviteToken(p)
	require.NoError(t, err)
	peer := strings.Repeat("ab", 32)
	tests := []struct{ name, body, msg string }{
		{"not json", `nope`, "invalid JSON"},
		{"array", `[]`, "want a JSON object"},
		{"missing token", `{"peer_pubkey":"` + peer + `"}`, "invite_token: required string"},
		{"token number", `{"invite_token":1,"peer_pubkey":"` + peer + `"}`, "invite_token: must be a string"},
		{"token empty", `{"invite_token":"","peer_pubkey":"` + peer + `"}`, "invite_token: must not be empty"},
		{"bad token no payload", `{"invite_token":"!!","peer_pubkey":"` + peer + `"}`, "invite_token: invite token: not base64url"},
		{"payload number", `{"invite_token":"t","invite_payload":5,"peer_pubkey":"` + peer + `"}`, "invite_payload: must be an object or a string"},
		{"payload array", `{"invite_token":"t","invite_payload":[],"peer_pubkey":"` + peer + `"}`, "invite_payload: must be an object or a string"},
		{"payload object missing field", `{"invite_token":"t","invite_payload":{"v":1},"peer_pubkey":"` + peer + `"}`, "invite_payload: mesh_id: required string"},
		{"payload bad string", `{"invite_token":"t","invite_payload":"%%","peer_pubkey":"` + peer + `"}`, "invite_payload: invite token: not base64url"},
		{"payload bad JSON string", `{"invite_token":"t","invite_payload":"{\"v\":","peer_pubkey":"` + peer + `"}`, "invite_payload: invalid JSON"},
		{"missing peer", `{"invite_token":"` + token + `"}`, "peer_pubkey: required string"},
		{"bad peer", `{"invite_token":"` + token + `","peer_pubkey":"abc"}`, "peer_pubkey: must be 64 hex characters"},
		{"display name number", `{"invite_token":"` + token + `","peer_pubkey":"` + peer + `","display_name":3}`, "display_name: must be a string"},
		{"display name too long", `{"invite_token":"` + token + `","peer_pubkey":"` + peer + `","display_name":"` + strings.Repeat("x", MaxDisplayNameLen+1) + `"}`, "display_name: too long"},
		{"duplicate token", `{"invite_token":"a","invite_token":"b","peer_pubkey":"` + peer + `"}`, "invite_token: duplicate field"},
	}
	for _, tt := range tests {
		_, err := ParseJoinRequest([]byte(tt.body))
		require.Error(t, err, tt.name)
		var pe *Error
		require.True(t, errors.As(err, &pe), tt.name)
		require.Equal(t, CodeBadRequest, pe.Code, tt.name)
		require.Contains(t, pe.Message, tt.msg, tt.name)
	}
}

func TestParseHookRequest(t *testing.T) {
	t.Parallel()
	valid := map[string]HookRequest{
		`{"cwd":"/w","status":"idle"}`:                                            {CWD: "/w", Status: StatusIdle},
		`{"cwd":"/w","pid":123,"status":"working","session_id":"s1"}`:             {CWD: "/w", PID: 123, Status: StatusWorking, SessionID: "s1"},
		`{"cwd":"/w","pid":null,"status":"dnd","session_id":"","hook_token":"t"}`: {CWD: "/w", Status: StatusDND, HookToken: "t"},
		`{"cwd":"/w","status":"idle","session_id":null,"extra":{"a":[1]}}`:        {CWD: "/w", Status: StatusIdle},
	}
	for body, want := range valid {
		got, err := ParseHookRequest([]byte(body))
		require.NoError(t, err, body)
		require.Equal(t, want, got, body)
		enc, err := json.Marshal(got)
		require.NoError(t, err)
		again, err := ParseHookRequest(enc)
		require.NoError(t, err)
		require.Equal(t, got, again)
	}

	invalid := map[string]string{
		``:                                             "invalid JSON",
		`{"cwd":"/w","status":"idle"`:                  "unexpected end",
		`{"status":"idle"}`:                            "cwd: required string",
		`{"cwd":"","status":"idle"}`:                   "cwd: must not be empty",
		`{"cwd":5,"status":"idle"}`:                    "cwd: must be a string",
		`{"cwd":"/w"}`:                                 "status: required string",
		`{"cwd":"/w","status":"busy"}`:                 "status: must be one of idle, working, dnd",
		`{"cwd":"/w","status":"idle","pid":"1"}`:       "pid: must be an integer",
		`{"cwd":"/w","status":"idle","pid":1.5}`:       "pid: must be an integer",
		`{"cwd":"/w","status":"idle","pid":-3}`:        "pid: must be a non-negative integer",
		`{"cwd":"/w","status":"idle","session_id":1}`:  "session_id: must be a string",
		`{"cwd":"/w","status":"idle","hook_token":[]}`: "hook_token: must be a string",
		`{"cwd":"/w","status":"idle","hook_token":"` + strings.Repeat("t", MaxHookTokenLen+1) + `"}`: "hook_token: too long",
		`{"cwd":"` + strings.Repeat("c", MaxCWDLen+1) + `","status":"idle"}`:                         "cwd: too long",
		// Signed with no signing time (found by FuzzParseHookRequest: it did not survive
		// re-encoding, where a zero timestamp means unsigned).
		`{"cwd":"/w","status":"idle","pubkey":"` + strings.Repeat("1", 64) + `","timestamp":0,"signature":"` + strings.Repeat("0", 128) + `"}`: "timestamp: must be a positive integer",
	}
	for body, msg := range invalid {
		_, err := ParseHookRequest([]byte(body))
		require.Error(t, err, body)
		var pe *Error
		require.True(t, errors.As(err, &pe))
		require.Equal(t, CodeBadRequest, pe.Code)
		require.Contains(t, pe.Message, msg, body)
	}
}
