package broker

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/protocol"
)

// docMetric is one row of the table in docs/metrics.md.
type docMetric struct {
	typ    string
	labels []string // sorted
}

var backticked = regexp.MustCompile("`([^`]+)`")

// readMetricsDoc parses the metric table of docs/metrics.md: rows whose first cell is a
// `claudemesh_*` name, then the type, then the label names in backticks.
func readMetricsDoc(t *testing.T) map[string]docMetric {
	t.Helper()
	b, err := os.ReadFile("../docs/metrics.md")
	require.NoError(t, err)
	out := map[string]docMetric{}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, "| `claudemesh_") {
			continue
		}
		cells := strings.Split(line, "|")
		require.GreaterOrEqual(t, len(cells), 6, "docs/metrics.md: row %q needs metric | type | labels | meaning | alert on", line)
		name := strings.Trim(strings.TrimSpace(cells[1]), "`")
		require.NotContains(t, out, name, "docs/metrics.md lists %s twice", name)
		m := docMetric{typ: strings.TrimSpace(cells[2]), labels: []string{}}
		for _, l := range backticked.FindAllStringSubmatch(cells[3], -1) {
			m.labels = append(m.labels, l[1])
		}
		sort.Strings(m.labels)
		out[name] = m
	}
	require.NotEmpty(t, out, "docs/metrics.md has no metric table")
	return out
}

// scrapedFamily is one metric family seen at /metrics.
type scrapedFamily struct {
	typ    string
	labels map[string]bool
}

var sampleLabel = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"`)

// scrapeMetrics reads /metrics in the text format: families from # TYPE lines, label names
// from the samples (histogram samples fold into their family; le is not a label of ours).
func scrapeMetrics(t *testing.T, addr string) map[string]*scrapedFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	fams := map[string]*scrapedFamily{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			parts := strings.Fields(f)
			require.Len(t, parts, 2, "bad TYPE line %q", line)
			fams[parts[0]] = &scrapedFamily{typ: parts[1], labels: map[string]bool{}}
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, rest := line, ""
		if i := strings.IndexAny(line, "{ "); i >= 0 {
			name, rest = line[:i], line[i:]
		}
		fam := fams[name]
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); fam == nil && ok {
				fam = fams[base]
			}
		}
		require.NotNil(t, fam, "sample %q before its TYPE line", line)
		if labels, ok := strings.CutPrefix(rest, "{"); ok {
			labels = labels[:strings.LastIndex(labels, "}")]
			for _, l := range sampleLabel.FindAllStringSubmatch(labels, -1) {
				if l[1] != "le" {
					fam.labels[l[1]] = true
				}
			}
		}
	}
	require.NoError(t, sc.Err())
	return fams
}

// TestMetricsDocumented compares the claudemesh_* families a replica exports, after enough
// traffic for every labelled vector to have a child, with the table in docs/metrics.md, in
// both directions, including each family's type and label names.
func TestMetricsDocumented(t *testing.T) {
	t.Parallel()
	documented := readMetricsDoc(t)
	c := newCluster(t, 1, func(cfg *Config) { cfg.WriteRatePerMember, cfg.WriteBurstPerMember = 1, 1 })
	srv := c.nodes[0]
	ctx := ctxT(t)

	// Traffic that gives every vector a child.
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a, b := m.dial(0, alice), m.dial(0, bob)
	_, err := a.Send(ctx, bob.pub, protocol.PriorityNow, "n", "c", "") // messages_routed, pushes
	require.NoError(t, err)
	nextPush(t, b, 5*time.Second)
	require.NoError(t, a.SendRaw(ctx, []byte(`{"type":`))) // bad_frames
	_, err = a.NextError(ctx)
	require.NoError(t, err)
	pub, priv, err := generateKey() // connections_rejected: a key that is no member
	require.NoError(t, err)
	_, err = m.tryDial(0, &testMember{id: "nobody", name: "mallory", key: priv, pub: hex.EncodeToString(pub)})
	require.Error(t, err)
	_, err = a.Send(ctx, bob.pub, protocol.PriorityNow, "n", strings.Repeat("c", srv.cfg.MaxEnvelopeBytes), "") // sends_refused
	require.Error(t, err)
	for i := range 5 { // requests_rate_limited: a burst of one at one a second; five writes at once pass it
		require.NoError(t, a.SetSummary(ctx, fmt.Sprint("summary ", i)))
	}
	e, err := a.NextError(ctx)
	require.NoError(t, err)
	require.Equal(t, protocol.CodeRateLimited, e.Code)
	_, err = a.ListBans(ctx) // admin_operations
	require.Error(t, err)
	code, _ := postHook(t, srv, alice, protocol.HookRequest{CWD: "/work/alice", PID: 1000, Status: "working"}) // hook_requests
	require.Equal(t, http.StatusOK, code)
	code, _ = getHealth(t, srv.Addr()) // health_checks
	require.Equal(t, http.StatusOK, code)
	_, err = c.pool.Exec(context.Background(), `SELECT pg_notify($1, 'not a bus message')`, srv.bus.NodeChannel(srv.NodeID())) // bus_events
	require.NoError(t, err)

	var exported map[string]*scrapedFamily
	missing := func() []string {
		var out []string
		for name := range documented {
			if exported[name] == nil {
				out = append(out, name)
			}
		}
		sort.Strings(out)
		return out
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		exported = scrapeMetrics(t, srv.Addr())
		if len(missing()) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // polling a condition (bus events arrive asynchronously), with a deadline
	}

	for _, name := range missing() {
		t.Errorf("%s is documented in docs/metrics.md but not exported at /metrics (removed or renamed? a vector with no child yet needs traffic in this test)", name)
	}
	var names []string
	for name := range exported {
		names = append(names, name)
	}
	sort.Strings(names)
	ours := 0
	for _, name := range names {
		if !strings.HasPrefix(name, "claudemesh_") {
			continue
		}
		ours++
		fam, doc := exported[name], documented[name]
		if doc.typ == "" {
			t.Errorf("%s (%s) is exported at /metrics but not documented in docs/metrics.md: add a row to its table", name, fam.typ)
			continue
		}
		if fam.typ != doc.typ {
			t.Errorf("%s is a %s at /metrics, docs/metrics.md says %s", name, fam.typ, doc.typ)
		}
		var labels []string
		for l := range fam.labels {
			labels = append(labels, l)
		}
		sort.Strings(labels)
		if !slices.Equal(labels, doc.labels) {
			t.Errorf("%s has labels %v at /metrics, docs/metrics.md says %v", name, labels, doc.labels)
		}
	}
	require.Positive(t, ours, "no claudemesh_* family at /metrics at all")
	require.Contains(t, exported, "go_goroutines", "the Go collector the docs mention")
	require.Contains(t, exported, "process_resident_memory_bytes", "the process collector the docs mention")
}

// docLabelValues returns the backticked words of a metric's row in docs/metrics.md, past its
// label column: the label values (and the settings) its meaning names.
func docLabelValues(t *testing.T, metric string) map[string]bool {
	t.Helper()
	b, err := os.ReadFile("../docs/metrics.md")
	require.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, "| `"+metric+"` |") {
			continue
		}
		cells := strings.Split(line, "|")
		require.GreaterOrEqual(t, len(cells), 6, "docs/metrics.md: row of %s", metric)
		out := map[string]bool{}
		for _, v := range backticked.FindAllStringSubmatch(strings.Join(cells[4:], "|"), -1) {
			out[v[1]] = true
		}
		return out
	}
	t.Fatalf("docs/metrics.md has no row for %s", metric)
	return nil
}

// taskLiteral finds the task names given to backgroundError and to the sweeper's run.
var taskLiteral = regexp.MustCompile(`(?:backgroundError\([^,]+, |\.run\(ctx, )"([a-z_]+)"`)

// TestMetricsDocLabelValues checks the label values whose full set the code knows: every
// task a background failure is counted under is listed in backgroundTasks (so its series
// exists from the start, at 0, and an alert on it has a series to watch) and documented, and
// every documented task is one; every join outcome is documented.
func TestMetricsDocLabelValues(t *testing.T) {
	t.Parallel()
	tasks := map[string]bool{}
	for _, task := range backgroundTasks {
		tasks[task] = true
	}
	files, err := filepath.Glob("*.go")
	require.NoError(t, err)
	used := map[string]bool{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		src, err := os.ReadFile(f)
		require.NoError(t, err)
		for _, m := range taskLiteral.FindAllStringSubmatch(string(src), -1) {
			used[m[1]] = true
		}
	}
	require.NotEmpty(t, used, "found no backgroundError calls: the pattern is out of date")
	for task := range used {
		if !tasks[task] {
			t.Errorf("background task %q is counted in background_errors_total but missing from backgroundTasks: its series does not exist until it first fails", task)
		}
	}
	documented := docLabelValues(t, "claudemesh_background_errors_total")
	for task := range tasks {
		if !documented[task] {
			t.Errorf("background task %q is not documented in the claudemesh_background_errors_total row of docs/metrics.md", task)
		}
	}
	for v := range documented {
		if !tasks[v] {
			t.Errorf("docs/metrics.md documents background task %q, which backgroundTasks does not have", v)
		}
	}
	documented = docLabelValues(t, "claudemesh_join_requests_total")
	for _, outcome := range membership.JoinOutcomes {
		if !documented[outcome] {
			t.Errorf("join outcome %q is not documented in the claudemesh_join_requests_total row of docs/metrics.md", outcome)
		}
	}
}
