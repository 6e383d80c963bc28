package protocol

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// This file holds a small single-pass JSON object scanner. It validates the
// whole frame (RFC 8259 grammar, as encoding/json accepts it) and records
// each top-level member as substrings of one copy of the frame, so decoding
// a send costs one pass over its ciphertext and two allocations, instead of
// encoding/json's validation pass plus decode pass plus one copy per field.
// Typed access (required, optional, enums, limits) is on object below.

// rawField is one member of a scanned JSON object.
type rawField struct {
	key   string // unescaped key
	val   string // raw value text
	kind  byte   // '"' string, '0' number, 't'/'f' bool, 'n' null, '{' object, '[' array
	plain bool   // a string without escapes and with valid UTF-8: its content is val[1:len-1]
}

// str returns the unescaped content of a string field.
func (f *rawField) str() string {
	if f.plain {
		return f.val[1 : len(f.val)-1]
	}
	// Rare path: escapes or invalid UTF-8. encoding/json unescapes and
	// replaces invalid UTF-8 with U+FFFD, as it would for any field.
	var s string
	if err := json.Unmarshal([]byte(f.val), &s); err != nil {
		return "" // unreachable: the scanner validated the token
	}
	return s
}

type scanError struct {
	msg string
	off int
}

func (e *scanError) Error() string {
	return fmt.Sprintf("invalid JSON: %s at offset %d", e.msg, e.off)
}

// scanTop scans s, which must be exactly one JSON object, appending its
// members to out. On error the members scanned so far are returned too, so
// a _reqId before the error can still be echoed.
func scanTop(s string, out object) (object, error) { return scanTopAt(s, out, 1) }

// scanTopAt is scanTop with the object's own depth given: lower than 1 lets values nest that
// much deeper than MaxDepth.
func scanTopAt(s string, out object, depth int) (object, error) {
	i := skipWS(s, 0)
	if i == len(s) {
		return out, &scanError{"empty input", i}
	}
	if s[i] != '{' {
		return out, &scanError{"want a JSON object", i}
	}
	out, i, err := scanObject(s, i, depth, out, true)
	if err != nil {
		return out, err
	}
	if i = skipWS(s, i); i != len(s) {
		return out, &scanError{"data after the object", i}
	}
	return out, nil
}

// parseObject scans raw, a JSON object, into a new field list.
func parseObject(raw string) (object, error) {
	o, err := scanTop(raw, nil)
	if err != nil {
		return nil, err
	}
	return o, nil
}

func skipWS(s string, i int) int {
	for i < len(s) {
		switch s[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}

// scanObject scans the object starting at s[i] == '{' and returns the index
// after it. With record, its members are appended to out, which is returned
// (also on error: the members before the error). Returning the slice rather
// than appending through a pointer keeps the caller's array on its stack.
func scanObject(s string, i, depth int, out object, record bool) (object, int, error) {
	if depth > MaxDepth {
		return out, i, &scanError{"nesting too deep", i}
	}
	i = skipWS(s, i+1)
	if i < len(s) && s[i] == '}' {
		return out, i + 1, nil
	}
	for {
		if i >= len(s) {
			return out, i, &scanError{"unexpected end", i}
		}
		if s[i] != '"' {
			return out, i, &scanError{"want a string key", i}
		}
		kStart := i
		kEnd, kPlain, err := scanString(s, i)
		if err != nil {
			return out, kEnd, err
		}
		i = skipWS(s, kEnd)
		if i >= len(s) || s[i] != ':' {
			return out, i, &scanError{"want ':'", i}
		}
		i = skipWS(s, i+1)
		vStart := i
		kind, vPlain, vEnd, err := scanValue(s, i, depth)
		if err != nil {
			return out, vEnd, err
		}
		if record {
			if len(out) >= MaxFields {
				return out, kStart, &scanError{fmt.Sprintf("more than %d fields", MaxFields), kStart}
			}
			k := rawField{val: s[kStart:kEnd], kind: '"', plain: kPlain}
			out = append(out, rawField{key: k.str(), val: s[vStart:vEnd], kind: kind, plain: vPlain})
		}
		i = skipWS(s, vEnd)
		if i >= len(s) {
			return out, i, &scanError{"unexpected end", i}
		}
		switch s[i] {
		case ',':
			i = skipWS(s, i+1)
		case '}':
			return out, i + 1, nil
		default:
			return out, i, &scanError{"want ',' or '}'", i}
		}
	}
}

func scanArray(s string, i, depth int) (int, error) {
	if depth > MaxDepth {
		return i, &scanError{"nesting too deep", i}
	}
	i = skipWS(s, i+1)
	if i < len(s) && s[i] == ']' {
		return i + 1, nil
	}
	for {
		_, _, end, err := scanValue(s, i, depth)
		if err != nil {
			return end, err
		}
		i = skipWS(s, end)
		if i >= len(s) {
			return i, &scanError{"unexpected end", i}
		}
		switch s[i] {
		case ',':
			i = skipWS(s, i+1)
		case ']':
			return i + 1, nil
		default:
			return i, &scanError{"want ',' or ']'", i}
		}
	}
}

// scanValue scans the value at s[i] and returns its kind, whether it is a
// plain string, and the index after it.
func scanValue(s string, i, depth int) (kind byte, plain bool, end int, err error) {
	if i >= len(s) {
		return 0, false, i, &scanError{"unexpected end", i}
	}
	switch c := s[i]; {
	case c == '"':
		end, plain, err = scanString(s, i)
		return '"', plain, end, err
	case c == '{':
		_, end, err = scanObject(s, i, depth+1, nil, false)
		return '{', false, end, err
	case c == '[':
		end, err = scanArray(s, i, depth+1)
		return '[', false, end, err
	case c == 't':
		end, err = scanLiteral(s, i, "true")
		return 't', false, end, err
	case c == 'f':
		end, err = scanLiteral(s, i, "false")
		return 'f', false, end, err
	case c == 'n':
		end, err = scanLiteral(s, i, "null")
		return 'n', false, end, err
	case c == '-' || ('0' <= c && c <= '9'):
		end, err = scanNumber(s, i)
		return '0', false, end, err
	default:
		return 0, false, i, &scanError{fmt.Sprintf("unexpected character %q", c), i}
	}
}

func scanLiteral(s string, i int, lit string) (int, error) {
	if !strings.HasPrefix(s[i:], lit) {
		return i, &scanError{"invalid literal", i}
	}
	return i + len(lit), nil
}

func scanNumber(s string, i int) (int, error) {
	start := i
	if s[i] == '-' {
		i++
	}
	switch {
	case i < len(s) && s[i] == '0':
		i++
	case i < len(s) && '1' <= s[i] && s[i] <= '9':
		i = skipDigits(s, i)
	default:
		return i, &scanError{"invalid number", start}
	}
	if i < len(s) && s[i] == '.' {
		j := skipDigits(s, i+1)
		if j == i+1 {
			return j, &scanError{"invalid number", start}
		}
		i = j
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		j := skipDigits(s, i)
		if j == i {
			return j, &scanError{"invalid number", start}
		}
		i = j
	}
	return i, nil
}

func skipDigits(s string, i int) int {
	for i < len(s) && '0' <= s[i] && s[i] <= '9' {
		i++
	}
	return i
}

// scanString scans the string at s[i] == '"' and returns the index after
// its closing quote and whether it is plain (no escapes, valid UTF-8).
func scanString(s string, i int) (end int, plain bool, err error) {
	start := i
	plain = true
	ascii := true
	i++
	for i < len(s) {
		// Fast path, 8 bytes at a time: printable ASCII other than '"' and
		// '\\' (all of base64, hex and most ids). A false alarm only sends
		// one byte through the slow path below.
		for i+8 <= len(s) && plain8(load64(s, i)) {
			i += 8
		}
		if i >= len(s) {
			break
		}
		c := s[i]
		if c >= 0x20 && c < utf8.RuneSelf && c != '"' && c != '\\' {
			i++
			continue
		}
		switch {
		case c == '"':
			if !ascii && !utf8.ValidString(s[start+1:i]) {
				plain = false
			}
			return i + 1, plain, nil
		case c == '\\':
			plain = false
			if i+1 >= len(s) {
				return i, false, &scanError{"unexpected end", i}
			}
			switch s[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if i+6 > len(s) {
					return i, false, &scanError{"unexpected end", i}
				}
				for _, h := range []byte(s[i+2 : i+6]) {
					if !isHex(h) {
						return i, false, &scanError{"invalid \\u escape", i}
					}
				}
				i += 6
			default:
				return i, false, &scanError{"invalid escape", i}
			}
		case c < 0x20:
			return i, false, &scanError{"control character in string", i}
		default: // non-ASCII byte: validated once the string ends
			ascii = false
			i++
		}
	}
	return i, false, &scanError{"unterminated string", start}
}

// load64 reads s[i:i+8] little-endian; the compiler merges it into one load.
func load64(s string, i int) uint64 {
	s = s[i : i+8]
	return uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24 |
		uint64(s[4])<<32 | uint64(s[5])<<40 | uint64(s[6])<<48 | uint64(s[7])<<56
}

// plain8 reports whether no byte of x is < 0x20, >= 0x80, '"' or '\\'. It
// may report false for a plain word (a borrow across bytes), never true for
// one that is not.
func plain8(x uint64) bool {
	const (
		ones   = 0x0101010101010101
		high   = 0x8080808080808080
		space  = 0x20 * ones
		quote  = '"' * ones
		bslash = '\\' * ones
	)
	return (x|(x-space)|((x^quote)-ones)|((x^bslash)-ones))&high == 0
}

func isHex(c byte) bool {
	return ('0' <= c && c <= '9') || ('a' <= c && c <= 'f') || ('A' <= c && c <= 'F')
}

// object is a scanned JSON object's members, with typed accessors that
// return bad_request errors naming the field.
type object []rawField

// lookup returns the member named name, nil when absent. A name given twice
// is an error, so that no two JSON parsers can disagree about the value.
func (o object) lookup(name string) (*rawField, *Error) {
	var found *rawField
	for i := range o {
		if o[i].key == name {
			if found != nil {
				return nil, badRequest(name + ": duplicate field")
			}
			found = &o[i]
		}
	}
	return found, nil
}

// present returns the member named name, nil when absent or null.
func (o object) present(name string) (*rawField, *Error) {
	f, err := o.lookup(name)
	if err != nil || f == nil || f.kind == 'n' {
		return nil, err
	}
	return f, nil
}

// str returns a string member; "" with ok false when absent or null.
// maxLen 0 means no limit of its own.
func (o object) str(name string, maxLen int) (s string, ok bool, e *Error) {
	f, e := o.present(name)
	if e != nil || f == nil {
		return "", false, e
	}
	if f.kind != '"' {
		return "", false, badRequest(name + ": must be a string")
	}
	s = f.str()
	if maxLen > 0 && len(s) > maxLen {
		return "", false, badRequest(fmt.Sprintf("%s: too long (max %d bytes)", name, maxLen))
	}
	if !f.plain && strings.IndexByte(s, 0) >= 0 {
		return "", false, badRequest(name + ": " + errNUL)
	}
	return s, true, nil
}

// errNUL: Postgres text and jsonb cannot hold U+0000, so a field carrying it could never be
// stored; it is refused here, naming the field, instead of failing a database write.
const errNUL = "must not contain the NUL character (\\u0000)"

// reqStr returns a required string member.
func (o object) reqStr(name string, maxLen int) (string, *Error) {
	s, ok, e := o.str(name, maxLen)
	if e == nil && !ok {
		e = badRequest(name + ": required string")
	}
	return s, e
}

// reqNonEmpty returns a required, non-empty string member.
func (o object) reqNonEmpty(name string, maxLen int) (string, *Error) {
	s, e := o.reqStr(name, maxLen)
	if e == nil && s == "" {
		e = badRequest(name + ": must not be empty")
	}
	return s, e
}

// optStr returns an optional string member, "" when absent or null.
func (o object) optStr(name string, maxLen int) (string, *Error) {
	s, _, e := o.str(name, maxLen)
	return s, e
}

// describe returns an optional descriptive member (hostname, model, ...): a
// value that is not a string, is too long or holds NUL is dropped, not refused,
// because these fields only label a peer and older clients never sent them, so
// a client sending something odd there must still connect.
func (o object) describe(name string, maxLen int) string {
	s, _, e := o.str(name, maxLen)
	if e != nil {
		return ""
	}
	return s
}

// optBool returns an optional boolean member, false when absent or null.
func (o object) optBool(name string) (bool, *Error) {
	f, e := o.present(name)
	if e != nil || f == nil {
		return false, e
	}
	switch f.kind {
	case 't':
		return true, nil
	case 'f':
		return false, nil
	}
	return false, badRequest(name + ": must be a boolean")
}

// integer returns an integer member (no fraction, no exponent).
func (o object) integer(name string) (n int64, ok bool, e *Error) {
	f, e := o.present(name)
	if e != nil || f == nil {
		return 0, false, e
	}
	if f.kind != '0' {
		return 0, false, badRequest(name + ": must be an integer")
	}
	n, err := strconv.ParseInt(f.val, 10, 64)
	if err != nil {
		return 0, false, badRequest(name + ": must be an integer")
	}
	return n, true, nil
}

func (o object) reqInt(name string) (int64, *Error) {
	n, ok, e := o.integer(name)
	if e == nil && !ok {
		e = badRequest(name + ": required integer")
	}
	return n, e
}

// nonNegInt converts n to a non-negative int.
func nonNegInt(name string, n int64) (int, *Error) {
	// int32: pids and versions are stored as Postgres integers.
	if n < 0 || n > math.MaxInt32 {
		return 0, badRequest(name + ": must be a non-negative integer (at most 2147483647)")
	}
	return int(n), nil
}

// list returns the elements of an array member, nil when absent or null.
func (o object) list(name string, maxItems int) ([]rawField, *Error) {
	f, e := o.present(name)
	if e != nil || f == nil {
		return nil, e
	}
	if f.kind != '[' {
		return nil, badRequest(name + ": must be a list")
	}
	var items []rawField
	s := f.val
	i := skipWS(s, 1)
	if s[i] == ']' {
		return items, nil
	}
	for {
		if len(items) == maxItems {
			return nil, badRequest(fmt.Sprintf("%s: too many items (max %d)", name, maxItems))
		}
		kind, plain, end, err := scanValue(s, i, 1)
		if err != nil {
			return nil, badRequest(name + ": " + err.Error()) // unreachable: validated
		}
		items = append(items, rawField{val: s[i:end], kind: kind, plain: plain})
		i = skipWS(s, end)
		if i >= len(s) || s[i] == ']' {
			return items, nil
		}
		i = skipWS(s, i+1) // ','
	}
}

// stringList returns an optional list of strings.
func (o object) stringList(name string, maxItems, maxLen int, nonEmpty bool) ([]string, *Error) {
	items, e := o.list(name, maxItems)
	if e != nil || len(items) == 0 {
		return nil, e
	}
	out := make([]string, len(items))
	for i := range items {
		if items[i].kind != '"' {
			return nil, badRequest(fmt.Sprintf("%s[%d]: must be a string", name, i))
		}
		s := items[i].str()
		if len(s) > maxLen {
			return nil, badRequest(fmt.Sprintf("%s[%d]: too long (max %d bytes)", name, i, maxLen))
		}
		if !items[i].plain && strings.IndexByte(s, 0) >= 0 {
			return nil, badRequest(fmt.Sprintf("%s[%d]: %s", name, i, errNUL))
		}
		if nonEmpty && s == "" {
			return nil, badRequest(fmt.Sprintf("%s[%d]: must not be empty", name, i))
		}
		out[i] = s
	}
	return out, nil
}

// rawJSON returns a required member of any JSON type (null included) as
// compact JSON that does not alias the frame.
func (o object) rawJSON(name string) (json.RawMessage, *Error) {
	f, e := o.lookup(name)
	if e != nil {
		return nil, e
	}
	if f == nil {
		return nil, badRequest(name + ": required")
	}
	if msg := jsonbStorable(f.val); msg != "" {
		return nil, badRequest(name + ": " + msg)
	}
	if f.kind != '{' && f.kind != '[' {
		return json.RawMessage(f.val), nil // scalars have no insignificant space
	}
	var buf bytes.Buffer
	buf.Grow(len(f.val))
	if err := json.Compact(&buf, []byte(f.val)); err != nil {
		return nil, badRequest(name + ": invalid JSON") // unreachable: validated
	}
	return buf.Bytes(), nil
}

// jsonbStorable reports why a validated JSON value could not be stored as Postgres jsonb (""
// when it can): invalid UTF-8, a \u0000 escape, a \u escape of half a surrogate pair, or a
// number whose exponent is beyond ±MaxNumberExponent (jsonb would store it in all its digits).
func jsonbStorable(v string) string {
	if !utf8.ValidString(v) {
		return "invalid UTF-8"
	}
	inString := false
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case c == '"':
			inString = !inString
		case !inString && (c == '-' || ('0' <= c && c <= '9')):
			end := numberEnd(v, i)
			if _, exp := jsonbNumber(v[i:end]); exp > MaxNumberExponent || exp < -MaxNumberExponent {
				return fmt.Sprintf("number %s has an exponent beyond ±%d (it would be stored in all its digits)",
					truncate(v[i:end], 32), MaxNumberExponent)
			}
			i = end - 1
		case c == '\\' && inString:
			if v[i+1] != 'u' { // the scanner checked every escape is complete
				i++
				continue
			}
			r := hexRune(v[i+2 : i+6])
			i += 5
			switch {
			case r == 0:
				return errNUL
			case utf16.IsSurrogate(r):
				if r >= 0xdc00 || i+6 >= len(v) || v[i+1] != '\\' || v[i+2] != 'u' {
					return "unpaired UTF-16 surrogate escape"
				}
				if lo := hexRune(v[i+3 : i+7]); lo < 0xdc00 || lo > 0xdfff {
					return "unpaired UTF-16 surrogate escape"
				}
				i += 6
			}
		}
	}
	return ""
}

func hexRune(h string) rune {
	var r rune
	for i := 0; i < len(h); i++ {
		c := h[i]
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		default:
			c -= 'A' - 10
		}
		r = r<<4 | rune(c)
	}
	return r
}

// CheckGroupName reports why name is not a valid group name: it must be
// non-empty, at most MaxGroupNameLen bytes, and free of whitespace and
// control characters. Sub-groups are written "parent/child".
func CheckGroupName(name string) error {
	if name == "" {
		return fmt.Errorf("must not be empty")
	}
	if len(name) > MaxGroupNameLen {
		return fmt.Errorf("too long (max %d bytes)", MaxGroupNameLen)
	}
	for _, r := range name {
		if unicode.IsSpace(r) || unicode.IsControl(r) {
			return fmt.Errorf("must not contain whitespace or control characters")
		}
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
