package protocol

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math/big"
	"reflect"
	"strings"
	"testing"
	"time"
)

func FuzzDecodeClient(f *testing.F) {
	seeds := []string{
		hello("", ""),
		hello("", `"groups":[{"name":"a/b","role":"r"}],"capabilities":["client_ack"],"sessionPubkey":"x","protocolVersion":1`),
		`{"type":"send","targetSpec":"@eng","priority":"next","nonce":"bm9uY2U=","ciphertext":"Y2lwaGVy","id":"c1","_reqId":"r2"}`,
		`{"type":"client_ack","brokerMessageIds":["a","b"]}`,
		`{"type":"client_ack","brokerMessageId":"a"}`,
		`{"type":"list_peers"}`,
		`{"type":"set_status","status":"idle"}`,
		`{"type":"set_summary","summary":"x\u00e9\ud83d\ude00"}`,
		`{"type":"join_group","name":"g","role":"r"}`,
		`{"type":"leave_group","name":"g"}`,
		`{"type":"set_state","key":"k","value":{"a":[1,2.5e-3,"<&>",null,true]}}`,
		`{"type":"get_state","key":"k"}`,
		`{"type":"list_state"}`,
		`{"type":"message_status","messageId":"m"}`,
		`{"type":"nope","_reqId":"r"}`,
		`{"_reqId":"r","type":"send",`,
		"{\"type\":\"set_summary\",\"summary\":\"\xff\"}",
		`{"type":"send","targetSpec":"*","priority":"now","nonce":"n","ciphertext":"a\u0000b"}`,
		`{"type":"set_state","key":"k","value":{"\\u0000":"\ud83d\ude00","b":"\ud800"}}`,
		`{"type":"set_state","key":"k","value":"\\\u0000"}`,
		`{"type":"set_state","key":"k","value":[1e131000,-0.5E-401,1e400,"1e999"]}`,
		`{"type":"set_state","key":"k","value":{"a":0.000e-3,"b":-0.0,"c":1.50e-3}}`,
		// Today's CLI (docs/protocol.md): session_hello, idempotent sends, admin verbs.
		`{"type":"session_hello","meshId":"m","parentMemberId":"p","parentMemberPubkey":"aa","sessionPubkey":"bb",` +
			`"parentAttestation":{"sessionPubkey":"bb","parentMemberPubkey":"aa","expiresAt":1,"signature":"cc"},` +
			`"displayName":"d","sessionId":"s","pid":1,"cwd":"/","hostname":"h","peerType":"claude","channel":"session",` +
			`"model":"m","groups":[{"name":"g"}],"timestamp":1,"signature":"dd","protocolVersion":2,"_reqId":"r"}`,
		`{"type":"session_hello","parentAttestation":{"expiresAt":"soon"}}`,
		`{"type":"send","targetSpec":"*","priority":"now","nonce":"n","ciphertext":"c","client_message_id":"cm-1","id":"i"}`,
		`{"type":"kick","target":"alice","_reqId":"r"}`,
		`{"type":"kick","stale":300}`,
		`{"type":"kick","all":true}`,
		`{"type":"disconnect","target":"ab12"}`,
		`{"type":"ban","target":"bob","reason":"spam"}`,
		`{"type":"unban","target":"bob"}`,
		`{"type":"list_bans","_reqId":"r"}`,
		`{"type":"set_stats","stats":{"messagesIn":3,"uptime":60}}`,
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		m, err := DecodeClient(frame)
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("error %T is not *Error", err)
			}
			if pe.Code != CodeBadRequest && pe.Code != CodeUnknownMessageType {
				t.Fatalf("unexpected code %q", pe.Code)
			}
			if len(pe.ReqID) > MaxIDLen {
				t.Fatalf("reqId too long")
			}
			return
		}
		// The scanner must never accept what the JSON grammar rejects, nor anything Postgres
		// could not store.
		if !json.Valid(frame) {
			t.Fatalf("accepted invalid JSON %q", frame)
		}
		requireStorable(t, reflect.ValueOf(m))
		// Decoded messages re-encode, and the re-encoded frame decodes to an
		// equal message (strings are already unescaped and UTF-8-fixed once).
		enc, err := Encode(m.(json.Marshaler))
		if err != nil {
			t.Fatalf("encode %T: %v", m, err)
		}
		again, err := DecodeClient(enc)
		if err != nil {
			t.Fatalf("re-decode %s: %v", enc, err)
		}
		enc2, err := Encode(again.(json.Marshaler))
		if err != nil {
			t.Fatal(err)
		}
		if string(enc) != string(enc2) {
			t.Fatalf("re-encode differs:\n%s\n%s", enc, enc2)
		}
		if _, ok := m.(*SetState); !ok && !reflect.DeepEqual(m, again) {
			t.Fatalf("round trip differs: %#v != %#v", m, again)
		}
	})
}

// requireStorable fails when a decoded value holds a string Postgres text can't store (U+0000)
// or a raw JSON value jsonb would refuse.
func requireStorable(t *testing.T, v reflect.Value) {
	t.Helper()
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface:
		if !v.IsNil() {
			requireStorable(t, v.Elem())
		}
	case reflect.Struct:
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				requireStorable(t, v.Field(i))
			}
		}
	case reflect.Slice:
		if raw, ok := v.Interface().(json.RawMessage); ok {
			if msg := jsonbStorable(string(raw)); msg != "" {
				t.Fatalf("accepted a JSON value jsonb refuses (%s): %q", msg, raw)
			}
			return
		}
		for i := range v.Len() {
			requireStorable(t, v.Index(i))
		}
	case reflect.String:
		if strings.IndexByte(v.String(), 0) >= 0 {
			t.Fatalf("accepted a string with U+0000: %q", v.String())
		}
	}
}

func FuzzParseJoinRequest(f *testing.F) {
	p := signedInvite(f)
	token, err := EncodeInviteToken(p)
	if err != nil {
		f.Fatal(err)
	}
	payload, _ := json.Marshal(p)
	peer := `"` + p.OwnerPubkey + `"`
	f.Add([]byte(`{"invite_token":"` + token + `","invite_payload":` + string(payload) + `,"peer_pubkey":` + peer + `,"display_name":"a"}`))
	f.Add([]byte(`{"invite_token":"` + token + `","invite_payload":"` + token + `","peer_pubkey":` + peer + `}`))
	f.Add([]byte(`{"invite_token":"` + token + `","peer_pubkey":` + peer + `}`))
	f.Add([]byte(`{"invite_token":"x","invite_payload":"{\"v\":1}","peer_pubkey":1}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := ParseJoinRequest(body)
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("error %T is not *Error", err)
			}
			return
		}
		_ = VerifyInvite(&r.InvitePayload) // must not panic
		enc, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParseJoinRequest(enc)
		if err != nil {
			t.Fatalf("re-parse %s: %v", enc, err)
		}
		if !reflect.DeepEqual(r, again) {
			t.Fatalf("round trip differs: %#v != %#v", r, again)
		}
	})
}

func FuzzParseHookRequest(f *testing.F) {
	f.Add([]byte(`{"cwd":"/w","pid":1,"status":"idle","session_id":"s","hook_token":"t"}`))
	f.Add([]byte(`{"cwd":"/w","status":"dnd","pid":null}`))
	f.Add([]byte(`{"cwd":1}`))
	f.Add([]byte(`{"cwd":"/w\u0000","status":"idle"}`))
	signed := HookRequest{CWD: "/w|x", PID: 7, Status: StatusWorking, SessionID: "s|1"}
	_, key, _ := ed25519.GenerateKey(nil)
	SignHook(key, &signed, time.UnixMilli(1))
	sb, _ := json.Marshal(signed)
	f.Add(sb)
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := ParseHookRequest(body)
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("error %T is not *Error", err)
			}
			return
		}
		if !json.Valid(body) {
			t.Fatalf("accepted invalid JSON %q", body)
		}
		requireStorable(t, reflect.ValueOf(r))
		if r.Signed() {
			_ = VerifyHook(&r) // must not panic
		}
		enc, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParseHookRequest(enc)
		if err != nil {
			t.Fatalf("re-parse %s: %v", enc, err)
		}
		if r != again {
			t.Fatalf("round trip differs: %#v != %#v", r, again)
		}
	})
}

func FuzzParseInviteToken(f *testing.F) {
	p := signedInvite(f)
	payload, err := json.Marshal(p)
	if err != nil {
		f.Fatal(err)
	}
	token, err := EncodeInviteToken(p)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(payload)
	f.Add([]byte(InviteLink(token)))
	f.Add([]byte(`{"v":1}`))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		// As a link or token, and as the payload JSON inside a token (which
		// reaches the JSON checks far more often than random base64).
		check := func(q *InvitePayload, err error) {
			if err != nil {
				var pe *Error
				if !errors.As(err, &pe) {
					t.Fatalf("error %T is not *Error", err)
				}
				return
			}
			_ = VerifyInvite(q) // must not panic
			tok, err := EncodeInviteToken(q)
			if err != nil {
				t.Fatal(err)
			}
			again, err := ParseInviteToken(tok)
			if err != nil {
				t.Fatalf("re-parse: %v", err)
			}
			if *q != *again {
				t.Fatalf("round trip differs: %#v != %#v", q, again)
			}
		}
		_, q, err := ParseInviteLink(string(b))
		check(q, err)
		q, err = ParseInviteToken(base64.RawURLEncoding.EncodeToString(b))
		check(q, err)
	})
}

func FuzzDecodeServer(f *testing.F) {
	for _, m := range []ServerMessage{
		&HelloAck{PresenceID: "p", ReqID: "r"}, &Ack{ID: "i", MessageID: "m", Queued: true},
		&Push{MessageID: "m", Ciphertext: "c", EventData: json.RawMessage(`{"a":[1]}`)},
		&PeersList{Peers: []Peer{{Pubkey: "k"}}}, &StateChange{Key: "k", Value: json.RawMessage(`1`)},
		&StateResult{Key: "k"}, &StateList{}, &MessageStatusResult{MessageID: "m"}, &Error{Code: "c"},
	} {
		b, err := Encode(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		m, err := DecodeServer(frame)
		if err != nil {
			return
		}
		enc, err := Encode(m)
		if err != nil {
			// Only a pass-through RawMessage can fail to re-encode, and the
			// decoders validated those: anything else is a bug.
			t.Fatalf("encode %T: %v", m, err)
		}
		if _, err := DecodeServer(enc); err != nil {
			t.Fatalf("re-decode %s: %v", enc, err)
		}
	})
}

// JSONBSize's numbers are as long as numeric writes them: the exact value in decimal, with as
// many decimals as the scale Postgres keeps (those written after the point less the exponent).
func FuzzJSONBNumber(f *testing.F) {
	for _, s := range []string{"0", "-0.0", "0.000e-3", "1.50e-3", "123.456e1", "0.001e2", "-1e-400", "9.999e400", "12"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, tok string) {
		if numberEnd(tok, 0) != len(tok) || !json.Valid([]byte(tok)) || tok[0] == '"' || tok[0] == '[' || tok[0] == '{' {
			return
		}
		if c := tok[0]; c != '-' && (c < '0' || c > '9') {
			return
		}
		size, exp := jsonbNumber(tok)
		if exp > MaxNumberExponent || exp < -MaxNumberExponent {
			return // refused before it is stored
		}
		frac := 0
		if i := strings.IndexByte(tok, '.'); i >= 0 {
			frac = strings.IndexAny(tok[i+1:]+"e", "eE")
		}
		r, ok := new(big.Rat).SetString(tok)
		if !ok {
			t.Fatalf("big.Rat cannot read %q", tok)
		}
		if want := r.FloatString(max(0, frac-exp)); size != len(want) {
			t.Fatalf("%q: size %d, numeric writes %q (%d)", tok, size, want, len(want))
		}
	})
}
