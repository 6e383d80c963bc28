package audit

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
)

// The flat-map fast path must hash exactly what Verify recomputes from the stored jsonb.
func TestEncodeDataMatchesCanonicalJSON(t *testing.T) {
	t.Parallel()
	got, err := encodeData(nil)
	require.NoError(t, err)
	require.Equal(t, "{}", string(got))
	for _, d := range []map[string]any{
		{},
		{"message_id": "0193-abc", "target_kind": "direct", "priority": "now", "size": 300, "recipients": 1},
		{"z": "<&>\u2028", "a": "é\"\\", "n": int64(-9223372036854775808), "b": true, "x": nil},
		{"nested": map[string]any{"b": 1.5, "a": []any{2, "x"}}, "f": 1e3},
		{"s": "a\xffb", "ok": "plain"},
		{"\xff": "x", "\xfe": "y"},
	} {
		raw, err := json.Marshal(d)
		require.NoError(t, err)
		want, err := CanonicalJSON(raw)
		require.NoError(t, err)
		got, err := encodeData(d)
		require.NoError(t, err)
		require.Equal(t, string(want), string(got), "%v", d)
	}
}
