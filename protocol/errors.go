package protocol

import (
	"encoding/json"
	"errors"
)

// Error codes carried by the wire error message (and by ack.error for
// refused sends).
const (
	// CodeBadRequest: invalid JSON, or a missing or ill-typed field; the
	// message names the field. The session stays open.
	CodeBadRequest = "bad_request"
	// CodeUnknownMessageType: the type is not one this broker handles.
	CodeUnknownMessageType = "unknown_message_type"
	// CodeNoHello: a message other than hello before a successful hello.
	CodeNoHello = "no_hello"

	// Hello refusals. Each is followed by close 1008, except CodeRevoked
	// (close 4002). The broker checks timestamp, formats and signature
	// first (no database work for an unauthenticated hello), then membership,
	// revocation, replay, the session key and capacity last (docs/protocol.md).
	CodeCapacity        = "capacity"          // the mesh's live sessions reached its limit
	CodeTimestampSkew   = "timestamp_skew"    // more than HelloMaxSkew off
	CodeMalformed       = "malformed"         // key or signature not hex of the right length
	CodeBadSignature    = "bad_signature"     // signature does not verify
	CodeUnauthorized    = "unauthorized"      // no live member with that mesh + pubkey
	CodeRevoked         = "revoked"           // the member was revoked
	CodeSessionKeyTaken = "session_key_taken" // (ext) sessionPubkey bound to another member, or another member's key
	CodeHelloReplayed   = "hello_replayed"    // (ext) this exact signed hello was already used
	CodeOverloaded      = "overloaded"        // (ext) too many hellos at once: retry shortly (close 1013)

	// CodeNotFound: message_status for an unknown id or one of another mesh.
	CodeNotFound = "not_found"
	// CodeQuotaExceeded (ext): set_state beyond the mesh's shared-state
	// quota, join_group beyond the groups a session may hold.
	CodeQuotaExceeded = "quota_exceeded"

	// Send refusals, reported as ack{queued:false, error}.
	CodeNoRecipient = "no_recipient" // direct target is no member or session key of the mesh
	CodeTooLarge    = "too_large"
	CodeRateLimited = "rate_limited"
	// (ext) the direct target's waiting messages (stored, not yet delivered) reached
	// MAX_PENDING_PER_MEMBER: nothing stored; retry once it has read some.
	CodeRecipientFull = "recipient_full"
	// CodeUnavailable (ext): the envelope was not stored (the replica is draining, or
	// Postgres did not answer): nothing stored; send it again, on another connection if this
	// one closes.
	CodeUnavailable = "unavailable"
)

// /join error values (the error field of a 400 JoinResponse).
const (
	JoinErrInviteBadSignature  = "invite_bad_signature"
	JoinErrMeshNotFound        = "mesh_not_found"
	JoinErrMeshMissingOwnerKey = "mesh_missing_owner_key"
	JoinErrInviteOwnerMismatch = "invite_owner_mismatch"
	JoinErrInviteNotFound      = "invite_not_found"
	JoinErrInviteMeshMismatch  = "invite_mesh_mismatch"
	JoinErrInviteRevoked       = "invite_revoked"
	JoinErrInviteExpired       = "invite_expired"
	JoinErrInviteExhausted     = "invite_exhausted"
	JoinErrMemberInsertFailed  = "member_insert_failed"
	// JoinErrInvitePayloadMismatch (ext): the payload is not the one the
	// invite with that token was created with (a token of one invite with
	// the payload of another).
	JoinErrInvitePayloadMismatch = "invite_payload_mismatch"
	// JoinErrMemberRevoked (ext): the key was revoked in the mesh (banned, or revoked by the
	// operator) and has no live member there: an invite does not readmit it; an unban or the
	// operator's `broker member add` does.
	JoinErrMemberRevoked = "member_revoked"
	HookErrRateLimited   = "rate limited" // /hook/set-status 429 body error, as protocol.md writes it
)

// Sentinel errors of the key and invite helpers.
var (
	// ErrMalformedKey: not 64 hex characters.
	ErrMalformedKey = errors.New("malformed key: want 64 hex characters")
	// ErrMalformedSignature: not 128 hex characters.
	ErrMalformedSignature = errors.New("malformed signature: want 128 hex characters")
	// ErrInviteBadSignature: the invite's signature does not verify against
	// its owner_pubkey (maps to JoinErrInviteBadSignature).
	ErrInviteBadSignature = errors.New(JoinErrInviteBadSignature)
	// ErrUnknownType: DecodeServer met a message type it does not know.
	ErrUnknownType = errors.New("unknown message type")
)

// Error is the wire error message {type:"error", code, message, id?, _reqId?}
// and the error returned by the decoders and parse functions, so the broker
// can write a decode failure back as is.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	// ID echoes a send's client id when the error is about that send.
	ID string `json:"id,omitempty"`
	// ReqID echoes the request's _reqId whenever it could be read.
	ReqID string `json:"_reqId,omitempty"`
}

// Error implements error.
func (e *Error) Error() string {
	if e.Message == "" {
		return e.Code
	}
	return e.Code + ": " + e.Message
}

// Type implements ServerMessage.
func (e *Error) Type() string { return TypeError }

// RequestID implements ServerMessage.
func (e *Error) RequestID() string { return e.ReqID }

// MarshalJSON writes the wire form, type included.
func (e Error) MarshalJSON() ([]byte, error) {
	type wire Error
	return json.Marshal(struct {
		Type string `json:"type"`
		wire
	}{TypeError, wire(e)})
}

func badRequest(msg string) *Error {
	return &Error{Code: CodeBadRequest, Message: msg}
}
