package protocol

import (
	"strings"
)

// HTTP endpoint paths and limits.
const (
	PathWS        = "/ws"
	PathJoin      = "/join"
	PathHookState = "/hook/set-status"
	PathHealth    = "/health"
	PathMetrics   = "/metrics"

	// HookTokenHeader (ext) carries the hook token; the hook_token body
	// field is the alternative.
	HookTokenHeader = "X-Hook-Token"

	// MaxJoinBodyBytes and MaxHookBodyBytes bound the request bodies; the
	// HTTP layer answers 413 above them.
	MaxJoinBodyBytes = 32 << 10
	MaxHookBodyBytes = 16 << 10
)

// JoinRequest is the body of POST /join.
type JoinRequest struct {
	// InviteToken is the invite's token (the invite row is found by it).
	InviteToken string `json:"invite_token"`
	// InvitePayload is the decoded, not yet verified, payload.
	InvitePayload InvitePayload `json:"invite_payload"`
	// PeerPubkey is the joining member's key, normalised to lowercase.
	PeerPubkey  string `json:"peer_pubkey"`
	DisplayName string `json:"display_name,omitempty"`
}

// JoinResponse is the body of the /join answer: 200 {ok:true, memberId,
// alreadyMember?} or 400 {ok:false, error} with a JoinErr* value or a parse
// error message.
type JoinResponse struct {
	OK            bool   `json:"ok"`
	MemberID      string `json:"memberId,omitempty"`
	AlreadyMember bool   `json:"alreadyMember,omitempty"`
	Error         string `json:"error,omitempty"`
}

// ParseJoinRequest parses and validates a /join body. Errors are *Error
// with CodeBadRequest; the HTTP layer answers 400 {ok:false, error: Message}.
//
// invite_payload is accepted in every form peers send: a JSON object (the
// payload), or a string holding either the payload's JSON or the token or
// link. When it is absent or null the payload is decoded from invite_token,
// which is its base64url form. invite_token may also be given as a link; the
// ic://join/ prefix is removed. peer_pubkey must be 64 hex characters and is
// returned lowercase.
func ParseJoinRequest(body []byte) (JoinRequest, error) {
	var r JoinRequest
	o, err := parseObject(string(body))
	if err != nil {
		return r, badRequest(err.Error())
	}
	token, e := o.reqNonEmpty("invite_token", MaxInviteTokenLen)
	if e != nil {
		return r, e
	}
	r.InviteToken = strings.TrimPrefix(strings.TrimSpace(token), InviteLinkPrefix)

	p, e := joinPayload(o, r.InviteToken)
	if e != nil {
		return r, e
	}
	r.InvitePayload = *p

	pub, e := o.reqStr("peer_pubkey", 0)
	if e != nil {
		return r, e
	}
	if r.PeerPubkey, err = NormalizePubkey(pub); err != nil {
		return r, badRequest("peer_pubkey: must be 64 hex characters")
	}
	if r.DisplayName, e = o.optStr("display_name", MaxDisplayNameLen); e != nil {
		return r, e
	}
	return r, nil
}

func joinPayload(o object, token string) (*InvitePayload, *Error) {
	const field = "invite_payload"
	f, e := o.present(field)
	if e != nil {
		return nil, e
	}
	var p *InvitePayload
	switch {
	case f == nil: // the token is the payload
		var err error
		if p, err = ParseInviteToken(token); err != nil {
			e := err.(*Error)
			e.Message = "invite_token: " + e.Message
			return nil, e
		}
		return p, nil
	case f.kind == '{':
		sub, err := parseObject(f.val)
		if err != nil {
			return nil, badRequest(field + ": " + err.Error())
		}
		p, e = inviteFromObject(sub)
	case f.kind == '"':
		s := strings.TrimSpace(f.str())
		if len(s) > MaxInviteTokenLen {
			return nil, badRequest(field + ": too long")
		}
		if strings.HasPrefix(s, "{") {
			p, e = parseInvitePayload(s)
		} else {
			var err error
			if _, p, err = ParseInviteLink(s); err != nil {
				e = err.(*Error)
			}
		}
	default:
		return nil, badRequest(field + ": must be an object or a string")
	}
	if e != nil {
		e.Message = field + ": " + e.Message
		return nil, e
	}
	return p, nil
}

// HookRequest is the body of POST /hook/set-status.
type HookRequest struct {
	CWD string `json:"cwd"`
	// PID is the reporting process's pid, 0 when absent.
	PID    int    `json:"pid,omitempty"`
	Status Status `json:"status"`
	// SessionID is Claude Code's session id, "" when absent (claudemesh's
	// hook sends "" when it has none).
	SessionID string `json:"session_id,omitempty"`
	// HookToken (ext) is the body form of the X-Hook-Token header.
	HookToken string `json:"hook_token,omitempty"`
	// Signed form (ext): the member key, a timestamp in ms since the epoch
	// and an ed25519 signature of HookSigningString. All three or none.
	Pubkey    string `json:"pubkey,omitempty"`
	Timestamp int64  `json:"timestamp,omitempty"`
	Signature string `json:"signature,omitempty"`
}

// Signed reports whether the request carries the signed form.
func (r *HookRequest) Signed() bool { return r.Signature != "" }

// HookResponse is the body of the /hook/set-status answer: {ok:true,
// presence_id}, {ok:true, pending:true}, or {ok:false, error}.
type HookResponse struct {
	OK         bool   `json:"ok"`
	PresenceID string `json:"presence_id,omitempty"`
	Pending    bool   `json:"pending,omitempty"`
	Error      string `json:"error,omitempty"`
}

// ParseHookRequest parses and validates a /hook/set-status body. cwd
// (non-empty) and status are required; pid, session_id and hook_token are
// optional and null means absent. Errors are *Error with CodeBadRequest;
// the HTTP layer answers 400 {ok:false, error: Message}.
func ParseHookRequest(body []byte) (HookRequest, error) {
	var r HookRequest
	o, err := parseObject(string(body))
	if err != nil {
		return r, badRequest(err.Error())
	}
	var e *Error
	if r.CWD, e = o.reqNonEmpty("cwd", MaxCWDLen); e != nil {
		return r, e
	}
	pid, _, e := o.integer("pid")
	if e != nil {
		return r, e
	}
	if r.PID, e = nonNegInt("pid", pid); e != nil {
		return r, e
	}
	st, e := o.reqStr("status", 0)
	if e != nil {
		return r, e
	}
	var ok bool
	if r.Status, ok = parseStatus(st); !ok {
		return r, badRequest("status: must be one of idle, working, dnd")
	}
	if r.SessionID, e = o.optStr("session_id", MaxIDLen); e != nil {
		return r, e
	}
	if r.HookToken, e = o.optStr("hook_token", MaxHookTokenLen); e != nil {
		return r, e
	}
	if r.Pubkey, e = o.optStr("pubkey", 0); e != nil {
		return r, e
	}
	if r.Signature, e = o.optStr("signature", 0); e != nil {
		return r, e
	}
	ts, hasTS, e := o.integer("timestamp")
	if e != nil {
		return r, e
	}
	r.Timestamp = ts
	if r.Pubkey != "" || r.Signature != "" || hasTS {
		// Formats are checked here so the broker rejects a bad signed hook without work.
		if _, err := NormalizePubkey(r.Pubkey); err != nil {
			return r, badRequest("pubkey: must be 64 hex characters (with timestamp and signature)")
		}
		if _, err := NormalizeSignature(r.Signature); err != nil {
			return r, badRequest("signature: must be 128 hex characters (with pubkey and timestamp)")
		}
		if !hasTS {
			return r, badRequest("timestamp: required integer (with pubkey and signature)")
		}
		if ts <= 0 {
			// Milliseconds since the epoch: 0 or less is no signing time (and would not
			// survive re-encoding, where 0 means unsigned).
			return r, badRequest("timestamp: must be a positive integer (milliseconds since the epoch)")
		}
	}
	return r, nil
}
