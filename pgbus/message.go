// Package pgbus is the cross-replica bus: one owned LISTEN connection per replica (pgxlisten),
// directed notifications sent inside the writing transaction and batched per transaction (one
// NOTIFY per target replica, whatever the number of messages: Outbox), reconnect with catch-up
// signals, the channel naming, and the node registry with its heartbeat (Heartbeat). It moves
// small signals between replicas; the tables are the truth. It knows nothing about WebSockets.
package pgbus

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	"github.com/claudemesh/broker/protocol"
)

// MaxPayload stays under Postgres's 8000-byte NOTIFY limit with room for the channel name.
const MaxPayload = 7600

// Kinds of bus messages. A message is a hint: receivers re-read the tables.
const (
	KindDeliveries = "d" // Member has new or released pending deliveries (Key: their priority, from a send; Presence: the one session they are for).
	KindStatus     = "s" // Presence's status changed (to Key when set, else reload it).
	KindPush       = "u" // A delivery assigned to Presence: Data carries it (PushData); push it now.
	KindPushFrame  = "w" // The same, Data being the push frame itself, ID the delivery, Key its priority.
	KindReplace    = "r" // Presence was taken over elsewhere: close the local socket.
	KindKick       = "k" // Member's sessions must close (revoked/kicked).
	KindEvent      = "e" // Mesh-wide system event (peer_joined/left/status), data inline.
	KindState      = "t" // Shared state key changed in a mesh.
	KindPing       = "p" // The node's own liveness probe of its LISTEN connection.
	KindResync     = "z" // Receiver should resync everything it holds.
)

// Message is one signal. Fields are short ids; Data carries small inline JSON for events.
type Message struct {
	Kind     string          `json:"k"`
	Mesh     string          `json:"h,omitempty"`
	Member   string          `json:"m,omitempty"`
	Presence string          `json:"p,omitempty"`
	Node     string          `json:"n,omitempty"`
	Key      string          `json:"y,omitempty"`
	Code     int             `json:"c,omitempty"`
	ID       int64           `json:"i,omitempty"`
	Data     json.RawMessage `json:"x,omitempty"`
}

// PushData is the Data of a KindPush message: a delivery and its envelope, small enough to
// ride inside a notification (the sender stores it first; the table stays the truth).
type PushData struct {
	DeliveryID         int64  `json:"i"`
	EnvelopeID         string `json:"e"`
	MeshID             string `json:"h"`
	SenderPubkey       string `json:"s"`
	SenderMemberPubkey string `json:"m"`
	Priority           string `json:"r"`
	Nonce              string `json:"n"`
	Ciphertext         string `json:"c"`
	CreatedMicros      int64  `json:"t"`
	// Today's CLI's fields, present only when set: the sender's member id and name, the
	// send's client_message_id and request_fingerprint.
	SenderMemberID     string `json:"b,omitempty"`
	SenderName         string `json:"a,omitempty"`
	ClientMessageID    string `json:"q,omitempty"`
	RequestFingerprint string `json:"f,omitempty"`
}

// Encode packs messages into as few payloads as fit MaxPayload, one JSON object per line.
// A single message too large to fit is replaced by a resync signal: never silently dropped.
func Encode(msgs []Message) []string {
	var out []string
	var buf bytes.Buffer
	for _, m := range msgs {
		b, err := json.Marshal(m)
		if err != nil || len(b) > MaxPayload {
			b, _ = json.Marshal(Message{Kind: KindResync})
		}
		if buf.Len() > 0 && buf.Len()+1+len(b) > MaxPayload {
			out = append(out, buf.String())
			buf.Reset()
		}
		if buf.Len() > 0 {
			buf.WriteByte('\n')
		}
		buf.Write(b)
	}
	if buf.Len() > 0 {
		out = append(out, buf.String())
	}
	return out
}

// Decode splits a payload back into messages. A bad line is reported, the rest still decoded.
func Decode(payload string) ([]Message, error) {
	var msgs []Message
	var bad int
	for line := range strings.SplitSeq(payload, "\n") {
		if line == "" {
			continue
		}
		m, err := decodeLine(line)
		if err != nil || m.Kind == "" {
			bad++
			continue
		}
		msgs = append(msgs, m)
	}
	if bad > 0 {
		return msgs, fmt.Errorf("decode bus payload: %d bad lines", bad)
	}
	return msgs, nil
}

// decodeLine reads one line as encoding/json would read it into a Message, except that names
// match exactly, a name given twice is an error, and values nest at most MaxDepth+WrapDepth. One pass of the wire scanner: encoding/json
// took two passes and reflection over each push frame (6.6 µs a line of ~700 bytes).
func decodeLine(line string) (Message, error) {
	f, err := protocol.ScanFields(line)
	if err != nil {
		return Message{}, err
	}
	var m Message
	for _, s := range []struct {
		name string
		to   *string
	}{{"k", &m.Kind}, {"h", &m.Mesh}, {"m", &m.Member}, {"p", &m.Presence}, {"n", &m.Node}, {"y", &m.Key}} {
		v, err := f.String(s.name)
		if err != nil {
			return Message{}, err
		}
		// A copy: a receiver may keep one (a status), and a substring would keep the whole
		// payload.
		*s.to = strings.Clone(v)
	}
	code, err := f.Int("c")
	if err != nil {
		return Message{}, err
	}
	if int64(int(code)) != code {
		return Message{}, fmt.Errorf("c: out of range")
	}
	m.Code = int(code)
	if m.ID, err = f.Int("i"); err != nil {
		return Message{}, err
	}
	if x, ok, err := f.Raw("x"); err != nil {
		return Message{}, err
	} else if ok {
		m.Data = json.RawMessage(x)
	}
	return m, nil
}

// Outbox collects the messages of one transaction per channel, deduplicated, so a batch of
// any size sends one notification per target replica.
type Outbox struct {
	byChannel map[string][]Message
	seen      map[string]map[string]struct{}
}

// Add queues m for channel. Identical messages to one channel are sent once.
func (o *Outbox) Add(channel string, m Message) {
	if o.byChannel == nil {
		o.byChannel = map[string][]Message{}
		o.seen = map[string]map[string]struct{}{}
	}
	if m.Data == nil {
		key := fmt.Sprintf("%s|%s|%s|%s|%s|%s|%d", m.Kind, m.Mesh, m.Member, m.Presence, m.Node, m.Key, m.Code)
		if _, dup := o.seen[channel][key]; dup {
			return
		}
		if o.seen[channel] == nil {
			o.seen[channel] = map[string]struct{}{}
		}
		o.seen[channel][key] = struct{}{}
	}
	o.byChannel[channel] = append(o.byChannel[channel], m)
}

// Len is the number of queued messages.
func (o *Outbox) Len() int {
	n := 0
	for _, ms := range o.byChannel {
		n += len(ms)
	}
	return n
}

// Payloads returns channel → payloads in a stable order.
func (o *Outbox) Payloads() []ChannelPayload {
	chans := make([]string, 0, len(o.byChannel))
	for c := range o.byChannel {
		chans = append(chans, c)
	}
	sort.Strings(chans)
	var out []ChannelPayload
	for _, c := range chans {
		for _, p := range Encode(o.byChannel[c]) {
			out = append(out, ChannelPayload{Channel: c, Payload: p})
		}
	}
	return out
}

// ChannelPayload is one NOTIFY.
type ChannelPayload struct{ Channel, Payload string }
