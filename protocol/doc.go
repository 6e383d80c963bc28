// Package protocol owns the claudemesh broker wire protocol (v1): the JSON
// messages exchanged over the WebSocket at /ws, the bodies of the HTTP
// endpoints /join and /hook/set-status, invite tokens and links, the
// canonical signed strings, and the error and close codes.
//
// It is shared by the broker, the Go client, the peer CLI and the load
// generator, so it does no I/O and holds no server logic. Field names,
// message types, signed strings and codes are a compatibility contract with
// existing claudemesh peers (see shared/protocol.md): they must not change.
//
// # Decoding client frames
//
// [DecodeClient] is the broker's single entry point for frames from peers.
// It is strict about what the broker relies on and lenient where existing
// peers differ:
//
//   - The frame must be one JSON object. Unknown fields are ignored (newer
//     claudemesh peers send extra hello fields such as hostname or model),
//     but a known field given twice is a bad_request, so no two parsers can
//     disagree about which copy counts.
//   - Field names match exactly (encoding/json would also accept
//     "TargetSpec"; the JS peers never send that, so neither do we).
//   - A JSON null in an optional field means "absent"; in a required field
//     it is a bad_request.
//   - Strings are unescaped as encoding/json does; invalid UTF-8 becomes
//     U+FFFD. Lengths are checked in bytes after unescaping, against the
//     Max* constants below.
//   - nonce and ciphertext are opaque: only their JSON type is checked,
//     their content is never decoded, validated or logged.
//   - For hello only JSON types are checked, not hex validity, because the
//     broker must report capacity and timestamp_skew before malformed.
//
// Decoded messages never alias the caller's frame buffer, which may be
// reused. Their strings do share one copy of the frame, so a retained small
// field keeps the whole frame (at most [DefaultMaxMessageBytes]) alive.
package protocol
