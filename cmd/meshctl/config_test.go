package main

import (
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/protocol"
)

func TestBrokerURLs(t *testing.T) {
	t.Parallel()
	for in, want := range map[string][2]string{
		"ws://h:7900/ws":          {"ws://h:7900/ws", "http://h:7900"},
		"wss://broker.example/ws": {"wss://broker.example/ws", "https://broker.example"},
		"http://h:7900":           {"ws://h:7900/ws", "http://h:7900"},
		"https://h/":              {"wss://h/ws", "https://h"},
		"https://h/mesh/ws":       {"wss://h/mesh/ws", "https://h/mesh"},
		"ws://h/ws/":              {"ws://h/ws/", "http://h"},
	} {
		ws, err := wsURL(in)
		require.NoError(t, err, in)
		require.Equal(t, want[0], ws, in)
		base, err := httpBaseURL(in)
		require.NoError(t, err, in)
		require.Equal(t, want[1], base, in)
	}
	for _, bad := range []string{"", "h:7900", "ftp://h", "ws://", "::"} {
		_, err := wsURL(bad)
		require.Error(t, err, bad)
	}
}

func TestIdentityFiles(t *testing.T) {
	t.Parallel()
	home := filepath.Join(t.TempDir(), "meshctl")
	a := &app{home: home}
	_, err := a.loadIdentity()
	require.ErrorIs(t, err, errNoIdentity)

	id, err := newIdentity("carol")
	require.NoError(t, err)
	path, err := a.saveIdentity(id)
	require.NoError(t, err)
	st, err := os.Stat(home)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), st.Mode().Perm())
	st, err = os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm())

	got, err := a.loadIdentity()
	require.NoError(t, err)
	require.Equal(t, id.Pubkey, got.Pubkey)
	require.Equal(t, "carol", got.DisplayName)
	sig := ed25519.Sign(got.PrivateKey(), []byte("x"))
	pub, _ := protocol.ParsePubkey(id.Pubkey)
	require.True(t, ed25519.Verify(pub, []byte("x"), sig))

	// Readable by others: refused, with the fix.
	require.NoError(t, os.Chmod(path, 0o644))
	_, err = a.loadIdentity()
	require.ErrorContains(t, err, "chmod 600")
	require.NoError(t, os.Chmod(path, 0o600))

	// A public half that does not match the secret is refused.
	var doc map[string]any
	raw, _ := os.ReadFile(path)
	require.NoError(t, json.Unmarshal(raw, &doc))
	other, _ := newIdentity("x")
	doc["pubkey"] = other.Pubkey
	raw, _ = json.Marshal(doc)
	require.NoError(t, writeSecretFile(path, raw))
	_, err = a.loadIdentity()
	require.ErrorContains(t, err, "does not match")
}

func TestMeshSelection(t *testing.T) {
	t.Parallel()
	a := &app{home: t.TempDir()}
	_, err := a.selectMesh()
	require.ErrorContains(t, err, "meshctl join")
	require.NoError(t, a.saveMesh(MeshEntry{MeshID: "id1", Slug: "one", BrokerURL: "ws://a/ws", JoinedAt: time.Now()}))
	m, err := a.selectMesh()
	require.NoError(t, err)
	require.Equal(t, "id1", m.MeshID)
	require.NoError(t, a.saveMesh(MeshEntry{MeshID: "id2", Slug: "two", BrokerURL: "ws://b/ws"}))
	_, err = a.selectMesh()
	require.ErrorContains(t, err, "--mesh")
	a.meshRef = "id2"
	m, err = a.selectMesh()
	require.NoError(t, err)
	require.Equal(t, "two", m.Slug)
	// Joining again replaces the entry.
	require.NoError(t, a.saveMesh(MeshEntry{MeshID: "id2", Slug: "two", BrokerURL: "ws://c/ws"}))
	all, err := a.loadMeshes()
	require.NoError(t, err)
	require.Len(t, all, 2)
	require.Equal(t, "ws://c/ws", all[1].BrokerURL)
	a.meshRef = "three"
	_, err = a.selectMesh()
	require.ErrorContains(t, err, `not a member of mesh "three"`)
}

func TestSanitize(t *testing.T) {
	t.Parallel()
	require.Equal(t, "a\\x1b[31mred\nb\tc", sanitize("a\x1b[31mred\nb\tc"))
	require.Equal(t, "a\\x0ab", field("a\nb"), "a name keeps to its row")
	require.Equal(t, "é ✓", sanitize("é ✓"))
	require.Equal(t, "\\x9b", sanitize("\u009b"))
}

func TestHistogram(t *testing.T) {
	t.Parallel()
	var h histogram
	for i := 1; i <= 100000; i++ {
		h.record(time.Duration(i) * time.Microsecond)
	}
	for _, q := range []float64{0.5, 0.95, 0.99} {
		got := float64(h.quantile(q))
		require.InEpsilon(t, q*100000, got, 0.01, "q=%v", q)
	}
	require.Equal(t, uint64(100000), h.quantile(1))
	require.Equal(t, uint64(100000), h.max)

	// Every value lands in a bucket whose middle is within 1%.
	for range 10000 {
		v := rand.Uint64N(1 << 40)
		mid := histValue(histIndex(v))
		if v >= histSub {
			require.InEpsilon(t, float64(v), float64(mid), 0.01, "v=%d", v)
		} else {
			require.Equal(t, v, mid)
		}
	}
	var other histogram
	other.record(5 * time.Second)
	h.merge(&other)
	require.Equal(t, uint64(100001), h.n)
	require.Equal(t, uint64(5_000_000), h.max)
	r := h.report()
	require.Equal(t, 5000.0, r.MaxMs)

	var empty histogram
	require.Equal(t, latencyReport{}, empty.report())
}

func TestParseMix(t *testing.T) {
	t.Parallel()
	m, err := parseMix("now=1,next=3,low=0", "now", "next", "low")
	require.NoError(t, err)
	require.Equal(t, []string{"now", "next"}, m.names)
	r := rand.New(rand.NewPCG(1, 2))
	counts := map[string]int{}
	for range 4000 {
		counts[m.pick(r)]++
	}
	require.InDelta(t, 1000, counts["now"], 150)
	require.InDelta(t, 3000, counts["next"], 150)
	for _, bad := range []string{"", "now=0", "soon=1", "now=-1", "now=x"} {
		_, err := parseMix(bad, "now", "next", "low")
		require.Error(t, err, bad)
	}
}

func TestReadRSS(t *testing.T) {
	t.Parallel()
	kb, err := readRSS(os.Getpid())
	require.NoError(t, err)
	require.Positive(t, kb)
	_, err = readRSS(1 << 30)
	require.Error(t, err)
}

// listen learns names from every peer_joined and peer_status event: a long run in a busy
// mesh (a new session key per session) or a broker sending endless events must not grow the
// table without bound, and a name just learned still resolves.
func TestPeerNamesBounded(t *testing.T) {
	const bound, events = 4096, 50_000
	n := newPeerNames()
	for i := range events {
		n.set(fmt.Sprintf("%064x", i), "peer")
	}
	require.LessOrEqual(t, len(n.m), bound)
	last := fmt.Sprintf("%064x", events-1)
	name, ok := n.lookup(last)
	require.True(t, ok)
	require.Equal(t, "peer", name)
}
