// Package audit owns the tamper-evident audit log: one append-only hash chain per mesh in
// claudemesh.audit, with its head in claudemesh.audit_head. Entries are metadata only (who did
// what, when, to which ids), never message content, nonces or summaries.
//
// Each entry's hash is sha256 over the previous entry's hash (Genesis for the first), the mesh
// id, the event type, the actor, the canonical JSON of its data and its timestamp in
// microseconds. An append only records the entry (claudemesh.audit_pending) in the caller's
// transaction, taking no lock; Seal, run by every replica each second and by every reader, moves
// committed entries onto their chains, one sealer at a time, so the chain never forks and no
// writer waits on a mesh's head. Verify walks a chain and names the first entry that does not
// check out.
package audit

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/db"
)

// Event types. Membership events are written by package membership; the session events are
// written by the send and presence paths.
const (
	MeshCreated      = "mesh_created"
	MemberAdded      = "member_added"
	MemberJoined     = "member_joined"
	MemberRevoked    = "member_revoked"
	InviteCreated    = "invite_created"
	InviteRevoked    = "invite_revoked"
	PeerConnected    = "peer_connected"
	PeerDisconnected = "peer_disconnected"
	MessageSent      = "message_sent"
	StateSet         = "state_set"
)

// Genesis is the prev_hash of every chain's first entry and the hash of an empty chain's head.
var Genesis = strings.Repeat("0", 64)

// Errors.
var (
	// ErrInvalidEntry: an entry without a mesh or an event type.
	ErrInvalidEntry = errors.New("invalid audit entry")
	// ErrContentInData: an entry's data carries a content field (ciphertext, nonce, summary).
	// The audit log is metadata only; this guards against a caller passing a whole message.
	ErrContentInData = errors.New("audit data must not carry message content")
)

// contentKeys are data keys the log refuses: their values are what the broker must never record.
var contentKeys = []string{"ciphertext", "nonce", "summary"}

// Entry is one event to append.
type Entry struct {
	MeshID string
	Type   string
	// Actor is who caused the event: a member pubkey, "operator" for the admin CLI, "system"
	// for the broker itself.
	Actor string
	// Data is the event's metadata (ids, roles, counts). Keys are sorted when hashed.
	Data map[string]any
	// At is the event time; zero means now. Stored and hashed at microsecond precision.
	At time.Time
}

// Actors used by the broker's own code.
const (
	ActorOperator = "operator"
	ActorSystem   = "system"
)

// Record is one stored entry.
type Record struct {
	Seq      int64           `json:"seq"`
	MeshID   string          `json:"meshId"`
	Type     string          `json:"type"`
	Actor    string          `json:"actor"`
	Data     json.RawMessage `json:"data"`
	At       time.Time       `json:"at"`
	PrevHash string          `json:"prevHash"`
	Hash     string          `json:"hash"`
}

// BrokenError names the first entry of a chain that does not verify.
type BrokenError struct {
	MeshID string
	Seq    int64
	Reason string
}

func (e *BrokenError) Error() string {
	return fmt.Sprintf("audit chain of mesh %s broken at seq %d: %s", e.MeshID, e.Seq, e.Reason)
}

// Append records entries for their meshes' chains inside tx, the caller's transaction: the
// entries commit or vanish with the caller's own writes, and Seal chains them (with the scheme
// Hash implements, server-side) in the order they were appended.
func Append(ctx context.Context, tx pgx.Tx, entries []Entry) error {
	return AppendVia(ctx, tx, entries)
}

// AppendVia is Append on any executor: outside a transaction the statement is its own.
func AppendVia(ctx context.Context, q db.DBTX, entries []Entry) error {
	if len(entries) == 0 {
		return nil
	}
	now := time.Now()
	n := len(entries)
	p := db.AppendAuditParams{MeshIds: make([]string, n), EventTypes: make([]string, n), Actors: make([]string, n),
		Datas: make([]string, n), TsMicros: make([]int64, n)}
	for i, e := range entries {
		pe, err := prepare(e, now)
		if err != nil {
			return fmt.Errorf("append audit: %w", err)
		}
		p.MeshIds[i], p.EventTypes[i], p.Actors[i], p.Datas[i], p.TsMicros[i] = pe.meshID, pe.eventType, pe.actor, string(pe.data), pe.tsMicros
	}
	if err := db.New(q).AppendAudit(ctx, p); err != nil {
		return fmt.Errorf("append audit: %w", err)
	}
	return nil
}

// sealBatch bounds the entries one seal statement chains, so a backlog is sealed in steps.
const sealBatch = 5000

// Seal chains every committed pending entry and returns how many it chained. With wait false it
// returns at once when another session is sealing (the replicas' periodic seal); with wait true
// it waits for that session, so what was committed before the call is on the chains after it
// (a reader).
func Seal(ctx context.Context, q db.DBTX, wait bool) (int, error) {
	total := 0
	for {
		n, err := db.New(q).SealAudit(ctx, db.SealAuditParams{MaxEntries: sealBatch, Wait: wait})
		if err != nil {
			return total, fmt.Errorf("seal audit: %w", err)
		}
		total += int(n)
		if n < sealBatch {
			return total, nil
		}
	}
}

type pending struct {
	meshID, eventType, actor string
	data                     []byte
	tsMicros                 int64
}

func prepare(e Entry, now time.Time) (pending, error) {
	if e.MeshID == "" || e.Type == "" {
		return pending{}, fmt.Errorf("%w: mesh and type are required", ErrInvalidEntry)
	}
	for _, k := range contentKeys {
		if _, ok := e.Data[k]; ok {
			return pending{}, fmt.Errorf("%w: key %q", ErrContentInData, k)
		}
	}
	data, err := encodeData(e.Data)
	if err != nil {
		return pending{}, fmt.Errorf("encode %s data: %w", e.Type, err)
	}
	at := e.At
	if at.IsZero() {
		at = now
	}
	return pending{meshID: e.MeshID, eventType: e.Type, actor: e.Actor, data: data, tsMicros: at.UnixMicro()}, nil
}

// CanonicalData is an entry's data as it is hashed and stored: canonical JSON. A statement
// that appends its own entry (claudemesh.audit_append) is given it from here when the data
// holds a user's string, which only this encoder is guaranteed to encode as Verify expects.
func CanonicalData(d map[string]any) ([]byte, error) { return encodeData(d) }

// encodeData returns the canonical JSON of an entry's data. The common case, a flat map of
// strings, integers and booleans (every entry the broker writes per message), is already
// canonical when encoded with sorted keys and no HTML escaping, so it skips the decode and
// re-encode that CanonicalJSON needs for arbitrary values.
func encodeData(d map[string]any) ([]byte, error) {
	if d == nil {
		return []byte("{}"), nil
	}
	// Invalid UTF-8 is encoded as an escaped U+FFFD, which CanonicalJSON turns into the raw
	// character: such data takes the slow path.
	flat := true
	for k, v := range d {
		switch v := v.(type) {
		case string:
			flat = flat && utf8.ValidString(v)
		case bool, nil, int, int32, int64, uint32:
		default:
			flat = false
		}
		flat = flat && utf8.ValidString(k)
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(d); err != nil { // maps encode with sorted keys
		return nil, err
	}
	raw := bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
	if flat {
		return raw, nil
	}
	return CanonicalJSON(raw)
}

// Hash is an entry's hash: lowercase hex sha256 over its fields, each length-prefixed so no
// two different entries encode alike. data must be canonical JSON (see CanonicalJSON).
func Hash(prevHash, meshID, eventType, actor string, data []byte, tsMicros int64) string {
	h := sha256.New()
	field := func(b []byte) {
		h.Write(strconv.AppendInt(nil, int64(len(b)), 10))
		h.Write([]byte{':'})
		h.Write(b)
		h.Write([]byte{'\n'})
	}
	field([]byte("claudemesh-audit-v1"))
	field([]byte(prevHash))
	field([]byte(meshID))
	field([]byte(eventType))
	field([]byte(actor))
	field(data)
	field(strconv.AppendInt(nil, tsMicros, 10))
	return hex.EncodeToString(h.Sum(nil))
}

// CanonicalJSON re-encodes a JSON value so that equal values encode to equal bytes: object keys
// sorted at every level, no insignificant space, no HTML escaping, and numbers in one form
// (integers as exact decimal digits, others as Go's shortest float form). It is applied both to
// the data being appended and to the jsonb Postgres hands back, which reorders keys and may
// rewrite numbers (1e3 becomes 1000), so the two always hash alike.
func CanonicalJSON(raw []byte) ([]byte, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("canonical json: %w", err)
	}
	if dec.More() {
		return nil, errors.New("canonical json: trailing data")
	}
	v, err := canonicalNumbers(v)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil { // maps encode with sorted keys
		return nil, fmt.Errorf("canonical json: %w", err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

func canonicalNumbers(v any) (any, error) {
	switch t := v.(type) {
	case map[string]any:
		for k, x := range t {
			c, err := canonicalNumbers(x)
			if err != nil {
				return nil, err
			}
			t[k] = c
		}
	case []any:
		for i, x := range t {
			c, err := canonicalNumbers(x)
			if err != nil {
				return nil, err
			}
			t[i] = c
		}
	case json.Number:
		return canonicalNumber(string(t))
	}
	return v, nil
}

// canonicalNumber maps every spelling of a number to one: integral values (1000, 1e3, 1.0e3,
// 1000.0) to their exact digits, others to the shortest float form, and refuses a non-integral
// value that form does not hold exactly.
func canonicalNumber(s string) (json.Number, error) {
	// A huge exponent would make big.Rat allocate without bound; audit data never holds one.
	if i := strings.IndexAny(s, "eE"); i >= 0 && len(strings.TrimLeft(s[i+1:], "+-")) > 3 {
		return "", fmt.Errorf("canonical json: number %q out of range", s)
	}
	r, ok := new(big.Rat).SetString(s)
	if !ok {
		return "", fmt.Errorf("canonical json: bad number %q", s)
	}
	if r.IsInt() {
		return json.Number(r.Num().String()), nil
	}
	f, _ := r.Float64()
	b, err := json.Marshal(f)
	if err != nil {
		return "", fmt.Errorf("canonical json: number %q: %w", s, err)
	}
	// Only a number that is exactly its float's shortest form has one: rounded, 2.000000000000000001
	// would hash as 2, and a row edited so would verify.
	if exact, ok := new(big.Rat).SetString(string(b)); !ok || exact.Cmp(r) != 0 {
		return "", fmt.Errorf("canonical json: number %q is not exactly a float64", s)
	}
	return json.Number(b), nil
}
