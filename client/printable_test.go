package client

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// A peer's text can't drive the terminal it is printed on: escape sequences, C1 controls and
// bidirectional overrides are shown escaped; a name can't break a table's row.
func TestPrintable(t *testing.T) {
	require.Equal(t, "a\\x1b[31mred\nb\tc", Printable("a\x1b[31mred\nb\tc", true))
	require.Equal(t, "alice\\x0a\\x09admin", Printable("alice\n\tadmin", false))
	require.Equal(t, "\\x9b \\x0d", Printable("\u009b \r", true))
	require.Equal(t, "evil\\u202etxt.exe", Printable("evil\u202etxt.exe", false))
	require.Equal(t, "é ✓ 👩‍💻", Printable("é ✓ 👩‍💻", false), "ordinary text, joiners included, is left alone")
}
