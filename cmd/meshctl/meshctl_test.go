package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

func randomText(prefix string) string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return prefix + " " + hex.EncodeToString(b)
}

// joinPair gives alice (joined through replica 0, the invite's broker) and bob (joined and
// connecting through replica 1 with --broker) their identities.
func joinPair(t *testing.T, e *testEnv) (alice, bob *cli) {
	t.Helper()
	link := e.invite(2)
	alice, bob = newCLI(t), newCLI(t)
	alice.must("init", "--name", "alice")
	bob.must("init", "--name", "bob")
	require.Contains(t, alice.must("join", link), "joined mesh demo as alice")
	require.Contains(t, bob.must("--broker", e.httpURL(1), "join", link), "joined mesh demo as bob")
	return alice, bob
}

// listenLines parses listen --json output.
func listenLines(t *testing.T, out string) []listenMessage {
	t.Helper()
	var msgs []listenMessage
	for line := range strings.Lines(out) {
		var m listenMessage
		require.NoError(t, json.Unmarshal([]byte(line), &m), line)
		if m.Type == "message" {
			msgs = append(msgs, m)
		}
	}
	return msgs
}

func findMessage(t *testing.T, out, text string) listenMessage {
	t.Helper()
	for _, m := range listenLines(t, out) {
		if m.Text == text {
			return m
		}
	}
	t.Fatalf("no message %q in %s", text, out)
	return listenMessage{}
}

func waitPeer(t *testing.T, c *cli, name string, status protocol.Status) {
	t.Helper()
	dbtest.WaitFor(t, 10*time.Second, name+" listed as "+string(status), func() bool {
		out, _, err := c.run("", "peers", "--json")
		if err != nil {
			return false
		}
		var peers []protocol.Peer
		if json.Unmarshal([]byte(out), &peers) != nil {
			return false
		}
		for _, p := range peers {
			if p.DisplayName == name && p.Status == status {
				return true
			}
		}
		return false
	})
}

// The acceptance test: two identities joined by invite exchange a direct and a
// broadcast message through two replicas; listen shows the plaintext, the database holds
// none of it.
func TestEncryptedMessagesAcrossReplicas(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 2, nil)
	alice, bob := joinPair(t, e)

	// Secrets are 0600 in a 0700 directory.
	for _, f := range []string{identityFileName, meshesFileName} {
		st, err := os.Stat(filepath.Join(bob.home, f))
		require.NoError(t, err)
		require.Equal(t, os.FileMode(0o600), st.Mode().Perm(), f)
	}
	var meshes []map[string]any
	require.NoError(t, json.Unmarshal([]byte(bob.must("meshes", "--json")), &meshes))
	require.Len(t, meshes, 1)
	require.Equal(t, e.mesh.ID, meshes[0]["meshId"])
	require.Equal(t, e.httpURL(1), meshes[0]["brokerUrl"])
	require.Equal(t, true, meshes[0]["hasRootKey"])
	require.NotContains(t, bob.must("meshes", "--json"), e.key.MeshRootKey, "the root key is never printed")

	listen := bob.start("listen", "--json")
	listen.waitErrOutput(t, "listening in mesh demo", 1)
	waitPeer(t, alice, "bob", protocol.StatusIdle)

	direct := randomText("direct secret")
	var sent map[string]any
	require.NoError(t, json.Unmarshal([]byte(alice.must("send", "--json", "bob", direct)), &sent))
	require.Equal(t, "direct", sent["mode"])
	group := randomText("group secret")
	require.Contains(t, alice.must("send", "--priority", "now", "*", group), "(group, priority now)")

	listen.waitOutput(t, group)
	listen.waitOutput(t, direct)
	d := findMessage(t, listen.out.String(), direct)
	require.Equal(t, "alice", d.From)
	require.Equal(t, "direct", d.Mode)
	require.True(t, d.Encrypted)
	require.Equal(t, sent["messageId"], d.MessageID)
	g := findMessage(t, listen.out.String(), group)
	require.Equal(t, "group", g.Mode)
	require.Equal(t, "now", g.Priority)

	// Only ciphertext reached the database.
	ctx := context.Background()
	var stored int
	require.NoError(t, e.pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.envelope`).Scan(&stored))
	require.GreaterOrEqual(t, stored, 2)
	for _, s := range []string{direct, group, base64.StdEncoding.EncodeToString([]byte(direct)), base64.StdEncoding.EncodeToString([]byte(group))} {
		var n int
		require.NoError(t, e.pool.QueryRow(ctx,
			`SELECT count(*) FROM claudemesh.envelope WHERE ciphertext LIKE '%'||$1||'%' OR nonce LIKE '%'||$1||'%'`, s).Scan(&n))
		require.Zero(t, n, "plaintext %q found in claudemesh.envelope", s)
	}

	// Acknowledged by listen: the sender sees it delivered.
	dbtest.WaitFor(t, 10*time.Second, "direct message delivered", func() bool {
		out, _, err := alice.run("", "message-status", "--json", d.MessageID)
		return err == nil && strings.Contains(out, `"delivered": true`)
	})
	require.Contains(t, alice.must("message-status", d.MessageID), "bob")

	// An early claudemesh client's unencrypted broadcast is shown, marked as such.
	plain := randomText("plain hello")
	sendPlainBroadcast(t, e, plain)
	listen.waitOutput(t, plain)
	p := findMessage(t, listen.out.String(), plain)
	require.Equal(t, "plain", p.Mode)
	require.False(t, p.Encrypted)
}

// sendPlainBroadcast sends a broadcast the way claudemesh's early clients did: plain base64.
func sendPlainBroadcast(t *testing.T, e *testEnv, text string) {
	t.Helper()
	key, err := membership.NewOwnerKey() // any fresh ed25519 key will do
	require.NoError(t, err)
	mb, err := e.svc.AddMember(context.Background(), membership.AddMemberParams{Mesh: e.mesh.ID, Pubkey: key.Pubkey(), DisplayName: "early"})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := client.Dial(ctx, client.Options{URL: e.wsURL(0), MeshID: e.mesh.ID, MemberID: mb.ID, MemberKey: key.PrivateKey, Logger: dbtest.Logger(t)})
	require.NoError(t, err)
	defer cl.Close()
	_, err = cl.Send(ctx, "*", protocol.PriorityNow, "", base64.StdEncoding.EncodeToString([]byte(text)), "")
	require.NoError(t, err)
}

// A real Claude Code UserPromptSubmit payload on stdin marks the session working: a next
// message waits (held) until the Stop hook's idle, while now passes at once. The hooks go to
// the replica the session is not on.
func TestHookHoldsNextUntilIdle(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 2, nil)
	alice, bob := joinPair(t, e)
	cwd := "/home/dev/" + randomText("project")[8:]
	listen := bob.start("listen", "--json", "--cwd", cwd)
	listen.waitErrOutput(t, "listening in mesh demo", 1)
	waitPeer(t, alice, "bob", protocol.StatusIdle)

	claudeSession := "5c1e4f0a-8d2b-4e8e-9f3a-" + hex.EncodeToString([]byte("claude"))
	submit := `{"session_id":"` + claudeSession + `","transcript_path":"/home/dev/.claude/projects/x/` + claudeSession + `.jsonl",` +
		`"cwd":"` + cwd + `","permission_mode":"default","hook_event_name":"UserPromptSubmit","prompt":"fix the flaky test"}`
	out, errOut, err := bob.run(submit, "--broker", e.httpURL(0), "hook", "working", "--strict")
	require.NoError(t, err, errOut)
	require.Empty(t, out, "a hook prints nothing on success (Claude Code would show it)")
	waitPeer(t, alice, "bob", protocol.StatusWorking)

	held := randomText("held until idle")
	var sent map[string]any
	require.NoError(t, json.Unmarshal([]byte(alice.must("send", "--json", "--priority", "next", "bob", held)), &sent))
	id := sent["messageId"].(string)
	dbtest.WaitFor(t, 10*time.Second, "message reported held", func() bool {
		out, _, err := alice.run("", "message-status", "--json", id)
		var st protocol.MessageStatusResult
		return err == nil && json.Unmarshal([]byte(out), &st) == nil && len(st.Recipients) == 1 &&
			st.Recipients[0].Status == protocol.RecipientHeld
	})
	urgent := randomText("urgent")
	alice.must("send", "--priority", "now", "bob", urgent)
	listen.waitOutput(t, urgent)
	require.NotContains(t, listen.out.String(), held, "next is held while working")

	stop := `{"session_id":"` + claudeSession + `","transcript_path":"/home/dev/.claude/projects/x/` + claudeSession + `.jsonl",` +
		`"cwd":"` + cwd + `","hook_event_name":"Stop","stop_hook_active":false}`
	_, errOut, err = bob.run(stop, "--broker", e.httpURL(0), "hook", "idle", "--strict")
	require.NoError(t, err, errOut)
	listen.waitOutput(t, held)
	require.Equal(t, "next", findMessage(t, listen.out.String(), held).Priority)
}

// listen survives a dropped connection (the presence waits in its grace, messages queue) and
// gets what was sent meanwhile; it stops for good when a newer process takes its session.
func TestListenReconnectsAndStopsWhenReplaced(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1, nil)
	alice, bob := joinPair2(t, e)
	proxy := dbtest.NewProxy(t, "postgres://"+e.nodes[0].Addr()+"/x")
	pu, err := url.Parse(proxy.URL("postgres://" + e.nodes[0].Addr() + "/x"))
	require.NoError(t, err)
	viaProxy := "ws://" + pu.Host + "/ws"

	listen := bob.start("--broker", viaProxy, "--session-id", "bob-laptop", "listen", "--json")
	listen.waitErrOutput(t, "listening in mesh demo", 1)
	waitPeer(t, alice, "bob", protocol.StatusIdle)

	proxy.Cut()
	listen.waitErrOutput(t, "reconnecting in", 1)
	away := randomText("sent while away")
	alice.must("send", "--priority", "now", "bob", away)
	proxy.Restore()
	listen.waitOutput(t, away)
	require.GreaterOrEqual(t, strings.Count(listen.err.String(), "listening in mesh demo"), 2)
	require.Len(t, listenLines(t, listen.out.String()), 1, "delivered once")

	// Same --session-id from another process: the first one is told session_replaced and
	// must not fight back.
	second := bob.start("--session-id", "bob-laptop", "listen", "--json")
	second.waitErrOutput(t, "listening in mesh demo", 1)
	err = listen.wait(t, 10*time.Second)
	require.ErrorContains(t, err, "took over this session")
}

// joinPair2 is joinPair on a one-replica cluster.
func joinPair2(t *testing.T, e *testEnv) (alice, bob *cli) {
	t.Helper()
	link := e.invite(2)
	alice, bob = newCLI(t), newCLI(t)
	alice.must("init", "--name", "alice")
	bob.must("init", "--name", "bob")
	alice.must("join", link)
	bob.must("join", link)
	return alice, bob
}

func TestOneShotCommands(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1, nil)
	alice, bob := joinPair2(t, e)
	listen := bob.start("listen", "--status", "dnd", "--summary", "reviewing PR 12", "--group", "backend:lead", "--json")
	listen.waitErrOutput(t, "listening in mesh demo", 1)
	waitPeer(t, alice, "bob", protocol.StatusDND)
	peers := alice.must("peers")
	require.Contains(t, peers, "reviewing PR 12")
	require.Contains(t, peers, "backend")
	var listed []protocol.Peer
	require.NoError(t, json.Unmarshal([]byte(alice.must("--session-id", "alice-peers", "peers", "--json")), &listed))
	require.NotEmpty(t, listed)
	for _, p := range listed {
		require.NotEqual(t, "alice-peers", p.SessionID, "the command's own session is not listed")
	}

	// Group target and pubkey target.
	grp := randomText("to backend")
	alice.must("send", "--priority", "now", "@backend", grp)
	listen.waitOutput(t, grp)
	id, err := bob.loadIdentityT()
	require.NoError(t, err)
	byKey := randomText("by key")
	alice.must("send", "--priority", "now", strings.ToUpper(id.Pubkey), byKey)
	listen.waitOutput(t, byKey)
	require.Equal(t, "direct", findMessage(t, listen.out.String(), byKey).Mode)

	_, _, err = alice.run("", "send", "nobody", "hi")
	require.ErrorContains(t, err, `no live peer is named "nobody"`)
	_, _, err = alice.run("", "send", "--priority", "urgent", "bob", "hi")
	require.ErrorContains(t, err, "want now, next or low")
	stranger, err := membership.NewOwnerKey()
	require.NoError(t, err)
	_, _, err = alice.run("", "send", stranger.Pubkey(), "hi")
	require.ErrorContains(t, err, "no such member or session")

	require.Contains(t, alice.must("status", "set", "working"), "status working")
	require.Contains(t, alice.must("summary", "writing", "tests"), "summary set")

	require.Contains(t, alice.must("state", "set", "build", `{"ok":true}`), `build = {"ok":true}`)
	require.Contains(t, alice.must("state", "set", "--string", "note", "42"), `note = "42"`)
	require.Contains(t, alice.must("state", "get", "build"), `{"ok":true}`)
	require.Contains(t, alice.must("state", "get", "missing"), "missing is not set")
	var entries []map[string]any
	require.NoError(t, json.Unmarshal([]byte(alice.must("state", "list", "--json")), &entries))
	require.Len(t, entries, 2)
	_, _, err = alice.run("", "message-status", "00000000-0000-0000-0000-000000000000")
	require.ErrorContains(t, err, "no message")

	// init refuses to replace an identity without --force.
	_, _, err = alice.run("", "init")
	require.ErrorContains(t, err, "--force")
	require.Contains(t, alice.must("init", "--force", "--name", "alice2"), "identity created")
}

func (c *cli) loadIdentityT() (*Identity, error) {
	a := &app{home: c.home, getenv: c.getenv}
	return a.loadIdentity()
}

// Bench end to end: a small run over two replicas delivers everything exactly once; the idle
// mode opens its sessions.
func TestBench(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 2, nil)
	c := newCLI(t)
	urls := e.wsURL(0) + "," + e.httpURL(1)
	pid := strconv.Itoa(os.Getpid())
	out := c.must("bench", "--json", "--no-progress", "--urls", urls, "--peers", "4", "--messages", "25",
		"--priority-mix", "now=1,next=1,low=1", "--target-mix", "direct=3,broadcast=1", "--size", "100",
		"--inflight", "2", "--setup-db", e.dbURL, "--pids", pid)
	var rep benchReport
	require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
	m := rep.Messages
	require.NotNil(t, m)
	require.EqualValues(t, 100, m.Sent)
	require.EqualValues(t, 100, m.Acked)
	require.Equal(t, m.Expected, m.Delivered)
	require.InDelta(t, 100, m.DeliveredPct, 0.001)
	require.Zero(t, m.Duplicates)
	require.Zero(t, m.Corrupt)
	require.Zero(t, m.Disconnects)
	require.EqualValues(t, 100, m.SendToAck.Count)
	require.Equal(t, uint64(m.Delivered), m.SendToPush.Count)
	require.Equal(t, 4, rep.Setup.Connections)
	require.Len(t, rep.RSS, 1)
	require.Positive(t, rep.RSS[0].AfterKiB)

	// Rate-limited, unencrypted, text output.
	out = c.must("bench", "--no-progress", "--urls", e.httpURL(0), "--peers", "3", "--messages", "10", "--rate", "300",
		"--plain", "--setup-db", e.dbURL)
	require.Contains(t, out, "delivered     30 of 30 (100.00%), 0 duplicates")

	out = c.must("bench", "--json", "--no-progress", "--urls", urls, "--idle-conns", "20", "--hold", "0s",
		"--setup-db", e.dbURL, "--pids", pid)
	rep = benchReport{}
	require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
	require.Equal(t, "idle", rep.Mode)
	require.Equal(t, 20, rep.Idle.Opened)
	require.Equal(t, 20, rep.Idle.Alive)
	require.Equal(t, 20, rep.Setup.Connections)
}
