package membership

import "errors"

// Errors of the admin operations. Callers test them with errors.Is; messages are wrapped with
// the operation ("create invite: mesh not found").
var (
	ErrMeshNotFound      = errors.New("mesh not found")
	ErrMeshExists        = errors.New("a mesh with that slug already exists")
	ErrMeshArchived      = errors.New("mesh is archived")
	ErrMemberNotFound    = errors.New("no live member with that key in the mesh")
	ErrMemberExists      = errors.New("a live member with that key already exists in the mesh")
	ErrKeyIsSessionKey   = errors.New("that key is a session key in the mesh (list_peers shows it): a member key must be the member's own")
	ErrInviteNotFound    = errors.New("invite not found")
	ErrInviteRevoked     = errors.New("invite is already revoked")
	ErrOwnerKeyMismatch  = errors.New("the owner key file is not this mesh's owner key")
	ErrInvalidSlug       = errors.New("invalid slug: use 1 to 63 characters of a-z, 0-9 and '-', starting with a letter or digit")
	ErrInvalidPubkey     = errors.New("invalid public key: want 64 hex characters")
	ErrInvalidRole       = errors.New("invalid role: want admin or member")
	ErrInvalidInvite     = errors.New("invalid invite parameters")
	ErrInvalidOwnerKey   = errors.New("invalid owner key file")
	ErrOwnerKeyNotSecret = errors.New("owner key file is readable by other users")
)

// JoinError is a /join refusal: Code is one of protocol.JoinErr*, answered as
// 400 {ok:false, error: Code}.
type JoinError struct {
	Code string
}

func (e *JoinError) Error() string { return "join refused: " + e.Code }

func joinError(code string) error { return &JoinError{Code: code} }
