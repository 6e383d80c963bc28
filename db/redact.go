package db

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// redactedPassword replaces a password wherever Redact finds one (url.URL.Redacted's mask).
const redactedPassword = "xxxxx"

// Redact returns a database URL or key=value connection string fit to print: the password of a
// URL's userinfo (whatever the scheme, since a mistyped one is what ends up in an error), its
// password and sslpassword query parameters, and the password and sslpassword settings of a
// key=value string, quoted or not, are masked. A string too malformed to tell its parts apart
// loses everything from where a password could begin: printing too little beats a leak.
func Redact(s string) string {
	// A scheme may come with a driver's prefix (jdbc:postgresql://) or inside the quotes an
	// env file kept.
	if i := strings.Index(s, "://"); i > 0 && isScheme(strings.TrimLeft(s[:i], `"'`)) {
		return redactURL(s, i+len("://"))
	}
	if strings.Contains(s, "=") {
		return maskUserinfoWords(redactKeywordValue(s))
	}
	if strings.Contains(s, "@") { // user:password@host with the scheme left out
		return maskUserinfo(s)
	}
	return s
}

// maskUserinfoWords masks user:password@ in every whitespace-separated word of a key=value
// string that still holds one: a URL with a slash missing (postgres:/u:p@h) reads as keywords
// and is printed back as it came.
func maskUserinfoWords(s string) string {
	words := strings.Fields(s)
	for _, w := range words {
		if at := strings.LastIndex(w, "@"); at > 0 && strings.Contains(w[:at], ":") &&
			!strings.Contains(w[:at], ":"+redactedPassword) {
			s = strings.Replace(s, w, maskUserinfo(w), 1)
		}
	}
	return s
}

func isScheme(s string) bool {
	for i, r := range s {
		if r == ':' && i > 0 { // jdbc:postgresql
			continue
		}
		letter := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z'
		if !letter && (i == 0 || !(r >= '0' && r <= '9' || r == '+' || r == '-' || r == '.')) {
			return false
		}
	}
	return true
}

// redactURL masks a URL whose authority starts at rest.
func redactURL(s string, rest int) string {
	u, err := url.Parse(s)
	// The parse is trusted only when it put every '@' before the query in the userinfo: an
	// unescaped '/', '?' or '#' in a password ends the authority early (postgres://u:12/34@h
	// parses, with "34@h" as path; postgres://u:12?34@h, with "34@h" as query), and a
	// multi-host URL or a bad escape does not parse at all. Past the userinfo, an '@' in the
	// query (?password=p@ss) is the query's, redacted with it.
	q := len(s)
	if j := strings.IndexAny(s[rest:], "?#"); j >= 0 {
		q = rest + j
	}
	ats := strings.Count(s[rest:], "@")
	if err == nil && (ats == 0 && u.User == nil || u.User != nil && strings.Count(s[rest:q], "@") == 1) {
		if _, ok := u.User.Password(); ok {
			u.User = url.UserPassword(u.User.Username(), redactedPassword)
		}
		u.RawQuery = redactQuery(u.RawQuery)
		return u.String()
	}
	// Otherwise the userinfo ends at the last '@' (a password may hold any of the delimiters),
	// and the query starts at the first '?' after it.
	tail := maskUserinfo(s[rest:])
	at := strings.LastIndex(tail, "@") + 1
	if q := strings.IndexByte(tail[at:], '?'); q >= 0 {
		tail = tail[:at+q+1] + redactQuery(tail[at+q+1:])
	}
	return s[:rest] + tail
}

// maskUserinfo masks what follows the first ':' before the last '@' of s.
func maskUserinfo(s string) string {
	at := strings.LastIndex(s, "@")
	if at < 0 {
		return s
	}
	colon := strings.IndexByte(s[:at], ':')
	if colon < 0 {
		return s
	}
	return s[:colon+1] + redactedPassword + s[at:]
}

// redactQuery masks the password and sslpassword values of a raw URL query, whose keys may be
// percent-encoded (pass%77ord) as pgx accepts them.
func redactQuery(q string) string {
	if q == "" {
		return q
	}
	pairs := strings.Split(q, "&")
	for i, pair := range pairs {
		k, _, ok := strings.Cut(pair, "=")
		if !ok {
			continue
		}
		if dk, err := url.QueryUnescape(k); err == nil {
			k = dk
		}
		if isPasswordKey(k) {
			pairs[i] = pair[:strings.IndexByte(pair, '=')+1] + redactedPassword
		}
	}
	return strings.Join(pairs, "&")
}

func isPasswordKey(k string) bool {
	k = strings.TrimSpace(k)
	return strings.EqualFold(k, "password") || strings.EqualFold(k, "sslpassword")
}

// redactKeywordValue masks the password settings of a libpq key=value string, read the way pgx
// and libpq read it: whitespace between settings and around '=', values bare (a backslash
// escapes the next byte) or in single quotes (with \' and \\). Where it stops making sense,
// everything from the first "password" on is masked.
func redactKeywordValue(s string) string {
	var b strings.Builder
	i := 0
	for {
		j := skipSpace(s, i)
		b.WriteString(s[i:j])
		i = j
		if i == len(s) {
			return b.String()
		}
		eq := strings.IndexByte(s[i:], '=')
		if eq < 0 || strings.ContainsAny(strings.TrimSpace(s[i:i+eq]), " \t\n\r\v\f") {
			return redactFrom(s)
		}
		key := strings.TrimSpace(s[i : i+eq])
		start := skipSpace(s, i+eq+1)
		end, ok := valueEnd(s, start)
		if !ok {
			return redactFrom(s)
		}
		b.WriteString(s[i:start])
		switch v := s[start:end]; {
		case isPasswordKey(key):
			b.WriteString(redactedPassword)
		case strings.Contains(v, "://"): // a URL as a value (libpq's dbname may be one)
			b.WriteString(Redact(v))
		default:
			b.WriteString(v)
		}
		i = end
	}
}

// valueEnd returns where the value starting at s[i] ends; false for an unterminated quote.
func valueEnd(s string, i int) (int, bool) {
	if i < len(s) && s[i] == '\'' {
		for j := i + 1; j < len(s); j++ {
			switch s[j] {
			case '\\':
				j++
			case '\'':
				return j + 1, true
			}
		}
		return 0, false
	}
	j := i
	for ; j < len(s) && !isSpace(s[j]); j++ {
		if s[j] == '\\' {
			j++
		}
	}
	return min(j, len(s)), true
}

// redactFrom masks everything from the first "password" (sslpassword's included) on.
func redactFrom(s string) string {
	i := strings.Index(strings.ToLower(s), "password")
	if i < 0 {
		return s
	}
	return s[:i] + "password=" + redactedPassword
}

func skipSpace(s string, i int) int {
	for i < len(s) && isSpace(s[i]) {
		i++
	}
	return i
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'
}

// parseError describes a connection string that pgx (or net/url) could not parse without
// quoting it: pgx masks passwords in its message on a best-effort basis only (the tail of a
// quoted one with an escaped quote shows), so the string is shown through Redact instead.
func parseError(connString string, err error) error {
	var pce *pgconn.ParseConfigError
	if errors.As(err, &pce) {
		// pgx's message is "cannot parse `<string>`: <what> (<cause>)"; <what> never quotes the
		// string, <cause> may (a keyword/value error quotes a stray piece of it).
		text, cause := pce.Error(), ""
		if inner := pce.Unwrap(); inner != nil {
			text = strings.TrimSuffix(text, " ("+inner.Error()+")")
			cause = " (" + inner.Error() + ")"
		}
		if i := strings.LastIndex(text, "`: "); i >= 0 {
			text = text[i+len("`: "):]
		}
		if !strings.HasSuffix(text, "keyword/value") {
			text += cause
		}
		return fmt.Errorf("parse DATABASE_URL %s: %s", Redact(connString), text)
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		return fmt.Errorf("parse DATABASE_URL %s: not a valid URL", Redact(connString))
	}
	return fmt.Errorf("parse DATABASE_URL %s: %w", Redact(connString), err)
}
