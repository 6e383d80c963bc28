package client

import (
	"fmt"
	"strings"
)

// Printable makes peer-supplied text (display names, summaries, message text) safe to print
// on a terminal: control characters, escape sequences included, and the bidirectional
// overrides that reorder what follows are shown escaped, so a peer can't rewrite the screen,
// the window title or the rows around its text. Newlines and tabs are kept only when
// keepLines (a message's text); in a table cell or a name they would fake rows.
func Printable(s string, keepLines bool) string {
	if !strings.ContainsFunc(s, func(r rune) bool { return unprintable(r, keepLines) }) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		switch {
		case !unprintable(r, keepLines):
			b.WriteRune(r)
		case r < 0x100:
			fmt.Fprintf(&b, "\\x%02x", r)
		default:
			fmt.Fprintf(&b, "\\u%04x", r)
		}
	}
	return b.String()
}

func unprintable(r rune, keepLines bool) bool {
	switch {
	case r == '\n' || r == '\t':
		return !keepLines
	case r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0):
		return true
	case r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069: // bidirectional embeddings, overrides, isolates
		return true
	}
	return false
}
