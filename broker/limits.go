package broker

import (
	"cmp"
	"fmt"
	"time"

	"golang.org/x/time/rate"

	"github.com/claudemesh/broker/protocol"
)

// memberLimits are a member's request rates on this replica, shared by all its sessions here
// (token buckets): keyed by member like the send limit, so that a member opening more sessions
// does not get more of the database. Like it, they are per replica.
type memberLimits struct {
	// send bounds sends (SEND_RATE_PER_MEMBER).
	send *rate.Limiter
	// write bounds the requests that write to Postgres, NOTIFY every replica or append an
	// audit entry (WRITE_RATE_PER_MEMBER): each takes the cluster-wide notification lock at
	// commit, and set_state fans a state_change out to the whole mesh.
	write *rate.Limiter
	// read bounds the requests that only read (READ_RATE_PER_MEMBER): cheaper, but a
	// list_state answers up to MAX_STATE_BYTES_PER_MESH and a list_peers the whole mesh.
	read *rate.Limiter
	// listBytes bounds the bytes of the list_peers and list_state replies (listBytesPerSecond,
	// listBytesBurst). A list_peers answers every session of the mesh with its summary, cwd,
	// groups and names: up to about 97 KB a session, 9.7 MB for a mesh of 100, from a frame of
	// a few bytes. At the read rate alone one member made a replica encode 190 MB a second and,
	// from sessions that did not read, hold a gigabyte.
	listBytes *rate.Limiter
}

// A member's list replies on one replica: a few megabytes a second, and one whole reply of
// the largest mesh (MAX_CONNECTIONS_PER_MESH sessions with every field at its limit) at once.
// A reply is charged once built (its size is known then): the member's next list waits until
// the bucket is no longer in debt.
const (
	listBytesPerSecond = 4 << 20
	listBytesBurst     = 16 << 20
)

func newMemberLimits(cfg Config) *memberLimits {
	return &memberLimits{
		send:  rate.NewLimiter(rate.Limit(cfg.SendRatePerMember), cfg.SendBurstPerMember),
		write: rate.NewLimiter(rate.Limit(cfg.WriteRatePerMember), cfg.WriteBurstPerMember),
		read:  rate.NewLimiter(rate.Limit(cfg.ReadRatePerMember), cfg.ReadBurstPerMember),
		listBytes: rate.NewLimiter(rate.Limit(cmp.Or(cfg.listBytesRate, listBytesPerSecond)),
			cmp.Or(cfg.listBytesBurst, listBytesBurst)),
	}
}

// listed charges the bytes of a list_peers or list_state reply; a reply larger than what is
// left puts the bucket in debt (at most a burst), which refuses the member's next lists here.
func (l *memberLimits) listed(n int) {
	if l != nil && n > 0 {
		l.listBytes.ReserveN(time.Now(), min(n, l.listBytes.Burst()))
	}
}

// full reports whether every bucket is full again: a member's next session then starts from
// the same budget whether it is given these limiters or new ones.
func (l *memberLimits) full() bool {
	now := time.Now()
	for _, lim := range []*rate.Limiter{l.send, l.write, l.read, l.listBytes} {
		if lim.TokensAt(now) < float64(lim.Burst()) {
			return false
		}
	}
	return true
}

// allow takes a token for msg from its bucket and returns "" when it may go on, else the
// refusal's message. Sends have their own check (checkSend); client_ack has no rate: it only
// acknowledges what was pushed (session.ackAllowance), and the recorder batches acks into
// shared statements.
func (l *memberLimits) allow(msg protocol.ClientMessage, cfg Config) string {
	if l == nil {
		return ""
	}
	var lim *rate.Limiter
	var env string
	var perSec, burst int
	switch msg.(type) {
	case *protocol.SetStatus, *protocol.SetSummary, *protocol.JoinGroup, *protocol.LeaveGroup, *protocol.SetState,
		*protocol.Kick, *protocol.Ban, *protocol.Unban:
		lim, env, perSec, burst = l.write, "WRITE_RATE_PER_MEMBER", cfg.WriteRatePerMember, cfg.WriteBurstPerMember
	case *protocol.ListPeers, *protocol.ListState:
		// Checked first: a refusal here takes no read token.
		if l.listBytes.TokensAt(time.Now()) < 1 {
			return fmt.Sprintf("%s: this member's list_peers and list_state replies on this replica are over %d KiB a second "+
				"(bursts of %d KiB); retry in a few seconds", msg.Type(), int(l.listBytes.Limit())>>10, l.listBytes.Burst()>>10)
		}
		lim, env, perSec, burst = l.read, "READ_RATE_PER_MEMBER", cfg.ReadRatePerMember, cfg.ReadBurstPerMember
	case *protocol.GetState, *protocol.MessageStatus, *protocol.ListBans:
		lim, env, perSec, burst = l.read, "READ_RATE_PER_MEMBER", cfg.ReadRatePerMember, cfg.ReadBurstPerMember
	default:
		return ""
	}
	if lim.Allow() {
		return ""
	}
	return fmt.Sprintf("%s: this member's requests on this replica are over %s (%d a second, bursts of %d); retry in a moment",
		msg.Type(), env, perSec, burst)
}
