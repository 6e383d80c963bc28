package protocol

import (
	"crypto/ed25519"
	"encoding/hex"
	"strconv"
	"strings"
	"time"
)

// Keys travel as hex: ed25519 public keys are 64 hex characters, signatures
// 128. Compare them case-insensitively and store them lowercase.

// NormalizePubkey checks that s is 64 hex characters and returns it
// lowercase, or ErrMalformedKey.
func NormalizePubkey(s string) (string, error) {
	return normalizeHex(s, 2*ed25519.PublicKeySize, ErrMalformedKey)
}

// NormalizeSignature checks that s is 128 hex characters and returns it
// lowercase, or ErrMalformedSignature.
func NormalizeSignature(s string) (string, error) {
	return normalizeHex(s, 2*ed25519.SignatureSize, ErrMalformedSignature)
}

func normalizeHex(s string, n int, errMalformed error) (string, error) {
	if len(s) != n {
		return "", errMalformed
	}
	lower := true
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case '0' <= c && c <= '9', 'a' <= c && c <= 'f':
		case 'A' <= c && c <= 'F':
			lower = false
		default:
			return "", errMalformed
		}
	}
	if lower {
		return s, nil
	}
	return strings.ToLower(s), nil
}

// PubkeyHex returns the lowercase hex form of an ed25519 public key.
func PubkeyHex(pub ed25519.PublicKey) string { return hex.EncodeToString(pub) }

// ParsePubkey decodes a hex public key (any case).
func ParsePubkey(s string) (ed25519.PublicKey, error) {
	norm, err := NormalizePubkey(s)
	if err != nil {
		return nil, err
	}
	b, _ := hex.DecodeString(norm) // valid hex: checked above
	return ed25519.PublicKey(b), nil
}

// SignHex signs the UTF-8 bytes of msg and returns the signature as
// lowercase hex.
func SignHex(priv ed25519.PrivateKey, msg string) string {
	return hex.EncodeToString(ed25519.Sign(priv, []byte(msg)))
}

// VerifyHex reports whether sigHex is a valid signature of msg by pubHex.
// Both are hex of any case; a malformed key or signature does not verify.
func VerifyHex(pubHex, msg, sigHex string) bool {
	pub, err := ParsePubkey(pubHex)
	if err != nil {
		return false
	}
	sigNorm, err := NormalizeSignature(sigHex)
	if err != nil {
		return false
	}
	sig, _ := hex.DecodeString(sigNorm)
	return ed25519.Verify(pub, []byte(msg), sig)
}

// HelloSigningString is the canonical string a hello signs:
// meshId|memberId|pubkey|timestamp, timestamp in decimal. pubkey is the
// string exactly as sent in the hello, not normalised: a peer that sends
// uppercase hex signed uppercase hex.
func HelloSigningString(meshID, memberID, pubkey string, timestampMs int64) string {
	return meshID + "|" + memberID + "|" + pubkey + "|" + strconv.FormatInt(timestampMs, 10)
}

// SignHello signs a hello's canonical string and returns the hex signature.
// pubkey must be the exact string the hello will carry.
func SignHello(priv ed25519.PrivateKey, meshID, memberID, pubkey string, timestampMs int64) string {
	return SignHex(priv, HelloSigningString(meshID, memberID, pubkey, timestampMs))
}

// VerifyHello reports whether signature (hex) is pubkey's signature of the
// hello's canonical string. Pass the fields exactly as received. It does not
// check the timestamp's skew.
func VerifyHello(meshID, memberID, pubkey string, timestampMs int64, signature string) bool {
	return VerifyHex(pubkey, HelloSigningString(meshID, memberID, pubkey, timestampMs), signature)
}

// HookSigningString is the canonical string a signed hook request signs (ext):
// claudemesh-hook|v1|pubkey|timestamp|status|pid|len(session_id)|session_id|cwd, numbers in
// decimal. The length prefix and cwd last keep it unambiguous whatever the strings hold.
func HookSigningString(r *HookRequest) string {
	return "claudemesh-hook|v1|" + r.Pubkey + "|" + strconv.FormatInt(r.Timestamp, 10) + "|" + string(r.Status) + "|" +
		strconv.Itoa(r.PID) + "|" + strconv.Itoa(len(r.SessionID)) + "|" + r.SessionID + "|" + r.CWD
}

// SignHook fills r's pubkey, timestamp and signature: the member key proves the hook comes
// from that member, so the broker applies it to that member's sessions only.
func SignHook(priv ed25519.PrivateKey, r *HookRequest, now time.Time) {
	r.Pubkey = hex.EncodeToString(priv.Public().(ed25519.PublicKey))
	r.Timestamp = now.UnixMilli()
	r.Signature = SignHex(priv, HookSigningString(r))
}

// VerifyHook reports whether r carries a valid signature by r.Pubkey. It does not check the
// timestamp's skew.
func VerifyHook(r *HookRequest) bool {
	return VerifyHex(r.Pubkey, HookSigningString(r), r.Signature)
}
