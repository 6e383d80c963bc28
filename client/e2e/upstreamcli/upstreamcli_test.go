package upstreamcli

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker"
	"github.com/claudemesh/broker/db/dbtest"
)

// upstreamEnv names the upstream checkout: its root, holding apps/cli/src.
const upstreamEnv = "CLAUDEMESH_UPSTREAM_DIR"

// The scenarios cli-compat.mjs runs, each of which must report a pass.
var wantScenarios = []string{
	"daemon hello and session_hello",
	"session to session DM across replicas",
	"list_peers fields",
	"retried send delivered once",
	"redelivery after reconnect",
	"reattach by session key",
	"kick and ban",
}

// TestUpstreamCLI runs the upstream CLI's own client classes (DaemonBrokerClient,
// SessionBrokerClient, BrokerClient and its crypto) against 3 replicas on one database: see
// cli-compat.mjs for the scenarios.
func TestUpstreamCLI(t *testing.T) {
	upstream := os.Getenv(upstreamEnv)
	if upstream == "" {
		t.Skip(upstreamEnv + " is unset: set it to a claudemesh checkout (commit 213a6b3, CLI 1.37) to run the upstream CLI compatibility test")
	}
	upstream, err := filepath.Abs(upstream)
	require.NoError(t, err)
	for _, f := range []string{"daemon/session-broker.ts", "daemon/broker.ts", "services/broker/ws-client.ts"} {
		if _, err := os.Stat(filepath.Join(upstream, "apps/cli/src", f)); err != nil {
			t.Fatalf("%s=%s is not a claudemesh checkout with the CLI 1.37 client code (commit 213a6b3): %v", upstreamEnv, upstream, err)
		}
	}
	node := requireNode(t)

	modules := installModules(t)
	work := t.TempDir()
	bundle := buildBundle(t, node, modules, upstream, work)

	input := startMesh(t)
	input.DeadlineMs = 150_000
	stdin, err := json.Marshal(input)
	require.NoError(t, err)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, bundle)
	cmd.Dir = work
	cmd.Env = childEnv()
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 5 * time.Second
	runErr := cmd.Run()

	passed := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(stdout.Bytes()))
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		t.Log(sc.Text())
		var r struct {
			Scenario string `json:"scenario"`
			Pass     bool   `json:"pass"`
		}
		if json.Unmarshal(sc.Bytes(), &r) == nil && r.Pass {
			passed[r.Scenario] = true
		}
	}
	if stderr.Len() > 0 {
		t.Logf("cli-compat stderr:\n%s", stderr.String())
	}
	if ctx.Err() != nil {
		t.Fatalf("cli-compat did not finish within its deadline")
	}
	require.NoError(t, runErr, "cli-compat failed: its scenario lines are above")
	for _, s := range wantScenarios {
		require.True(t, passed[s], "scenario %q did not report a pass", s)
	}
}

// requireNode returns node's path, skipping the test when Node 20 or later is not installed.
func requireNode(t *testing.T) string {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not on PATH: the upstream CLI compatibility test needs Node.js 20 or later")
	}
	out, err := exec.Command(node, "--version").Output()
	if err != nil {
		t.Skipf("node --version failed (%v): the upstream CLI compatibility test needs Node.js 20 or later", err)
	}
	v := strings.TrimPrefix(strings.TrimSpace(string(out)), "v")
	major, _ := strconv.Atoi(strings.SplitN(v, ".", 2)[0])
	if major < 20 {
		t.Skipf("node is %s: the upstream CLI compatibility test needs Node.js 20 or later", v)
	}
	return node
}

// installModules returns a node_modules directory holding package-lock.json's packages (ws and
// libsodium-wrappers, as the upstream CLI pins them, and esbuild). It is installed once per
// lock file and platform under the user cache directory, so reruns don't touch the registry.
func installModules(t *testing.T) string {
	t.Helper()
	h := sha256.New()
	for _, f := range []string{"package.json", "package-lock.json"} {
		b, err := os.ReadFile(f)
		require.NoError(t, err)
		h.Write(b)
	}
	fmt.Fprintf(h, "%s/%s", runtime.GOOS, runtime.GOARCH) // esbuild's binary is per platform
	cacheRoot, err := os.UserCacheDir()
	if err != nil {
		cacheRoot = t.TempDir() // no cache directory: install for this run only
	}
	cacheRoot = filepath.Join(cacheRoot, "claudemesh-broker", "upstreamcli")
	final := filepath.Join(cacheRoot, hex.EncodeToString(h.Sum(nil))[:16])
	if installed(final) {
		return filepath.Join(final, "node_modules")
	}

	npm, err := exec.LookPath("npm")
	if err != nil {
		t.Skip("npm is not on PATH: the upstream CLI compatibility test installs ws, libsodium-wrappers and esbuild with it")
	}
	require.NoError(t, os.MkdirAll(cacheRoot, 0o755))
	// Installed aside and renamed into place: a concurrent or interrupted run never sees half
	// an install.
	tmp, err := os.MkdirTemp(cacheRoot, "install-")
	require.NoError(t, err)
	defer os.RemoveAll(tmp)
	for _, f := range []string{"package.json", "package-lock.json"} {
		b, err := os.ReadFile(f)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(tmp, f), b, 0o644))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// No install scripts: none of the three needs one (esbuild's only checks its binary).
	cmd := exec.CommandContext(ctx, npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund")
	cmd.Dir = tmp
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "npm ci:\n%s", out)
	if err := os.Rename(tmp, final); err != nil && !installed(final) {
		t.Fatalf("move the install into the cache: %v", err)
	}
	return filepath.Join(final, "node_modules")
}

func installed(dir string) bool {
	for _, p := range []string{"esbuild/bin/esbuild", "ws/package.json", "libsodium-wrappers/package.json"} {
		if _, err := os.Stat(filepath.Join(dir, "node_modules", p)); err != nil {
			return false
		}
	}
	return true
}

// buildBundle bundles cli-compat.mjs with the upstream modules entry.ts names into work, and
// returns the bundle's path. ws and libsodium-wrappers stay external, found through
// work/node_modules at run time, so the script and the upstream code share one ws.
func buildBundle(t *testing.T, node, modules, upstream, work string) string {
	t.Helper()
	require.NoError(t, os.Symlink(modules, filepath.Join(work, "node_modules")))
	// The upstream package's own tsconfig extends a workspace package that is absent; this one
	// only maps the CLI's "~/" imports into the checkout.
	tsconfig, err := json.Marshal(map[string]any{"compilerOptions": map[string]any{
		"target": "es2022", "module": "esnext", "moduleResolution": "bundler", "strict": false, "skipLibCheck": true,
		"baseUrl": filepath.Join(upstream, "apps/cli"), "paths": map[string][]string{"~/*": {"./src/*"}},
	}})
	require.NoError(t, err)
	tsPath := filepath.Join(work, "tsconfig.json")
	require.NoError(t, os.WriteFile(tsPath, tsconfig, 0o644))
	script, err := filepath.Abs("cli-compat.mjs")
	require.NoError(t, err)
	out := filepath.Join(work, "cli-compat.bundle.mjs")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, filepath.Join(modules, "esbuild/bin/esbuild"), script,
		"--bundle", "--platform=node", "--format=esm", "--target=node20", "--log-level=warning",
		"--tsconfig="+tsPath, "--external:ws", "--external:libsodium-wrappers",
		// What upstream's build.ts defines; the CLI reports it as its version.
		`--define:__CLAUDEMESH_VERSION__="1.37.0"`,
		// Upstream calls a bare require("node:os") inside ES modules (daemon/broker.ts,
		// services/broker/ws-client.ts): give the bundle one.
		"--banner:js=import { createRequire as __cmCreateRequire } from 'node:module'; const require = __cmCreateRequire(import.meta.url);",
		"--outfile="+out)
	b, err := cmd.CombinedOutput()
	require.NoError(t, err, "esbuild:\n%s", b)
	return out
}

// childEnv is the environment without the caller's CLAUDEMESH_* and CLAUDE_* settings: the
// CLI's cold client reads its display name and session id from them.
func childEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CLAUDEMESH_") && !strings.HasPrefix(kv, "CLAUDE_") {
			env = append(env, kv)
		}
	}
	return env
}

// compatInput is what cli-compat.mjs reads on stdin.
type compatInput struct {
	URLs       []string       `json:"urls"`
	MeshID     string         `json:"meshId"`
	MeshSlug   string         `json:"meshSlug"`
	Members    []compatMember `json:"members"`
	DeadlineMs int            `json:"deadlineMs"`
}

type compatMember struct {
	Name      string `json:"name"`
	MemberID  string `json:"memberId"`
	Pubkey    string `json:"pubkey"`
	SecretKey string `json:"secretKey"` // libsodium's form: seed then public key, as Go's
	Admin     bool   `json:"admin"`
}

// startMesh starts 3 replicas on a fresh database and creates a mesh with members alice, bob
// and an admin straight in the tables (membership has tests of its own).
func startMesh(t *testing.T) compatInput {
	t.Helper()
	url := dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	ctx := dbtest.Context(t)
	var in compatInput
	for i := range 3 {
		id := fmt.Sprintf("n%d", i)
		srv, err := broker.NewServer(broker.Config{NodeID: id, Region: "test"}, dbtest.PoolFor(t, url), dbtest.Logger(t).With("test_node", id))
		require.NoError(t, err)
		require.NoError(t, srv.Start(context.Background(), "127.0.0.1:0"))
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_ = srv.Stop(ctx)
		})
		dbtest.WaitFor(t, 10*time.Second, "listener of "+id+" connected", srv.BusConnected)
		in.URLs = append(in.URLs, "ws://"+srv.Addr()+"/ws")
	}

	owner := make([]byte, 32)
	_, _ = rand.Read(owner)
	in.MeshSlug = "compat-" + hex.EncodeToString(owner[:3])
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.mesh (slug, name, owner_pubkey, max_peers)
		VALUES ($1, $1, $2, 0) RETURNING id`, in.MeshSlug, hex.EncodeToString(owner)).Scan(&in.MeshID))
	for _, name := range []string{"alice", "bob", "admin"} {
		pub, priv, err := ed25519.GenerateKey(rand.Reader)
		require.NoError(t, err)
		m := compatMember{Name: name, Pubkey: hex.EncodeToString(pub), SecretKey: hex.EncodeToString(priv), Admin: name == "admin"}
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO claudemesh.member (mesh_id, pubkey, display_name)
			VALUES ($1, $2, $3) RETURNING id`, in.MeshID, m.Pubkey, name).Scan(&m.MemberID))
		if m.Admin {
			_, err := pool.Exec(ctx, `UPDATE claudemesh.member SET role = 'admin' WHERE id = $1`, m.MemberID)
			require.NoError(t, err)
		}
		in.Members = append(in.Members, m)
	}
	return in
}
