package protocol

// Fields is one JSON object scanned in a single pass by the scanner that decodes client frames
// (scan.go): its top-level members as substrings of the text, checked against the same grammar
// and limits. It is for JSON the replicas write for each other (the bus's lines, whose push
// frames carry a ciphertext each), where encoding/json's validation pass, decode pass and
// reflection cost more per push than the rest of its way to the socket.
type Fields struct{ o object }

// WrapDepth is how many levels deeper than MaxDepth a value may nest in ScanFields: the replicas
// pass on what clients sent (a set_state value MaxDepth deep) inside objects of their own.
const WrapDepth = 8

// ScanFields scans s, which must be exactly one JSON object. Member names match exactly, and a
// name given twice is an error when it is read.
func ScanFields(s string) (Fields, error) {
	o, err := scanTopAt(s, nil, 1-WrapDepth)
	if err != nil {
		return Fields{}, err
	}
	return Fields{o}, nil
}

// String returns a string member unescaped; "" when absent or null.
func (f Fields) String(name string) (string, error) {
	s, _, e := f.o.str(name, 0)
	if e != nil {
		return "", e
	}
	return s, nil
}

// Int returns an integer member (no fraction, no exponent); 0 when absent or null.
func (f Fields) Int(name string) (int64, error) {
	n, _, e := f.o.integer(name)
	if e != nil {
		return 0, e
	}
	return n, nil
}

// Raw returns a member's JSON text as it stands in the scanned string (null included); ok is
// false when the member is absent.
func (f Fields) Raw(name string) (raw string, ok bool, err error) {
	m, e := f.o.lookup(name)
	if e != nil {
		return "", false, e
	}
	if m == nil {
		return "", false, nil
	}
	return m.val, true, nil
}
