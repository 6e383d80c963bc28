package main

// Claude Code hooks: `meshctl hook working|idle` runs on UserPromptSubmit and Stop and tells
// the broker, so that next/low messages wait while Claude works. It must never hold Claude
// up: one short deadline for everything, and exit 0 even on failure unless --strict.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/claudemesh/broker/protocol"
)

const (
	// DefaultHookTimeout bounds a hook run: reading stdin and every POST.
	DefaultHookTimeout = 2 * time.Second
	// hookTokenEnv names the environment variable holding the broker's HOOK_TOKEN.
	hookTokenEnv = "CLAUDEMESH_HOOK_TOKEN"
	// maxHookPayload bounds what is read from stdin (Claude Code sends a small object).
	maxHookPayload = 1 << 20
)

// hookPayload is the part of Claude Code's hook input that matters here; other fields
// (transcript_path, hook_event_name, prompt, ...) are ignored.
type hookPayload struct {
	SessionID      string `json:"session_id"`
	CWD            string `json:"cwd"`
	HookEventName  string `json:"hook_event_name"`
	TranscriptPath string `json:"transcript_path"`
}

func newHookCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "hook",
		Short: "Claude Code hooks: report working/idle to the broker",
		Long: "Claude Code runs `meshctl hook working` when a prompt is submitted and `meshctl hook idle`\n" +
			"when it stops; the broker then holds next/low messages while Claude works. The hook\n" +
			"reads Claude Code's JSON from stdin (session_id, cwd) and POSTs /hook/set-status to the\n" +
			"broker of every joined mesh (or --broker), signed with this identity's key (so the\n" +
			"broker changes only your sessions), with $" + hookTokenEnv + " as X-Hook-Token.\n" +
			"It gives up after --timeout and exits 0 even on failure, so Claude is never blocked.\n\n" +
			"`meshctl hook install` prints the settings block; --write merges it into\n" +
			"~/.claude/settings.json.",
	}
	for _, st := range []protocol.Status{protocol.StatusWorking, protocol.StatusIdle} {
		var strict bool
		var timeout time.Duration
		sub := &cobra.Command{
			Use:   string(st),
			Short: fmt.Sprintf("Report %s (reads the hook JSON on stdin)", st),
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				err := a.runHook(cmd.Context(), st, timeout)
				if err == nil {
					return nil
				}
				if strict {
					return err
				}
				fmt.Fprintln(a.stderr, "meshctl hook: warning:", sanitize(err.Error()))
				return nil
			},
		}
		sub.Flags().BoolVar(&strict, "strict", false, "exit non-zero when the broker could not be told")
		sub.Flags().DurationVar(&timeout, "timeout", DefaultHookTimeout, "give up after this long")
		cmd.AddCommand(sub)
	}
	cmd.AddCommand(newHookInstallCmd(a))
	return cmd
}

// readHookPayload decodes the first JSON value on stdin; empty or invalid input gives an
// empty payload. It does not wait for EOF (Claude Code may keep the pipe open) nor past ctx.
func readHookPayload(ctx context.Context, r io.Reader) (hookPayload, error) {
	if r == nil {
		return hookPayload{}, nil
	}
	if f, ok := r.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			return hookPayload{}, nil // a terminal: run by hand, nothing to read
		}
	}
	type result struct {
		p   hookPayload
		err error
	}
	ch := make(chan result, 1)
	go func() {
		var p hookPayload
		err := json.NewDecoder(io.LimitReader(r, maxHookPayload)).Decode(&p)
		if errors.Is(err, io.EOF) {
			err = nil // empty stdin
		}
		ch <- result{p, err}
	}()
	select {
	case res := <-ch:
		if res.err != nil {
			return hookPayload{}, fmt.Errorf("hook input is not JSON (%v); using the current directory", res.err)
		}
		return res.p, nil
	case <-ctx.Done():
		return hookPayload{}, errors.New("no hook input on stdin in time; using the current directory")
	}
}

func (a *app) runHook(ctx context.Context, status protocol.Status, timeout time.Duration) error {
	if timeout <= 0 {
		timeout = DefaultHookTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	readCtx, readCancel := context.WithTimeout(ctx, timeout/2)
	payload, perr := readHookPayload(readCtx, a.stdin)
	readCancel()
	if perr != nil {
		fmt.Fprintln(a.stderr, "meshctl hook: warning:", perr)
	}
	cwd := payload.CWD
	if cwd == "" {
		var err error
		if cwd, err = os.Getwd(); err != nil {
			return fmt.Errorf("no cwd in the hook input and none of our own: %w", err)
		}
	}
	brokers, err := a.hookBrokers()
	if err != nil {
		return err
	}
	req := protocol.HookRequest{CWD: cwd, PID: os.Getppid(), Status: status, SessionID: payload.SessionID}
	// Signed by the member key, the hook proves whose sessions it may change; brokers refuse
	// unsigned hooks unless their operator allowed them (April clients).
	id, err := a.loadIdentity()
	switch {
	case errors.Is(err, errNoIdentity):
		id = nil
	case err != nil:
		return err
	}
	token := a.getenv(hookTokenEnv)
	var wg sync.WaitGroup
	errs := make([]error, len(brokers))
	for i, b := range brokers {
		r := req
		if id != nil {
			protocol.SignHook(id.key, &r, time.Now())
		}
		body, err := json.Marshal(r)
		if err != nil {
			return err
		}
		wg.Go(func() { errs[i] = postHook(ctx, b, body, token) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// hookBrokers are the distinct brokers to tell: --broker, else those of every joined mesh
// (a Claude Code session may be a peer of several meshes).
func (a *app) hookBrokers() ([]string, error) {
	var urls []string
	if a.brokerURL != "" {
		urls = []string{a.brokerURL}
	} else {
		meshes, err := a.loadMeshes()
		if err != nil {
			return nil, err
		}
		for _, m := range meshes {
			if a.meshRef != "" && m.Slug != a.meshRef && m.MeshID != a.meshRef {
				continue
			}
			urls = append(urls, m.BrokerURL)
		}
	}
	var out []string
	for _, u := range urls {
		base, err := httpBaseURL(u)
		if err != nil {
			return nil, err
		}
		if !slices.Contains(out, base) {
			out = append(out, base)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no broker to tell: join a mesh first or pass --broker")
	}
	return out, nil
}

func postHook(ctx context.Context, base string, body []byte, token string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+protocol.PathHookState, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set(protocol.HookTokenHeader, token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", base, err)
	}
	defer resp.Body.Close()
	raw, _ := readAllLimit(resp.Body, 64<<10)
	var res protocol.HookResponse
	_ = json.Unmarshal(raw, &res)
	if resp.StatusCode != http.StatusOK || !res.OK {
		msg := res.Error
		if msg == "" {
			msg = http.StatusText(resp.StatusCode)
		}
		return fmt.Errorf("%s: HTTP %d: %s", base, resp.StatusCode, msg)
	}
	return nil
}

// hookEvents maps the Claude Code hook events meshctl installs to the status each reports.
var hookEvents = []struct {
	event  string
	status protocol.Status
}{
	{"UserPromptSubmit", protocol.StatusWorking},
	{"Stop", protocol.StatusIdle},
}

// hookSettings is the hooks block for Claude Code's settings.json.
func hookSettings(bin string) map[string]any {
	hooks := map[string]any{}
	for _, e := range hookEvents {
		hooks[e.event] = []any{map[string]any{
			"hooks": []any{map[string]any{"type": "command", "command": bin + " hook " + string(e.status)}},
		}}
	}
	return map[string]any{"hooks": hooks}
}

// mergeHookSettings adds meshctl's hooks to a settings document, keeping every other key and
// every other hook; a hook already present (same command) is not added twice.
func mergeHookSettings(settings map[string]any, bin string) (map[string]any, bool, error) {
	if settings == nil {
		settings = map[string]any{}
	}
	hooks, ok := settings["hooks"].(map[string]any)
	if settings["hooks"] != nil && !ok {
		return nil, false, errors.New(`"hooks" is not a JSON object`)
	}
	if hooks == nil {
		hooks = map[string]any{}
	}
	changed := false
	for _, e := range hookEvents {
		command := bin + " hook " + string(e.status)
		var groups []any
		if v := hooks[e.event]; v != nil {
			if groups, ok = v.([]any); !ok {
				return nil, false, fmt.Errorf(`"hooks.%s" is not a JSON array`, e.event)
			}
		}
		if hasHookCommand(groups, command) {
			continue
		}
		groups = append(groups, map[string]any{"hooks": []any{map[string]any{"type": "command", "command": command}}})
		hooks[e.event] = groups
		changed = true
	}
	settings["hooks"] = hooks
	return settings, changed, nil
}

func hasHookCommand(groups []any, command string) bool {
	for _, g := range groups {
		gm, _ := g.(map[string]any)
		hs, _ := gm["hooks"].([]any)
		for _, h := range hs {
			if hm, _ := h.(map[string]any); hm["command"] == command {
				return true
			}
		}
	}
	return false
}

func newHookInstallCmd(a *app) *cobra.Command {
	var write bool
	var path, bin string
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Print (or with --write, merge into ~/.claude/settings.json) the Claude Code hooks",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !write {
				return printJSON(a.stdout, hookSettings(bin))
			}
			if path == "" {
				home, err := os.UserHomeDir()
				if err != nil {
					return fmt.Errorf("no home directory: pass --settings (%w)", err)
				}
				path = filepath.Join(home, ".claude", "settings.json")
			}
			var doc []settingsKey
			mode := os.FileMode(0o644)
			raw, err := os.ReadFile(path)
			switch {
			case errors.Is(err, fs.ErrNotExist):
			case err != nil:
				return err
			default:
				if st, err := os.Stat(path); err == nil {
					mode = st.Mode().Perm()
				}
				if len(bytes.TrimSpace(raw)) > 0 {
					if doc, err = parseSettings(raw); err != nil {
						return fmt.Errorf("%s is not a JSON object (%v): fix it or pass another --settings", path, err)
					}
				}
			}
			settings := map[string]any{}
			hooksAt := -1
			for i, k := range doc {
				if k.key == "hooks" {
					hooksAt = i
					if settings["hooks"], err = decodeKeepingNumbers(k.raw); err != nil {
						return fmt.Errorf("%s: %w", path, err)
					}
				}
			}
			merged, changed, err := mergeHookSettings(settings, bin)
			if err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			if !changed {
				fmt.Fprintf(a.stdout, "%s already has the meshctl hooks\n", path)
				return nil
			}
			hooks, err := marshalNoEscape(merged["hooks"])
			if err != nil {
				return err
			}
			if hooksAt < 0 {
				doc = append(doc, settingsKey{key: "hooks"})
				hooksAt = len(doc) - 1
			}
			doc[hooksAt].raw = hooks
			out, err := formatSettings(doc)
			if err != nil {
				return err
			}
			if err := writeFileAtomic(path, out, mode); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "hooks added to %s (UserPromptSubmit → %s hook working, Stop → %s hook idle)\n", path, bin, bin)
			return nil
		},
	}
	cmd.Flags().BoolVar(&write, "write", false, "merge the hooks into the settings file instead of printing them")
	cmd.Flags().StringVar(&path, "settings", "", "settings file to write (default ~/.claude/settings.json)")
	cmd.Flags().StringVar(&bin, "bin", "meshctl", "how the hook invokes meshctl (an absolute path if it is not on Claude Code's PATH)")
	return cmd
}

// settingsKey is one top-level key of a settings file and its value as written: a merge
// rewrites only "hooks", so the user's other settings keep their order and their numbers'
// exact text (decoded, 12345678901234567890 would come back as 12345678901234567000).
type settingsKey struct {
	key string
	raw json.RawMessage
}

// parseSettings splits a JSON object into its keys in order. A key given twice is refused:
// which one Claude Code reads is not ours to guess.
func parseSettings(raw []byte) ([]settingsKey, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	if tok, err := dec.Token(); err != nil {
		return nil, err
	} else if tok != json.Delim('{') {
		return nil, errors.New("not an object")
	}
	var doc []settingsKey
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := tok.(string)
		if seen[key] {
			return nil, fmt.Errorf("key %q appears twice", key)
		}
		seen[key] = true
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		doc = append(doc, settingsKey{key: key, raw: v})
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("data after the object")
	}
	return doc, nil
}

// decodeKeepingNumbers decodes raw with numbers kept as written (json.Number).
func decodeKeepingNumbers(raw []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	err := dec.Decode(&v)
	return v, err
}

func marshalNoEscape(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil
}

// formatSettings writes the keys back in order, indented by two spaces.
func formatSettings(doc []settingsKey) ([]byte, error) {
	var compact bytes.Buffer
	compact.WriteByte('{')
	for i, k := range doc {
		if i > 0 {
			compact.WriteByte(',')
		}
		key, err := marshalNoEscape(k.key)
		if err != nil {
			return nil, err
		}
		compact.Write(key)
		compact.WriteByte(':')
		compact.Write(k.raw)
	}
	compact.WriteByte('}')
	var out bytes.Buffer
	if err := json.Indent(&out, compact.Bytes(), "", "  "); err != nil {
		return nil, err
	}
	out.WriteByte('\n')
	return out.Bytes(), nil
}

// writeFileAtomic replaces path through a temporary file in its directory.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	name := tmp.Name()
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(mode)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(name, path)
	}
	if err != nil {
		_ = os.Remove(name)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
