package main

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/protocol"
)

// fakeHookBroker records what the hook posts and answers with status and body.
type fakeHookBroker struct {
	mu     sync.Mutex
	bodies []protocol.HookRequest
	tokens []string
	srv    *httptest.Server
}

func newFakeHookBroker(t *testing.T, status int, body string, delay time.Duration) *fakeHookBroker {
	t.Helper()
	f := &fakeHookBroker{}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != protocol.PathHookState || r.Method != http.MethodPost {
			http.NotFound(w, r)
			return
		}
		raw, _ := io.ReadAll(r.Body)
		req, err := protocol.ParseHookRequest(raw)
		require.NoError(t, err, string(raw))
		f.mu.Lock()
		f.bodies = append(f.bodies, req)
		f.tokens = append(f.tokens, r.Header.Get(protocol.HookTokenHeader))
		f.mu.Unlock()
		if delay > 0 {
			select {
			case <-time.After(delay):
			case <-r.Context().Done():
			}
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = io.WriteString(w, body)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeHookBroker) requests() ([]protocol.HookRequest, []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]protocol.HookRequest(nil), f.bodies...), append([]string(nil), f.tokens...)
}

func TestHookPostsClaudePayload(t *testing.T) {
	t.Parallel()
	f := newFakeHookBroker(t, http.StatusOK, `{"ok":true,"presence_id":"p1"}`, 0)
	c := newCLI(t)
	c.env[hookTokenEnv] = "s3cret"
	payload := `{"session_id":"abc-123","transcript_path":"/tmp/t.jsonl","cwd":"/repo/x","hook_event_name":"UserPromptSubmit",` +
		`"prompt":"hi","future_field":{"nested":[1,2]}}`
	out, errOut, err := c.run(payload, "--broker", "ws://"+f.srv.Listener.Addr().String()+"/ws", "hook", "working", "--strict")
	require.NoError(t, err, errOut)
	require.Empty(t, out)
	require.Empty(t, errOut)
	reqs, tokens := f.requests()
	require.Equal(t, []protocol.HookRequest{{CWD: "/repo/x", PID: os.Getppid(), Status: protocol.StatusWorking, SessionID: "abc-123"}}, reqs)
	require.Equal(t, []string{"s3cret"}, tokens)

	// Empty stdin: the current directory, no session id, no token.
	c2 := newCLI(t)
	_, errOut, err = c2.run("", "--broker", f.srv.URL, "hook", "idle", "--strict")
	require.NoError(t, err, errOut)
	wd, _ := os.Getwd()
	reqs, tokens = f.requests()
	require.Equal(t, protocol.HookRequest{CWD: wd, PID: os.Getppid(), Status: protocol.StatusIdle}, reqs[1])
	require.Equal(t, "", tokens[1])

	// Not JSON: a warning, and the hook still reports.
	_, errOut, err = c2.run("garbage", "--broker", f.srv.URL, "hook", "idle")
	require.NoError(t, err)
	require.Contains(t, errOut, "not JSON")
	reqs, _ = f.requests()
	require.Len(t, reqs, 3)
}

func TestHookUsesJoinedBrokers(t *testing.T) {
	t.Parallel()
	f1 := newFakeHookBroker(t, http.StatusOK, `{"ok":true,"pending":true}`, 0)
	f2 := newFakeHookBroker(t, http.StatusOK, `{"ok":true}`, 0)
	c := newCLI(t)
	a := &app{home: c.home, getenv: c.getenv}
	for i, u := range []string{"ws://" + f1.srv.Listener.Addr().String() + "/ws", f2.srv.URL, f1.srv.URL + "/"} {
		require.NoError(t, a.saveMesh(MeshEntry{MeshID: "m" + string(rune('0'+i)), Slug: "s" + string(rune('0'+i)), BrokerURL: u}))
	}
	_, errOut, err := c.run(`{"cwd":"/r"}`, "hook", "working", "--strict")
	require.NoError(t, err, errOut)
	r1, _ := f1.requests()
	r2, _ := f2.requests()
	require.Len(t, r1, 1, "one post per distinct broker")
	require.Len(t, r2, 1)

	// --mesh limits it to one mesh's broker.
	_, _, err = c.run(`{"cwd":"/r"}`, "--mesh", "s1", "hook", "idle", "--strict")
	require.NoError(t, err)
	r1, _ = f1.requests()
	r2, _ = f2.requests()
	require.Len(t, r1, 1)
	require.Len(t, r2, 2)
}

// A hook never blocks Claude Code: failures are warnings with exit 0 unless --strict, and a
// hanging broker is abandoned at the deadline.
func TestHookNeverBlocks(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	_, errOut, err := c.run(`{"cwd":"/r"}`, "hook", "working")
	require.NoError(t, err)
	require.Contains(t, errOut, "join a mesh first")

	refusing := newFakeHookBroker(t, http.StatusTooManyRequests, `{"ok":false,"error":"rate limited"}`, 0)
	_, errOut, err = c.run(`{"cwd":"/r"}`, "--broker", refusing.srv.URL, "hook", "working")
	require.NoError(t, err)
	require.Contains(t, errOut, "HTTP 429: rate limited")
	_, _, err = c.run(`{"cwd":"/r"}`, "--broker", refusing.srv.URL, "hook", "working", "--strict")
	require.ErrorContains(t, err, "rate limited")

	hanging := newFakeHookBroker(t, http.StatusOK, `{"ok":true}`, time.Minute)
	start := time.Now()
	_, errOut, err = c.run(`{"cwd":"/r"}`, "--broker", hanging.srv.URL, "hook", "idle", "--timeout", "200ms")
	require.NoError(t, err)
	require.Contains(t, errOut, "deadline exceeded")
	require.Less(t, time.Since(start), 10*time.Second, "bounded by --timeout, not by the broker")

	// stdin that never ends (a pipe Claude keeps open) does not hold the hook either.
	pr, pw := io.Pipe()
	t.Cleanup(func() { _ = pw.Close() })
	ok := newFakeHookBroker(t, http.StatusOK, `{"ok":true}`, 0)
	_, errOut, err = c.runCtx(t.Context(), pr, "--broker", ok.srv.URL, "hook", "idle", "--timeout", "400ms")
	require.NoError(t, err)
	require.Contains(t, errOut, "no hook input")
	reqs, _ := ok.requests()
	require.Len(t, reqs, 1)
}

func TestHookInstall(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	out := c.must("hook", "install")
	var printed map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &printed))
	require.JSONEq(t, `{"hooks":{
		"UserPromptSubmit":[{"hooks":[{"type":"command","command":"meshctl hook working"}]}],
		"Stop":[{"hooks":[{"type":"command","command":"meshctl hook idle"}]}]}}`, out)

	// --write merges into an existing file, keeping other keys and hooks.
	path := filepath.Join(t.TempDir(), ".claude", "settings.json")
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	existing := `{"model":"opus","permissions":{"allow":["Bash(go test:*)"]},
		"hooks":{"Stop":[{"hooks":[{"type":"command","command":"notify-send done"}]}],
		"PreToolUse":[{"matcher":"Bash","hooks":[{"type":"command","command":"audit"}]}]}}`
	require.NoError(t, os.WriteFile(path, []byte(existing), 0o640))
	require.Contains(t, c.must("hook", "install", "--write", "--settings", path, "--bin", "/opt/bin/meshctl"), "hooks added")
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	require.JSONEq(t, `{"model":"opus","permissions":{"allow":["Bash(go test:*)"]},
		"hooks":{
		"Stop":[{"hooks":[{"type":"command","command":"notify-send done"}]},{"hooks":[{"type":"command","command":"/opt/bin/meshctl hook idle"}]}],
		"PreToolUse":[{"matcher":"Bash","hooks":[{"type":"command","command":"audit"}]}],
		"UserPromptSubmit":[{"hooks":[{"type":"command","command":"/opt/bin/meshctl hook working"}]}]}}`, string(raw))
	st, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o640), st.Mode().Perm(), "the file keeps its mode")

	// Idempotent.
	require.Contains(t, c.must("hook", "install", "--write", "--settings", path, "--bin", "/opt/bin/meshctl"), "already has")
	again, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, string(raw), string(again))

	// A new file is created; a broken one is refused untouched.
	fresh := filepath.Join(t.TempDir(), "new", "settings.json")
	c.must("hook", "install", "--write", "--settings", fresh)
	raw, err = os.ReadFile(fresh)
	require.NoError(t, err)
	require.JSONEq(t, out, string(raw))
	broken := filepath.Join(t.TempDir(), "settings.json")
	require.NoError(t, os.WriteFile(broken, []byte(`{"hooks":`), 0o644))
	_, _, err = c.run("", "hook", "install", "--write", "--settings", broken)
	require.ErrorContains(t, err, "not a JSON object")
	badHooks := filepath.Join(t.TempDir(), "settings.json")
	require.NoError(t, os.WriteFile(badHooks, []byte(`{"hooks":[]}`), 0o644))
	_, _, err = c.run("", "hook", "install", "--write", "--settings", badHooks)
	require.ErrorContains(t, err, `"hooks" is not a JSON object`)
}

// Merging the hooks leaves the user's other settings as they were: their keys in their order
// and their numbers' exact text, a hook's timeout too. A file naming a key twice is refused.
func TestHookInstallKeepsOtherSettingsAsWritten(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	path := filepath.Join(t.TempDir(), "settings.json")
	existing := `{"zeta":12345678901234567890,"alpha":{"ratio":1.0,"big":1e400},` +
		`"hooks":{"Stop":[{"hooks":[{"type":"command","command":"notify-send done","timeout":30.50}]}]},"model":"opus"}`
	require.NoError(t, os.WriteFile(path, []byte(existing), 0o644))
	c.must("hook", "install", "--write", "--settings", path, "--bin", "/opt/bin/meshctl")
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	got := string(raw)
	for _, want := range []string{"12345678901234567890", `"ratio": 1.0`, `"big": 1e400`, `"timeout": 30.50`, "/opt/bin/meshctl hook idle"} {
		require.Contains(t, got, want)
	}
	z, a, h, m := strings.Index(got, `"zeta"`), strings.Index(got, `"alpha"`), strings.Index(got, `"hooks"`), strings.Index(got, `"model"`)
	require.True(t, z < a && a < h && h < m, "keys keep their order:\n%s", got)

	for name, bad := range map[string]string{
		"twice": `{"hooks":{},"hooks":{"Stop":[]}}`,
		"tail":  `{"model":"opus"} {"model":"x"}`,
	} {
		p := filepath.Join(t.TempDir(), name+".json")
		require.NoError(t, os.WriteFile(p, []byte(bad), 0o644))
		_, _, err := c.run("", "hook", "install", "--write", "--settings", p)
		require.ErrorContains(t, err, "not a JSON object", name)
		after, err := os.ReadFile(p)
		require.NoError(t, err)
		require.Equal(t, bad, string(after), "left untouched")
	}
}

// Whatever a settings file holds, the parser refuses it or gives back the same document: the
// keys written back decode to the values read, numbers as written, in the same order. (A
// number beyond a float64, 1e400, is valid JSON and kept: decoded to float64 for the
// comparison, it failed every run that came across one.)
func FuzzParseSettings(f *testing.F) {
	for _, s := range []string{`{}`, `{"a":1,"hooks":{"Stop":[]}}`, `{"a":12345678901234567890}`, `{"a":1}x`,
		`{"a":1,"a":2}`, `[1]`, `{"\u00e9":"<b>"}`, ` {"a" : [1 , {"b":null}] } `, `{"a":1e400,"b":[1.0]}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		doc, err := parseSettings(raw)
		if err != nil {
			return
		}
		out, err := formatSettings(doc)
		if err != nil {
			t.Fatalf("a parsed document did not format: %v", err)
		}
		again, err := parseSettings(out)
		if err != nil {
			t.Fatalf("formatted output does not parse: %v\n%s", err, out)
		}
		if len(again) != len(doc) {
			t.Fatalf("%d keys became %d", len(doc), len(again))
		}
		for i := range doc {
			a, errA := decodeKeepingNumbers(doc[i].raw)
			b, errB := decodeKeepingNumbers(again[i].raw)
			if doc[i].key != again[i].key || errA != nil || errB != nil || !reflect.DeepEqual(a, b) {
				t.Fatalf("key %d: %q=%s became %q=%s", i, doc[i].key, doc[i].raw, again[i].key, again[i].raw)
			}
		}
	})
}
