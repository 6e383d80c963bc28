package deploy

import (
	"bytes"
	"encoding/json"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
)

// ---------------------------------------------------------------------------------------------
// grafana-dashboard.json: it parses, it is laid out, and its queries use only the metrics (and
// labels) docs/metrics.md documents, each in a way that fits its type.

type grafanaDashboard struct {
	Title         string         `json:"title"`
	UID           string         `json:"uid"`
	SchemaVersion int            `json:"schemaVersion"`
	Panels        []grafanaPanel `json:"panels"`
	Templating    struct {
		List []struct {
			Name string `json:"name"`
			Type string `json:"type"`
		} `json:"list"`
	} `json:"templating"`
}

type grafanaPanel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource *grafanaDS      `json:"datasource"`
	GridPos    grafanaGridPos  `json:"gridPos"`
	Targets    []grafanaTarget `json:"targets"`
	Panels     []grafanaPanel  `json:"panels"` // a row's panels when collapsed
}

type grafanaDS struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type grafanaGridPos struct{ X, Y, W, H int }

type grafanaTarget struct {
	RefID string `json:"refId"`
	Expr  string `json:"expr"`
}

// metricDoc is one row of the table in docs/metrics.md.
type metricDoc struct {
	typ    string
	labels []string
}

// loadMetricsDoc parses the table in docs/metrics.md (metric | type | labels | ...).
func loadMetricsDoc(t *testing.T) map[string]metricDoc {
	t.Helper()
	tick := regexp.MustCompile("`([^`]+)`")
	out := map[string]metricDoc{}
	for _, line := range strings.Split(string(readFile(t, "../docs/metrics.md")), "\n") {
		if !strings.HasPrefix(line, "| `claudemesh_") {
			continue
		}
		cells := strings.Split(line, "|")
		if len(cells) < 6 {
			t.Fatalf("docs/metrics.md: row %q needs metric | type | labels | meaning | alert on", line)
		}
		m := metricDoc{typ: strings.TrimSpace(cells[2])}
		for _, l := range tick.FindAllStringSubmatch(cells[3], -1) {
			m.labels = append(m.labels, l[1])
		}
		out[strings.Trim(strings.TrimSpace(cells[1]), "`")] = m
	}
	if len(out) == 0 {
		t.Fatal("docs/metrics.md has no metric table")
	}
	return out
}

func loadDashboard(t *testing.T) grafanaDashboard {
	t.Helper()
	raw := readFile(t, "grafana-dashboard.json")
	if !json.Valid(raw) {
		t.Fatal("grafana-dashboard.json is not valid JSON")
	}
	var d grafanaDashboard
	if err := json.NewDecoder(bytes.NewReader(raw)).Decode(&d); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	return d
}

// flatPanels returns every panel, rows' nested panels included.
func flatPanels(ps []grafanaPanel) []grafanaPanel {
	var out []grafanaPanel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, flatPanels(p.Panels)...)
	}
	return out
}

var (
	ourMetric = regexp.MustCompile(`\bclaudemesh_[a-zA-Z0-9_]+\b`)
	// rangeFunc matches rate(x{...}[..]) and friends, capturing the metric.
	rangeFunc = regexp.MustCompile(`\b(rate|irate|increase)\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)`)
	// selector matches metric{matchers}, capturing both.
	selector = regexp.MustCompile(`\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}`)
	matcher  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"`)
	grouping = regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
)

// Labels Prometheus adds to every series at scrape time.
var targetLabels = []string{"instance", "job"}

// resolve maps a series name used in PromQL to its documented family: histogram parts
// (_bucket, _sum, _count) belong to their histogram. part is the suffix ("" for the family).
func resolve(docs map[string]metricDoc, name string) (family, part string, ok bool) {
	if _, ok := docs[name]; ok {
		return name, "", true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, cut := strings.CutSuffix(name, suffix); cut && docs[base].typ == "histogram" {
			return base, suffix, true
		}
	}
	return "", "", false
}

func TestGrafanaDashboard(t *testing.T) {
	d := loadDashboard(t)
	docs := loadMetricsDoc(t)
	if d.Title == "" || d.UID == "" {
		t.Errorf("dashboard needs a title and a uid (title %q, uid %q)", d.Title, d.UID)
	}
	if d.SchemaVersion < 36 {
		t.Errorf("schemaVersion %d: export from Grafana 9 or later", d.SchemaVersion)
	}
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
	}
	if vars["datasource"] != "datasource" {
		t.Errorf("dashboard needs a datasource variable named datasource, so it imports into any Grafana: %v", vars)
	}

	used := map[string]bool{}
	ids := map[int]string{}
	panels := flatPanels(d.Panels)
	for _, p := range panels {
		where := "panel " + strings.TrimSpace(p.Title)
		if p.Title == "" {
			t.Errorf("panel %d has no title", p.ID)
		}
		if other, dup := ids[p.ID]; dup || p.ID <= 0 {
			t.Errorf("%s: id %d is missing or also used by %q", where, p.ID, other)
		}
		ids[p.ID] = p.Title
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.Y < 0 || g.X+g.W > 24 {
			t.Errorf("%s: gridPos %+v is outside the 24-column grid", where, g)
		}
		if p.Type == "row" {
			continue
		}
		if !slices.Contains([]string{"timeseries", "stat", "gauge", "heatmap", "bargauge", "table", "text"}, p.Type) {
			t.Errorf("%s: unexpected panel type %q", where, p.Type)
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("%s: datasource must be the ${datasource} variable, is %+v", where, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("%s: no queries", where)
		}
		refs := map[string]bool{}
		for _, tg := range p.Targets {
			if tg.RefID == "" || refs[tg.RefID] {
				t.Errorf("%s: query refId %q missing or repeated", where, tg.RefID)
			}
			refs[tg.RefID] = true
			checkExpr(t, where, tg.Expr, docs, vars, used)
		}
	}
	if len(panels) < 10 {
		t.Errorf("only %d panels", len(panels))
	}

	// The dashboard covers every documented metric.
	var unused []string
	for name := range docs {
		if !used[name] {
			unused = append(unused, name)
		}
	}
	sort.Strings(unused)
	for _, name := range unused {
		t.Errorf("%s is documented in docs/metrics.md but no dashboard panel shows it", name)
	}
}

// checkExpr checks one PromQL expression against the documented metrics: names exist, labels
// exist, rate()/increase() only over counters and histogram parts, quantiles over buckets.
func checkExpr(t *testing.T, where, expr string, docs map[string]metricDoc, vars map[string]string, used map[string]bool) {
	t.Helper()
	if strings.TrimSpace(expr) == "" {
		t.Errorf("%s: empty expr", where)
		return
	}
	for _, pair := range [][2]string{{"(", ")"}, {"{", "}"}, {"[", "]"}} {
		if strings.Count(expr, pair[0]) != strings.Count(expr, pair[1]) {
			t.Errorf("%s: unbalanced %s%s in %q", where, pair[0], pair[1], expr)
		}
	}
	for _, v := range regexp.MustCompile(`\$([a-zA-Z_]+)`).FindAllStringSubmatch(expr, -1) {
		if _, ok := vars[v[1]]; !ok && !strings.HasPrefix(v[1], "__") {
			t.Errorf("%s: $%s is not a dashboard variable", where, v[1])
		}
	}

	// Every claudemesh_ series is documented; collect the labels the expression may group by.
	allowed := slices.Clone(targetLabels)
	for _, name := range ourMetric.FindAllString(expr, -1) {
		family, part, ok := resolve(docs, name)
		if !ok {
			t.Errorf("%s: %s is not documented in docs/metrics.md (%q)", where, name, expr)
			continue
		}
		used[family] = true
		allowed = append(allowed, docs[family].labels...)
		if part == "_bucket" {
			allowed = append(allowed, "le")
		}
		if docs[family].typ == "histogram" && part == "" {
			t.Errorf("%s: histogram %s must be queried as _bucket, _sum or _count", where, family)
		}
	}
	for _, m := range rangeFunc.FindAllStringSubmatch(expr, -1) {
		family, part, ok := resolve(docs, m[2])
		if !ok {
			continue
		}
		if typ := docs[family].typ; typ != "counter" && !(typ == "histogram" && part != "") {
			t.Errorf("%s: %s() over %s, a %s: rate and increase are for counters", where, m[1], m[2], typ)
		}
	}
	if strings.Contains(expr, "histogram_quantile") {
		if !strings.Contains(expr, "_bucket") || !regexp.MustCompile(`by \([^)]*\ble\b`).MatchString(expr) {
			t.Errorf("%s: histogram_quantile needs _bucket series aggregated by le: %q", where, expr)
		}
	}
	for _, s := range selector.FindAllStringSubmatch(expr, -1) {
		family, part, ok := resolve(docs, s[1])
		if !ok {
			continue // another exporter's series (go_*, process_*), or undocumented: reported above
		}
		labels := append(slices.Clone(targetLabels), docs[family].labels...)
		if part == "_bucket" {
			labels = append(labels, "le")
		}
		for _, l := range matcher.FindAllStringSubmatch(s[2], -1) {
			if !slices.Contains(labels, l[1]) {
				t.Errorf("%s: %s has no label %q (documented: %v)", where, s[1], l[1], docs[family].labels)
			}
		}
	}
	for _, g := range grouping.FindAllStringSubmatch(expr, -1) {
		for _, l := range strings.Split(g[1], ",") {
			if l = strings.TrimSpace(l); l != "" && !slices.Contains(allowed, l) {
				t.Errorf("%s: groups by %q, which none of its metrics has (%q)", where, l, expr)
			}
		}
	}
}
