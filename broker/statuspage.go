package broker

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"html/template"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/claudemesh/broker/broker/store"
)

// The admin status page (GET /status): a read-only, server-rendered view of the cluster as
// Postgres sees it, plus this replica's own state. It is off unless BROKER_ADMIN_TOKEN is set.
// It shows ids, counts, ages and key prefixes; never tokens, whole keys or message content.

const (
	// statusPageRefresh is how often the page reloads itself.
	statusPageRefresh = 5 * time.Second
	// statusPageTimeout bounds the page's database work: a slow database must not hang the page.
	statusPageTimeout = 3 * time.Second
	// statusPageRecentGone keeps stopped and dead nodes listed this long after they left.
	statusPageRecentGone = time.Hour
	// Caps that keep one page view cheap on a large cluster.
	statusPageMaxNodes     = 100
	statusPageMaxMeshes    = 100
	statusPagePeersPerMesh = 20
	// statusPageKeyLen is how much of a public key the page shows.
	statusPageKeyLen = 8
)

var statusPageTmpl = template.Must(template.New("status").Parse(statusPageHTML))

// statusPageData is everything the template shows, already formatted.
type statusPageData struct {
	GeneratedAt string
	Refresh     int
	// RefreshURL is where the page reloads to: "?token=..." when the token came in the query
	// (a browser can't add a header to a refresh), else empty (reload the same URL).
	RefreshURL string
	Replica    statusPageReplica
	DBError    string

	Nodes      []statusPageNode
	LiveNodes  int
	Sessions   int64
	Meshes     []statusPageMesh
	MeshTotal  int64
	Deliveries statusPageDeliveries
}

type statusPageReplica struct {
	NodeID, Region, Version, Uptime string
	ListenerUp, Draining            bool
	LocalSessions                   int
}

type statusPageNode struct {
	ID, Region, Version, Heartbeat, Uptime string
	State                                  string // live, silent, stopped, dead
	Sessions, Grace                        int64
	Self                                   bool
}

type statusPageMesh struct {
	Slug, Name                  string
	LiveSessions, GraceSessions int64
	LiveMembers, Members        int64
	Peers                       []statusPagePeer
	MorePeers                   int64
}

type statusPagePeer struct {
	Name, KeyPrefix, Node, Status, Source, Connected string
	InGrace                                          bool
}

type statusPageDeliveries struct {
	Pending, Pushed int64
	Oldest          string
}

// statusPage serves GET /status.
type statusPage struct {
	cfg      Config
	store    *store.Store
	nodeID   string
	started  time.Time
	hub      *hub
	listener func() bool // the LISTEN connection is up
	draining func() bool
	log      *slog.Logger
	refusals *sampledLog // wrong tokens: sampled, a client can send them at will
}

func (s *statusPage) handleStatusPage(w http.ResponseWriter, r *http.Request) {
	if s.cfg.AdminToken == "" {
		http.NotFound(w, r)
		return
	}
	tok, inQuery := adminTokenOf(r)
	if !tokenMatches(tok, s.cfg.AdminToken) {
		s.refusals.Info("status page refused: missing or wrong admin token", "source", clientSource(r, s.cfg.TrustedProxyHeader))
		w.Header().Set("WWW-Authenticate", `Bearer realm="claudemesh status"`)
		w.Header().Set("Cache-Control", "no-store")
		http.Error(w, "missing or wrong admin token (Authorization: Bearer <token>, or ?token=)", http.StatusUnauthorized)
		return
	}

	page := s.statusPageReplicaView()
	if inQuery {
		page.RefreshURL = "?token=" + url.QueryEscape(tok)
	}
	ctx, cancel := context.WithTimeout(r.Context(), statusPageTimeout)
	defer cancel()
	code := http.StatusOK
	if err := s.loadStatusPage(ctx, &page); err != nil {
		s.log.Warn("status page", "err", err)
		page.DBError = "The cluster view could not be read from Postgres; this replica's own state is below. See the replica's logs."
		code = http.StatusServiceUnavailable
	}

	var buf bytes.Buffer
	if err := statusPageTmpl.Execute(&buf, page); err != nil {
		s.log.Error("render status page", "err", err)
		http.Error(w, "could not render the status page", http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	// The URL may carry the token: never send it on as a Referer, never frame the page.
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
	w.WriteHeader(code)
	_, _ = w.Write(buf.Bytes())
}

// adminTokenOf returns the token from "Authorization: Bearer <token>", else from ?token=;
// inQuery says it came from the query.
func adminTokenOf(r *http.Request) (tok string, inQuery bool) {
	if v, ok := bearerToken(r); ok {
		return v, false
	}
	if v := r.URL.Query().Get("token"); v != "" {
		return v, true
	}
	return "", false
}

// bearerToken returns the token of "Authorization: Bearer <token>"; the scheme's case does not
// matter (RFC 9110, 11.1).
func bearerToken(r *http.Request) (string, bool) {
	if scheme, v, ok := strings.Cut(r.Header.Get("Authorization"), " "); ok && strings.EqualFold(scheme, "Bearer") {
		return strings.TrimSpace(v), true
	}
	return "", false
}

// tokenMatches compares a secret token (admin, metrics, hook) in constant time; hashing first
// hides its length too.
func tokenMatches(got, want string) bool {
	g, w := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(want))
	return got != "" && subtle.ConstantTimeCompare(g[:], w[:]) == 1
}

// statusPageReplicaView is the part of the page this replica knows without the database.
func (s *statusPage) statusPageReplicaView() statusPageData {
	return statusPageData{
		GeneratedAt: time.Now().UTC().Format(time.RFC3339),
		Refresh:     int(statusPageRefresh.Seconds()),
		Replica: statusPageReplica{
			NodeID: s.nodeID, Region: s.cfg.Region, Version: Version,
			Uptime:     statusPageAge(time.Since(s.started).Seconds()),
			ListenerUp: s.listener(), Draining: s.draining(),
			LocalSessions: s.hub.len(),
		},
	}
}

// loadStatusPage reads the cluster view (one read-only snapshot, so the counts agree).
func (s *statusPage) loadStatusPage(ctx context.Context, page *statusPageData) error {
	v, err := s.store.StatusPage(ctx, store.StatusPageLimits{RecentGone: statusPageRecentGone,
		MaxNodes: statusPageMaxNodes, MaxMeshes: statusPageMaxMeshes, PerMesh: statusPagePeersPerMesh})
	if err != nil {
		return err
	}
	for _, n := range v.Nodes {
		sn := statusPageNode{ID: n.ID, Region: n.Region, Version: n.Version, Sessions: n.Sessions, Grace: n.GraceSessions,
			Heartbeat: statusPageAge(n.HeartbeatAgeSeconds) + " ago", Uptime: statusPageAge(time.Since(n.StartedAt).Seconds()),
			Self: n.ID == s.nodeID}
		switch {
		case n.Dead:
			sn.State = "dead"
		case n.Stopped:
			sn.State = "stopped"
		case n.HeartbeatAgeSeconds > s.cfg.NodeDeadAfter.Seconds():
			sn.State = "silent" // past the deadline, not yet declared dead by a peer
		default:
			sn.State = "live"
		}
		if sn.State == "live" || sn.State == "silent" {
			page.LiveNodes++
			page.Sessions += n.Sessions
		}
		page.Nodes = append(page.Nodes, sn)
	}
	page.MeshTotal = v.MeshTotal
	for _, m := range v.Meshes {
		pm := statusPageMesh{Slug: m.Slug, Name: m.Name, LiveSessions: m.LiveSessions,
			GraceSessions: m.GraceSessions, LiveMembers: m.LiveMembers, Members: m.Members}
		for _, p := range m.Peers {
			pm.Peers = append(pm.Peers, statusPagePeer{Name: p.DisplayName, KeyPrefix: statusPageKey(p.KeyPrefix),
				Node: p.NodeID, Status: p.Status, Source: p.StatusSource, InGrace: p.InGrace,
				Connected: statusPageAge(p.ConnectedSeconds)})
		}
		pm.MorePeers = max(pm.LiveSessions+pm.GraceSessions-int64(len(pm.Peers)), 0)
		page.Meshes = append(page.Meshes, pm)
	}
	page.Deliveries = statusPageDeliveries{Pending: v.Pending, Pushed: v.Pushed, Oldest: "—"}
	if v.Pending+v.Pushed > 0 {
		page.Deliveries.Oldest = statusPageAge(v.OldestPendingSeconds)
	}
	return nil
}

// statusPageKey cuts a key to its short prefix (the query already does; this is the backstop).
func statusPageKey(k string) string {
	if len(k) > statusPageKeyLen {
		k = k[:statusPageKeyLen]
	}
	return k
}

// statusPageAge formats seconds the way an operator reads them: 0.4s, 12s, 5m12s, 3h04m, 2d03h.
func statusPageAge(sec float64) string {
	if sec < 0 {
		sec = 0 // clocks of replica and database disagree by a little
	}
	switch d := time.Duration(sec * float64(time.Second)); {
	case d < 10*time.Second:
		return fmt.Sprintf("%.1fs", d.Truncate(100*time.Millisecond).Seconds())
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	default:
		return fmt.Sprintf("%dd%02dh", int(d.Hours())/24, int(d.Hours())%24)
	}
}

// statusPageHTML is the page: plain HTML and inline CSS, no script, no external asset (the
// Content-Security-Policy above forbids both).
const statusPageHTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="referrer" content="no-referrer">
<meta name="robots" content="noindex">
{{if .RefreshURL}}<meta http-equiv="refresh" content="{{.Refresh}}; url={{.RefreshURL}}">{{else}}<meta http-equiv="refresh" content="{{.Refresh}}">{{end}}
<title>claudemesh status · {{.Replica.NodeID}}</title>
<style>
:root { color-scheme: light dark; --fg: #1d232b; --muted: #66707c; --bg: #f6f7f9; --card: #fff; --line: #e1e4e8;
  --ok: #1a7f37; --okbg: #dafbe1; --warn: #9a6700; --warnbg: #fff8c5; --bad: #cf222e; --badbg: #ffebe9; --off: #57606a; --offbg: #eaeef2; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6edf3; --muted: #8d96a0; --bg: #0d1117; --card: #161b22; --line: #30363d;
  --ok: #3fb950; --okbg: #12261e; --warn: #d29922; --warnbg: #272115; --bad: #f85149; --badbg: #2d1214; --off: #8d96a0; --offbg: #21262d; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
h1 { font-size: 20px; margin: 0 0 2px; }
h2 { font-size: 15px; margin: 28px 0 8px; }
.sub, .muted { color: var(--muted); }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 18px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; min-width: 150px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 22px; font-weight: 600; margin-top: 2px; }
.card.wide { min-width: 280px; }
.card .big { font-weight: 600; }
.card dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 14px; margin: 6px 0 0; }
.card dt { color: var(--muted); } .card dd { margin: 0; }
table { border-collapse: collapse; width: 100%; background: var(--card); border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
th, td { text-align: left; padding: 7px 12px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; color: var(--muted); font-weight: 600; text-transform: uppercase; letter-spacing: .04em; }
tr:last-child td { border-bottom: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.self td:first-child { box-shadow: inset 3px 0 0 var(--ok); }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.live, .up, .idle { color: var(--ok); background: var(--okbg); }
.silent, .working, .grace, .draining { color: var(--warn); background: var(--warnbg); }
.dead, .down, .dnd { color: var(--bad); background: var(--badbg); }
.stopped { color: var(--off); background: var(--offbg); }
.peers { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: 4px 10px; }
.peers li { white-space: nowrap; }
.alert { margin-top: 18px; padding: 10px 14px; border-radius: 8px; border: 1px solid var(--bad); color: var(--bad); background: var(--badbg); }
footer { margin-top: 28px; color: var(--muted); font-size: 12px; }
</style>
</head>
<body>
<h1>claudemesh cluster status</h1>
<div class="sub">Served by <code id="self-node">{{.Replica.NodeID}}</code> at <time id="generated-at">{{.GeneratedAt}}</time> · refreshes every {{.Refresh}} s</div>
{{with .DBError}}<div class="alert" id="db-error">{{.}}</div>{{end}}

<div class="cards">
  <div class="card"><div class="k">Live nodes</div><div class="v" id="live-nodes">{{.LiveNodes}}</div></div>
  <div class="card"><div class="k">Live sessions</div><div class="v" id="live-sessions">{{.Sessions}}</div></div>
  <div class="card"><div class="k">Meshes with peers</div><div class="v" id="mesh-total">{{.MeshTotal}}</div></div>
  <div class="card wide" id="deliveries"><div class="k">Deliveries not yet acknowledged</div>
    <dl>
      <dt>pending</dt><dd><span class="big" id="deliveries-pending">{{.Deliveries.Pending}}</span> <span class="muted">waiting for the recipient</span></dd>
      <dt>pushed</dt><dd><span class="big" id="deliveries-pushed">{{.Deliveries.Pushed}}</span> <span class="muted">sent, awaiting client_ack</span></dd>
      <dt>oldest</dt><dd id="deliveries-oldest">{{.Deliveries.Oldest}}</dd>
    </dl>
  </div>
  <div class="card wide" id="replica"><div class="k">This replica</div>
    <dl>
      <dt>node</dt><dd><code>{{.Replica.NodeID}}</code>{{with .Replica.Region}} · {{.}}{{end}}</dd>
      <dt>listener</dt><dd>{{if .Replica.ListenerUp}}<span class="badge up" id="listener">up</span>{{else}}<span class="badge down" id="listener">down</span>{{end}}{{if .Replica.Draining}} <span class="badge draining">draining</span>{{end}}</dd>
      <dt>sessions</dt><dd>{{.Replica.LocalSessions}} local</dd>
      <dt>version</dt><dd><code>{{.Replica.Version}}</code> · up {{.Replica.Uptime}}</dd>
    </dl>
  </div>
</div>

<h2>Nodes</h2>
<table id="nodes">
<thead><tr><th>node</th><th>state</th><th>region</th><th>version</th><th class="num">heartbeat</th><th class="num">uptime</th><th class="num">sessions</th><th class="num">in grace</th></tr></thead>
<tbody>
{{range .Nodes}}<tr id="node-{{.ID}}"{{if .Self}} class="self"{{end}}>
  <td><code>{{.ID}}</code>{{if .Self}} <span class="muted">(this replica)</span>{{end}}</td>
  <td><span class="badge {{.State}}" data-field="state">{{.State}}</span></td>
  <td>{{.Region}}</td>
  <td><code>{{.Version}}</code></td>
  <td class="num" data-field="heartbeat">{{.Heartbeat}}</td>
  <td class="num">{{.Uptime}}</td>
  <td class="num" data-field="sessions">{{.Sessions}}</td>
  <td class="num" data-field="grace">{{.Grace}}</td>
</tr>
{{else}}<tr><td colspan="8" class="muted">No nodes registered.</td></tr>
{{end}}</tbody>
</table>

<h2>Meshes with live peers{{if gt .MeshTotal (len .Meshes)}} <span class="muted">(busiest {{len .Meshes}} of {{.MeshTotal}})</span>{{end}}</h2>
<table id="meshes">
<thead><tr><th>mesh</th><th class="num">live sessions</th><th class="num">in grace</th><th class="num">members online</th><th>peers</th></tr></thead>
<tbody>
{{range .Meshes}}<tr id="mesh-{{.Slug}}">
  <td><code>{{.Slug}}</code>{{if ne .Name .Slug}}<div class="muted">{{.Name}}</div>{{end}}</td>
  <td class="num" data-field="live">{{.LiveSessions}}</td>
  <td class="num" data-field="grace">{{.GraceSessions}}</td>
  <td class="num" data-field="members">{{.LiveMembers}} / {{.Members}}</td>
  <td><ul class="peers">{{range .Peers}}<li>{{.Name}} <code class="muted">{{.KeyPrefix}}…</code> {{if .InGrace}}<span class="badge grace">grace</span>{{else}}<span class="badge {{.Status}}" title="source: {{.Source}}">{{.Status}}</span>{{end}} <span class="muted">on <code>{{.Node}}</code> · {{.Connected}}</span></li>{{end}}{{if .MorePeers}}<li class="muted">and {{.MorePeers}} more</li>{{end}}</ul></td>
</tr>
{{else}}<tr><td colspan="5" class="muted">No live peers.</td></tr>
{{end}}</tbody>
</table>

<footer>Read-only. Counts come from Postgres in one snapshot; sessions in their reconnect grace are counted apart. Keys are shown as prefixes; message content is never read.</footer>
</body>
</html>
`
