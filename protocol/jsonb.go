package protocol

// JSONBSize returns how many bytes Postgres renders the valid JSON value v in as jsonb text
// (value::text, what the shared-state quotas and every reader of the value see), or a few more.
// jsonb writes ", " and ": " between members and a number in all its digits, without exponent
// (1e300 is 301 bytes), so this can be far more than len(v). Strings are counted as written:
// jsonb writes them back no longer (an escape becomes its character or stays as it was).
func JSONBSize(v []byte) int {
	n := 0
	for i := 0; i < len(v); {
		c := v[i]
		switch {
		case c == '"':
			end := stringEnd(v, i)
			n += end - i
			i = end
		case c == ',' || c == ':':
			n += 2
			i++
		case c == '-' || ('0' <= c && c <= '9'):
			end := numberEnd(v, i)
			size, _ := jsonbNumber(v[i:end])
			n += size
			i = end
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		default: // brackets, braces and the letters of true, false and null
			n++
			i++
		}
	}
	return n
}

// stringEnd returns the index after the string that starts at v[i] == '"' (v is valid JSON).
func stringEnd(v []byte, i int) int {
	for i++; i < len(v); i++ {
		switch v[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return len(v)
}

// numberEnd returns the index after the number that starts at v[i] (v is valid JSON).
func numberEnd[T string | []byte](v T, i int) int {
	for i++; i < len(v); i++ {
		switch c := v[i]; {
		case '0' <= c && c <= '9', c == '.', c == 'e', c == 'E', c == '+', c == '-':
		default:
			return i
		}
	}
	return i
}

// maxExponentScanned caps the exponent jsonbNumber reads, far beyond MaxNumberExponent and
// beyond anything numeric stores, so that sizes computed from it cannot overflow an int.
const maxExponentScanned = 1 << 24

// jsonbNumber returns the length of the text Postgres's numeric writes the valid JSON number
// tok as, and tok's exponent (0 without one; capped at ±maxExponentScanned). numeric keeps no
// exponent: it writes the integer part's digits (at least "0"), then, when the scale is
// positive, a point and as many decimals as tok had after its point less the exponent
// (1.50e-3 is "0.00150", 1.0e1 is "10"); a zero has no sign.
func jsonbNumber[T string | []byte](tok T) (size, exp int) {
	i := 0
	neg := tok[0] == '-'
	if neg {
		i++
	}
	intStart := i
	for i < len(tok) && '0' <= tok[i] && tok[i] <= '9' {
		i++
	}
	intDigits := i - intStart
	fracDigits, fracStart := 0, i
	if i < len(tok) && tok[i] == '.' {
		i++
		fracStart = i
		for i < len(tok) && '0' <= tok[i] && tok[i] <= '9' {
			i++
		}
		fracDigits = i - fracStart
	}
	if i < len(tok) { // 'e' or 'E'
		i++
		expNeg := tok[i] == '-'
		if tok[i] == '+' || tok[i] == '-' {
			i++
		}
		for ; i < len(tok); i++ {
			exp = min(exp*10+int(tok[i]-'0'), maxExponentScanned)
		}
		if expNeg {
			exp = -exp
		}
	}
	// Leading zeros, before and after the point, are not digits of the value.
	lead := 0
	for k := intStart; k < intStart+intDigits && tok[k] == '0'; k++ {
		lead++
	}
	if lead == intDigits {
		for k := fracStart; k < fracStart+fracDigits && tok[k] == '0'; k++ {
			lead++
		}
	}
	zero := lead == intDigits+fracDigits
	size = 1 // a value below 1 is written "0.…"
	if !zero {
		size = max(1, intDigits+exp-lead) // digits before the point
		if neg {
			size++
		}
	}
	if scale := fracDigits - exp; scale > 0 {
		size += 1 + scale
	}
	return size, exp
}
