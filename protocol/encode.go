package protocol

import (
	"bytes"
	"encoding/json"
	"fmt"
	"unicode/utf8"
)

// Hand-written encoders for the two frames that carry ciphertext (push and
// send): the broker encodes every push once and fans the bytes out, and the
// load generator encodes sends in a loop. They write what encoding/json
// writes, except that '<', '>' and '&' are not HTML-escaped (JSON.stringify
// does not escape them either), in one allocation and one pass over the
// ciphertext.

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string. Invalid UTF-8 becomes U+FFFD and
// U+2028/U+2029 are escaped, as encoding/json does.
func appendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start, i := 0, 0
	for i < len(s) {
		for i+8 <= len(s) && plain8(load64(s, i)) {
			i += 8
		}
		if i >= len(s) {
			break
		}
		c := s[i]
		if c >= 0x20 && c < utf8.RuneSelf && c != '"' && c != '\\' {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

func appendField(dst []byte, name, value string) []byte {
	dst = append(dst, ',', '"')
	dst = append(dst, name...)
	dst = append(dst, '"', ':')
	return appendString(dst, value)
}

// MarshalJSON writes the wire form of a push, type included.
func (m Push) MarshalJSON() ([]byte, error) {
	n := 280 + len(m.MessageID) + len(m.MeshID) + len(m.SenderPubkey) + len(m.SenderMemberPubkey) +
		len(m.Priority) + len(m.Nonce) + len(m.Ciphertext) + len(m.CreatedAt) + len(m.Subtype) +
		len(m.Event) + len(m.EventData) + len(m.ClientMessageID) + len(m.RequestFingerprint) +
		len(m.SenderName) + len(m.SenderMemberID)
	b := make([]byte, 0, n)
	b = append(b, `{"type":"push"`...)
	b = appendField(b, "messageId", m.MessageID)
	b = appendField(b, "meshId", m.MeshID)
	b = appendField(b, "senderPubkey", m.SenderPubkey)
	if m.SenderMemberPubkey != "" {
		b = appendField(b, "senderMemberPubkey", m.SenderMemberPubkey)
	}
	b = appendField(b, "priority", string(m.Priority))
	b = appendField(b, "nonce", m.Nonce)
	b = appendField(b, "ciphertext", m.Ciphertext)
	b = appendField(b, "createdAt", m.CreatedAt)
	if m.Subtype != "" {
		b = appendField(b, "subtype", m.Subtype)
	}
	if m.Event != "" {
		b = appendField(b, "event", m.Event)
	}
	if len(m.EventData) > 0 {
		b = append(b, `,"eventData":`...)
		buf := bytes.NewBuffer(b)
		if err := json.Compact(buf, m.EventData); err != nil {
			return nil, fmt.Errorf("push eventData: %w", err)
		}
		b = buf.Bytes()
	}
	for _, f := range [...]struct{ name, v string }{{"client_message_id", m.ClientMessageID},
		{"request_fingerprint", m.RequestFingerprint}, {"senderName", m.SenderName}, {"senderMemberId", m.SenderMemberID}} {
		if f.v != "" {
			b = appendField(b, f.name, f.v)
		}
	}
	return append(b, '}'), nil
}

// MarshalJSON writes the wire form of a send, type included.
func (m Send) MarshalJSON() ([]byte, error) {
	n := 170 + len(m.TargetSpec) + len(m.Priority) + len(m.Nonce) + len(m.Ciphertext) + len(m.ID) + len(m.ReqID) +
		len(m.ClientMessageID) + len(m.RequestFingerprint)
	b := make([]byte, 0, n)
	b = append(b, `{"type":"send"`...)
	b = appendField(b, "targetSpec", m.TargetSpec)
	b = appendField(b, "priority", string(m.Priority))
	b = appendField(b, "nonce", m.Nonce)
	b = appendField(b, "ciphertext", m.Ciphertext)
	if m.ID != "" {
		b = appendField(b, "id", m.ID)
	}
	if m.ClientMessageID != "" {
		b = appendField(b, "client_message_id", m.ClientMessageID)
	}
	if m.RequestFingerprint != "" {
		b = appendField(b, "request_fingerprint", m.RequestFingerprint)
	}
	if m.ReqID != "" {
		b = appendField(b, "_reqId", m.ReqID)
	}
	return append(b, '}'), nil
}
