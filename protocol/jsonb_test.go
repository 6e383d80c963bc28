package protocol

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// The sizes are Postgres 15's octet_length(('<value>'::jsonb)::text): numbers are written in
// all their digits, members with ", " and ": ".
func TestJSONBSize(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		value string
		want  int
	}{
		{`0`, 1}, {`-0`, 1}, {`-0.0`, 3}, {`0e5`, 1}, {`0.000e-3`, 8}, {`1`, 1}, {`-1`, 2},
		{`1.50e-3`, 7}, {`1e-5`, 7}, {`123.456e1`, 7}, {`1.0e1`, 2}, {`0.05`, 4}, {`100`, 3},
		{`1e300`, 301}, {`-2.5E+3`, 5}, {`12.34e-1`, 5}, {`9.999e400`, 401}, {`0.001e2`, 3},
		{`1E400`, 401}, {`1e-400`, 402}, {`-1e-400`, 403},
		{`[1,{"a":2}]`, 13}, {`[ 1 , { "a" : 2 } ]`, 13},
		// Strings are counted as written: jsonb writes "\u00e9" back as é, never longer.
		{`"x,:"`, 5}, {`"\u00e9\n"`, 10}, {`"a\"b"`, 6},
	} {
		require.Equal(t, tt.want, JSONBSize([]byte(tt.value)), tt.value)
	}
	// What the finding was: a short frame rendered as hundreds of megabytes.
	many := "[" + strings.TrimSuffix(strings.Repeat("1e131000,", 3000), ",") + "]"
	require.Greater(t, JSONBSize([]byte(many)), 3000*131001)
}

// A number whose exponent is beyond ±MaxNumberExponent is refused naming the field, wherever
// it is in the value; within, and in strings, numbers are kept as written.
func TestDecodeClientNumberExponent(t *testing.T) {
	t.Parallel()
	for _, v := range []string{`1e131000`, `[1,2,-1E+401]`, `{"a":{"b":[0.5e-401]}}`, `1e0000000000000000000000000401`,
		`1e99999999999999999999999999`} {
		_, err := DecodeClient([]byte(`{"type":"set_state","key":"k","_reqId":"r","value":` + v + `}`))
		var pe *Error
		require.ErrorAs(t, err, &pe, v)
		require.Equal(t, CodeBadRequest, pe.Code)
		require.Equal(t, "r", pe.ReqID)
		require.Contains(t, pe.Message, "value: number ")
		require.Contains(t, pe.Message, "exponent beyond ±400", v)
	}
	for _, v := range []string{`1e400`, `-1E-400`, `1.7976931348623157e308`, `5e-324`, `"1e131000"`, `{"1e999":"2e999"}`, `0`} {
		m, err := DecodeClient([]byte(`{"type":"set_state","key":"k","value":` + v + `}`))
		require.NoError(t, err, v)
		require.Equal(t, v, string(m.(*SetState).Value))
	}
}
