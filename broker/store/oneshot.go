package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/db"
)

// The hot operations, each one statement and one round trip that commits (migration 00005):
// a replica may be a wide-area round trip from the primary, and no lock (the mesh's capacity,
// its audit-chain head) is ever held across one.

// ReleaseLimit bounds how many held deliveries a status change hands to a session at once
// (the rest it claims); it is the session's push window.
var ReleaseLimit = 128

// HelloParams is a hello whose signatures the replica verified: a plain hello (Role
// control-plane, MemberID the hello's memberId) or a session_hello (Role session, MemberPubkey
// the parent's key, MemberID the optional parentMemberId).
type HelloParams struct {
	MeshID, MemberID, MemberPubkey, SessionID string
	SessionPubkey                             string // "" when none
	DisplayName, CWD                          string
	Role, Hostname, PeerType, Channel, Model  string
	PID                                       int
	Groups                                    []Group
	Capabilities                              []string
	Signature                                 string
	SignatureExpires                          time.Time
	// LocalLive: this replica holds a live socket of this session, by sessionId or session key
	// (a reconnect while the old socket lingers is a replacement, not a resume).
	LocalLive bool
}

// HelloResult is a hello's outcome: Refusal is "" when the presence was registered, else the
// protocol code (capacity, unauthorized, revoked, parent_member_id_mismatch, hello_replayed,
// session_key_taken).
type HelloResult struct {
	Refusal      string
	MemberID     string
	Registration Registration
	Resumed      bool
	DisplayName  string
	Limit        int // the mesh's session limit, for the capacity message
	// Waiting: something may wait for the session to claim: deliveries pending for its member
	// when the hello committed. That includes pushes to an earlier connection of the session
	// (it resumed or replaced one): the hello made them pending again before its commit.
	// False: nothing did when the hello committed.
	Waiting bool
	Err     error
}

// Hellos checks and registers hellos in one statement, each as claudemesh.hello does alone:
// membership, replay, session key, capacity under the mesh's lock, the presence, its
// notifications and its audit entry. The results are in the order of hs; a hello that failed
// with an error (not a refusal) has Err set, and fails alone.
func (s *Store) Hellos(ctx context.Context, nodeID string, defaultLimit int, hs []HelloParams) ([]HelloResult, error) {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("hello: %w", err)
	}
	defer conn.Release()
	n := len(hs)
	meshes, keys := make([]string, n), make([]string, n)
	for i, h := range hs {
		meshes[i], keys[i] = h.MeshID, h.MemberPubkey
	}
	// What waits for the new sessions, read after the batch's commit in the same flight.
	waiting := make([]bool, n)
	probe := &thenStatement{sql: db.HelloWaitingSQL, args: []any{meshes, keys}, read: func(rows pgx.Rows, err error) {
		var idx []int32
		if err == nil {
			idx, err = pgx.CollectRows(rows, pgx.RowTo[int32])
		}
		if err != nil {
			// Not known: every session is claimed for, as it would be without the probe.
			s.log.Warn("hello: could not read what waits for the new sessions; claiming for all", "hellos", n, "err", err)
			for i := range waiting {
				waiting[i] = true
			}
			return
		}
		for _, i := range idx {
			if i >= 1 && int(i) <= n {
				waiting[i-1] = true
			}
		}
	}}
	rows, err := db.New(committed{conn: conn, log: s.log, then: probe}).HelloBatch(ctx,
		helloBatchParams(nodeID, s.ns, defaultLimit, hs))
	if err != nil {
		return nil, fmt.Errorf("hello: %w", err)
	}
	out := helloResults(n, rows)
	for i := range out {
		out[i].Waiting = waiting[i]
	}
	return out, nil
}

func helloBatchParams(nodeID, ns string, defaultLimit int, hs []HelloParams) db.HelloBatchParams {
	n := len(hs)
	p := db.HelloBatchParams{NodeID: nodeID, Ns: ns, DefaultLimit: int32(defaultLimit), HMesh: make([]string, n),
		HMemberID: make([]string, n), HPubkey: make([]string, n), HSessionID: make([]string, n),
		HSessionPubkey: make([]string, n), HDisplayName: make([]string, n), HPid: make([]int32, n), HCwd: make([]string, n),
		HGroups: make([]json.RawMessage, n), HCaps: make([]json.RawMessage, n), HSignature: make([]string, n),
		HSigExpires: make([]time.Time, n), HLocalLive: make([]bool, n), HRole: make([]string, n), HHostname: make([]string, n),
		HPeerType: make([]string, n), HChannel: make([]string, n), HModel: make([]string, n)}
	for i, h := range hs {
		p.HGroups[i], _ = json.Marshal(nonNil(h.Groups))
		p.HCaps[i], _ = json.Marshal(nonNil(h.Capabilities))
		p.HMesh[i], p.HMemberID[i], p.HPubkey[i], p.HSessionID[i] = h.MeshID, h.MemberID, h.MemberPubkey, h.SessionID
		p.HSessionPubkey[i], p.HDisplayName[i], p.HPid[i], p.HCwd[i] = h.SessionPubkey, h.DisplayName, int32(h.PID), h.CWD
		p.HSignature[i], p.HSigExpires[i], p.HLocalLive[i] = h.Signature, h.SignatureExpires, h.LocalLive
		p.HRole[i], p.HHostname[i], p.HPeerType[i], p.HChannel[i], p.HModel[i] = h.Role, h.Hostname, h.PeerType, h.Channel, h.Model
	}
	return p
}

// helloResults puts a batch's rows in the hellos' order (the statement answers in mesh order).
func helloResults(n int, rows []db.HelloBatchRow) []HelloResult {
	out := make([]HelloResult, n)
	for _, r := range rows {
		i := int(r.Idx) - 1
		if i < 0 || i >= n {
			continue
		}
		if r.Failure != "" {
			if busy(r.Failure) {
				out[i].Err = ErrHelloBusy
				continue
			}
			out[i].Err = fmt.Errorf("hello: %s", r.Failure)
			continue
		}
		out[i] = HelloResult{Refusal: r.Code, MemberID: r.MemberID, Resumed: r.Resumed, DisplayName: r.DisplayName,
			Limit: int(r.MaxSessions), Registration: Registration{PresenceID: r.PresenceID, Status: r.Status, Epoch: r.Epoch,
				OldNode: r.OldNode}}
	}
	return out
}

// ErrHelloBusy is a hello that waited too long for a lock (hello_batch's lock_timeout, 00035)
// or was chosen as a deadlock's victim: it failed alone, and a retry may pass.
var ErrHelloBusy = errors.New("hello: waited too long for a lock")

// busy reports whether a hello's failure (SQLSTATE: message) is lock_not_available or
// deadlock_detected.
func busy(failure string) bool {
	return strings.HasPrefix(failure, "55P03:") || strings.HasPrefix(failure, "40P01:")
}

// SendKind is what a send's target resolved to before the database: a member or session key,
// everyone, or a group.
type SendKind string

// Send kinds.
const (
	SendDirect SendKind = "direct"
	SendAll    SendKind = "all"
	SendGroup  SendKind = "group"
)

// OutgoingEnvelope is an envelope of a send batch and its target.
type OutgoingEnvelope struct {
	Envelope
	Kind SendKind
	Key  string // the normalized target key (direct) or the group name (group)
	// Frame is the envelope's push, encoded once: other replicas get it inside their
	// notification. nil when too large to ride along (InlineMax): they claim it instead.
	Frame []byte
}

// InlineMax is the largest push frame that rides inside a notification (under Postgres's
// 8000-byte payload, with room for the line around it).
const InlineMax = 6000

// SentEnvelope is an envelope's outcome: stored (Queued) with that many recipients, or not
// (a direct target that is no member and no session key of the mesh, or one whose waiting
// messages are at the bound: Skipped), or a retry of a stored one (Original: its id,
// StoredFingerprint: its request fingerprint), not stored again.
type SentEnvelope struct {
	Queued     bool
	Recipients int
	// Skipped counts deliveries left out because what waits for their member reached the
	// bound (SweepBacklog): a direct send's one (refused), or a multicast's, one a session.
	Skipped           int
	Original          string
	StoredFingerprint string
}

// LocalDelivery is a delivery of the batch for a session of this node: assigned to it (push
// it now) or pending for it (too large to assign: the session claims it).
type LocalDelivery struct {
	Envelope   int // index into the batch
	ID         int64
	PresenceID string
	Assigned   bool
}

// sendBatchParams lays a batch out as the statement's arrays, one element per envelope.
func sendBatchParams(nodeID, ns string, envs []OutgoingEnvelope) db.SendBatchParams {
	n := len(envs)
	p := db.SendBatchParams{NodeID: nodeID, Ns: ns, EIds: make([]string, n), EMesh: make([]string, n),
		ESender: make([]string, n), ESenderPub: make([]string, n), ESenderMemberPub: make([]string, n),
		ESpec: make([]string, n), EKind: make([]string, n), EKey: make([]string, n), EPrio: make([]string, n),
		ENonce: make([]string, n), ECipher: make([]string, n), EClient: make([]string, n),
		ECreated: make([]time.Time, n), EExpires: make([]time.Time, n), ECmid: make([]string, n), EFp: make([]string, n),
		ESenderName: make([]string, n), EFrame: make([]string, n)}
	for i, e := range envs {
		p.EIds[i], p.EMesh[i], p.ESender[i], p.ESenderPub[i] = e.ID, e.MeshID, e.SenderMemberID, e.SenderPubkey
		p.ESenderMemberPub[i], p.ESpec[i], p.EKind[i], p.EKey[i] = e.SenderMemberPubkey, e.TargetSpec, string(e.Kind), e.Key
		p.EPrio[i], p.ENonce[i], p.ECipher[i], p.EClient[i] = e.Priority, e.Nonce, e.Ciphertext, e.ClientID
		p.ECreated[i], p.EExpires[i] = e.CreatedAt, e.ExpiresAt
		p.ECmid[i], p.EFp[i], p.ESenderName[i] = e.ClientMessageID, e.RequestFingerprint, e.SenderName
		if len(e.Frame) <= InlineMax {
			p.EFrame[i] = string(e.Frame)
		}
	}
	return p
}

// SendBatch stores a batch in one statement: recipients resolved cluster-wide, envelopes and
// deliveries, the audit entries, the other replicas told (inline pushes, wake-ups), from
// inside its commit or right after it in the same round trip (SetNotifyAfterCommit). It
// returns each envelope's outcome and the deliveries this node takes part in.
func (s *Store) SendBatch(ctx context.Context, nodeID string, envs []OutgoingEnvelope) ([]SentEnvelope, []LocalDelivery, error) {
	sent, local, flushed, err := s.SendBatchCommitted(ctx, nodeID, envs)
	if err != nil {
		return nil, nil, err
	}
	if err := flushed(); err != nil {
		return nil, nil, fmt.Errorf("send batch: %w", err)
	}
	return sent, local, nil
}

// SendBatchCommitted is SendBatch up to its commit, which the other replicas may already have
// pushed: flushed (to be called once, within ctx, when err is nil) waits for Postgres to
// confirm that the commit is on disk, and only then is the batch stored. An error from it
// leaves the outcome unknown (OutcomeUnknown). Meanwhile the caller may start the next batch
// of the same senders: it commits after this one.
func (s *Store) SendBatchCommitted(ctx context.Context, nodeID string, envs []OutgoingEnvelope) (
	sent []SentEnvelope, local []LocalDelivery, flushed func() error, err error) {
	n := len(envs)
	p := sendBatchParams(nodeID, s.ns, envs)
	var rows []db.SendBatchRow
	flushed, err = s.notifying(ctx, func(q *db.Queries) (err error) {
		rows, err = q.SendBatch(ctx, p)
		return err
	})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("send batch: %w", err)
	}
	out := make([]SentEnvelope, n)
	for _, r := range rows {
		i := int(r.Idx) - 1
		switch r.RowKind {
		case "e":
			out[i].Queued, out[i].Recipients = r.Queued, int(r.Recipients)
			continue
		case "f":
			out[i].Skipped = int(r.Recipients)
			continue
		case "x":
			out[i] = SentEnvelope{Queued: true, Original: r.Original, StoredFingerprint: r.Fingerprint}
			continue
		}
		local = append(local, LocalDelivery{Envelope: i, ID: r.DeliveryID, PresenceID: r.PresenceID, Assigned: r.Assigned})
	}
	return out, local, flushed, nil
}

// HookOutcome is what a hook changed: the sessions it matched, or none yet (pending: the
// signal waits 10 s for the session's hello), or nothing because its signature was replayed
// or its key is no live member's (NotMember: nothing was written, migration 00048).
type HookOutcome struct {
	PresenceIDs []string
	Pending     bool
	Replayed    bool
	NotMember   bool
}

// HookStatus applies a hook's status in one statement: a signed hook's signature recorded
// (signature "" for an unsigned one), its sessions resolved (a signed hook's only among its
// member's), the status model applied to each, the owning replicas told (with the messages the
// change releases) and the mesh's peer_status events sent.
func (s *Store) HookStatus(ctx context.Context, h HookQuery, status string, fresh time.Duration, signature string, sigExpires time.Time) (HookOutcome, error) {
	rows, err := s.q.HookStatus(ctx, db.HookStatusParams{MemberPubkey: h.MemberPubkey, SessionID: h.SessionID, Pid: int32(h.PID),
		Cwd: h.CWD, Status: status, FreshSeconds: fresh.Seconds(), Ns: s.ns, ReleaseLimit: int32(ReleaseLimit),
		Signature: signature, SigExpires: sigExpires})
	if err != nil {
		return HookOutcome{}, fmt.Errorf("hook status: %w", err)
	}
	// Every call that writes returns a row; only a signed hook of a key no live member holds
	// returns none (00048).
	if len(rows) == 0 && h.MemberPubkey != "" {
		return HookOutcome{NotMember: true}, nil
	}
	var o HookOutcome
	for _, r := range rows {
		if r.Replayed {
			return HookOutcome{Replayed: true}, nil
		}
		if r.Pending {
			o.Pending = true
			continue
		}
		o.PresenceIDs = append(o.PresenceIDs, r.PresenceID)
	}
	return o, nil
}

// SetStatus applies a status to one presence in one statement (the status model, the owning
// replica and the mesh told, held messages released). changed is false when the model refused.
func (s *Store) SetStatus(ctx context.Context, presenceID, status, source string, fresh time.Duration) (bool, error) {
	rows, err := s.q.SetStatus(ctx, db.SetStatusParams{ID: presenceID, Status: status, Source: source,
		FreshSeconds: fresh.Seconds(), Ns: s.ns, ReleaseLimit: int32(ReleaseLimit)})
	if err != nil {
		return false, fmt.Errorf("set status: %w", err)
	}
	return len(rows) > 0, nil
}

// EndSessions records closed sockets in one statement: presences in grace until graceUntil, or
// ended (peer_left and an audit entry each), only at the epoch each socket owned; what was
// assigned or pushed to them back to pending, and every replica woken for those members.
func (s *Store) EndSessions(ctx context.Context, nodeID string, grace []PresenceRef, graceUntil time.Time, end []PresenceRef) error {
	gIDs, gEpochs := splitRefs(grace)
	xIDs, xEpochs := splitRefs(end)
	if _, err := s.q.EndSessions(ctx, db.EndSessionsParams{NodeID: nodeID, Ns: s.ns, GraceIds: gIDs, GraceEpochs: gEpochs,
		GraceUntil: graceUntil, EndIds: xIDs, EndEpochs: xEpochs}); err != nil {
		return fmt.Errorf("end sessions: %w", err)
	}
	return nil
}

// StateWrite is a shared-state write and who makes it.
type StateWrite struct {
	MeshID, Key string
	Value       json.RawMessage
	UpdatedBy   string // display name shown to readers
	PresenceID  string // the writer's session: it gets no state_change of its own write
	Actor       string // the writer's key, for the audit entry
	AuditData   []byte // the entry's canonical data (the key is the user's: encoded in Go)
	Quota       StateQuota
}

// SetState writes a key in one statement within the mesh's quota, tells every replica and
// appends the audit entry; ErrQuotaExceeded when the write would pass the quota. A null value
// deletes the key (00047): no quota applies, and a missing key is no error.
func (s *Store) SetState(ctx context.Context, w StateWrite) (StateEntry, error) {
	rows, err := s.q.SetStateOne(ctx, db.SetStateOneParams{Ns: s.ns, MeshID: w.MeshID, Key: w.Key, Value: w.Value,
		UpdatedBy: w.UpdatedBy, MaxKeys: int64(w.Quota.MaxKeys), MaxBytes: int64(w.Quota.MaxBytes), PresenceID: w.PresenceID,
		Actor: w.Actor, AuditData: string(w.AuditData)})
	if err != nil {
		return StateEntry{}, fmt.Errorf("set state: %w", err)
	}
	if len(rows) == 0 {
		return StateEntry{}, ErrQuotaExceeded
	}
	r := rows[0]
	return StateEntry{Key: r.Key, Value: r.Value, UpdatedBy: r.UpdatedBy, UpdatedAt: r.UpdatedAt}, nil
}
