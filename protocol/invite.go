package protocol

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// InviteVersion is the only invite payload version (the v field).
const InviteVersion = 1

// InviteLinkPrefix starts an invite link: ic://join/<token>.
const InviteLinkPrefix = "ic://join/"

// Length limits of invite payload fields, in bytes.
const (
	maxSlugLen        = 256
	maxBrokerURLLen   = 2048
	maxRootKeyLen     = 1024
	maxInviteKeyField = 256 // owner_pubkey and signature; VerifyInvite checks their format
)

// InvitePayload is an invite, signed by the mesh owner. Its token is the
// base64url (no padding) of its JSON; the field order below is the order
// claudemesh writes.
type InvitePayload struct {
	V         int    `json:"v"`
	MeshID    string `json:"mesh_id"`
	MeshSlug  string `json:"mesh_slug"`
	BrokerURL string `json:"broker_url"`
	// ExpiresAt is in Unix seconds.
	ExpiresAt int64 `json:"expires_at"`
	// MeshRootKey is the mesh's shared secret for group messages (opaque
	// here; never log it).
	MeshRootKey string `json:"mesh_root_key"`
	Role        string `json:"role"` // RoleAdmin or RoleMember
	// OwnerPubkey is the signer's key as written in the payload.
	OwnerPubkey string `json:"owner_pubkey"`
	Signature   string `json:"signature"`
}

// InviteSigningString is the canonical string an invite signs:
// v|mesh_id|mesh_slug|broker_url|expires_at|mesh_root_key|role|owner_pubkey,
// numbers in decimal, strings exactly as in the payload.
func InviteSigningString(p *InvitePayload) string {
	return strings.Join([]string{
		strconv.Itoa(p.V), p.MeshID, p.MeshSlug, p.BrokerURL,
		strconv.FormatInt(p.ExpiresAt, 10), p.MeshRootKey, p.Role, p.OwnerPubkey,
	}, "|")
}

// SignInvite signs p with the owner's key and sets p.Signature. It fills an
// empty V and OwnerPubkey, and refuses an OwnerPubkey that is not priv's.
func SignInvite(priv ed25519.PrivateKey, p *InvitePayload) error {
	pub := PubkeyHex(priv.Public().(ed25519.PublicKey))
	switch {
	case p.OwnerPubkey == "":
		p.OwnerPubkey = pub
	case !strings.EqualFold(p.OwnerPubkey, pub):
		return fmt.Errorf("sign invite: owner_pubkey is not the signing key's")
	}
	if p.V == 0 {
		p.V = InviteVersion
	}
	p.Signature = SignHex(priv, InviteSigningString(p))
	return nil
}

// VerifyInvite checks p's version and that its signature verifies against
// its own owner_pubkey. Every failure wraps ErrInviteBadSignature. Whether
// owner_pubkey is the mesh's owner key, and expiry, are the broker's checks.
func VerifyInvite(p *InvitePayload) error {
	if p.V != InviteVersion {
		return fmt.Errorf("%w: unsupported version %d", ErrInviteBadSignature, p.V)
	}
	if _, err := NormalizePubkey(p.OwnerPubkey); err != nil {
		return fmt.Errorf("%w: owner_pubkey: %w", ErrInviteBadSignature, err)
	}
	if _, err := NormalizeSignature(p.Signature); err != nil {
		return fmt.Errorf("%w: %w", ErrInviteBadSignature, err)
	}
	if !VerifyHex(p.OwnerPubkey, InviteSigningString(p), p.Signature) {
		return ErrInviteBadSignature
	}
	return nil
}

// EncodeInviteToken returns p's token: base64url, no padding, of its JSON.
func EncodeInviteToken(p *InvitePayload) (string, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // as JSON.stringify writes it (broker_url may hold '&')
	if err := enc.Encode(p); err != nil {
		return "", fmt.Errorf("encode invite token: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(bytes.TrimSuffix(buf.Bytes(), []byte("\n"))), nil
}

// InviteLink returns the link for a token.
func InviteLink(token string) string { return InviteLinkPrefix + token }

// ParseInviteToken decodes a token into its payload, strictly: every field
// is required with its JSON type, v must be 1 and role admin or member.
// Trailing '=' padding and surrounding space are tolerated. It does not
// verify the signature (see VerifyInvite). Errors are *Error with
// CodeBadRequest.
func ParseInviteToken(token string) (*InvitePayload, error) {
	token = strings.TrimRight(strings.TrimSpace(token), "=")
	if token == "" {
		return nil, badRequest("invite token: empty")
	}
	if len(token) > MaxInviteTokenLen {
		return nil, badRequest(fmt.Sprintf("invite token: too long (max %d bytes)", MaxInviteTokenLen))
	}
	raw, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil {
		return nil, badRequest("invite token: not base64url")
	}
	p, e := parseInvitePayload(string(raw))
	if e != nil {
		e.Message = "invite token: " + e.Message
		return nil, e
	}
	return p, nil
}

// ParseInviteLink accepts an invite link (ic://join/<token>) or a bare
// token and returns the token and its decoded payload.
func ParseInviteLink(s string) (token string, p *InvitePayload, err error) {
	token = strings.TrimSpace(s)
	token = strings.TrimPrefix(token, InviteLinkPrefix)
	p, err = ParseInviteToken(token)
	if err != nil {
		return "", nil, err
	}
	return token, p, nil
}

// parseInvitePayload decodes the payload JSON object.
func parseInvitePayload(raw string) (*InvitePayload, *Error) {
	o, err := parseObject(raw)
	if err != nil {
		return nil, badRequest(err.Error())
	}
	return inviteFromObject(o)
}

func inviteFromObject(o object) (*InvitePayload, *Error) {
	var p InvitePayload
	var e *Error
	v, e := o.reqInt("v")
	if e != nil {
		return nil, e
	}
	if v != InviteVersion {
		return nil, badRequest(fmt.Sprintf("v: unsupported invite version %d", v))
	}
	p.V = InviteVersion
	if p.MeshID, e = o.reqNonEmpty("mesh_id", MaxIDLen); e != nil {
		return nil, e
	}
	if p.MeshSlug, e = o.reqStr("mesh_slug", maxSlugLen); e != nil {
		return nil, e
	}
	if p.BrokerURL, e = o.reqStr("broker_url", maxBrokerURLLen); e != nil {
		return nil, e
	}
	if p.ExpiresAt, e = o.reqInt("expires_at"); e != nil {
		return nil, e
	}
	if p.MeshRootKey, e = o.reqStr("mesh_root_key", maxRootKeyLen); e != nil {
		return nil, e
	}
	if p.Role, e = o.reqStr("role", 0); e != nil {
		return nil, e
	}
	if p.Role != RoleAdmin && p.Role != RoleMember {
		return nil, badRequest("role: must be admin or member")
	}
	if p.OwnerPubkey, e = o.reqStr("owner_pubkey", maxInviteKeyField); e != nil {
		return nil, e
	}
	if p.Signature, e = o.reqStr("signature", maxInviteKeyField); e != nil {
		return nil, e
	}
	return &p, nil
}
