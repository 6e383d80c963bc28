package deploy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"go.yaml.in/yaml/v3"

	"github.com/claudemesh/broker/broker"
)

// The ldflag that stamps the version: the Makefile and the Dockerfile must both use it, and
// broker.Version must exist for it to do anything (referenced below so a rename breaks the build).
const versionLDFlag = "-X github.com/claudemesh/broker/broker.Version="

var _ = broker.Version

// ---------------------------------------------------------------------------------------------
// Broker configuration: which environment variables the broker reads, and what they resolve to.

// knownEnvVars returns every environment variable broker.LoadConfig reads.
func knownEnvVars(t *testing.T) map[string]bool {
	t.Helper()
	seen := map[string]bool{}
	if _, err := broker.LoadConfig(func(k string) string { seen[k] = true; return "" }); err != nil {
		t.Fatalf("LoadConfig with an empty environment: %v", err)
	}
	if len(seen) < 10 || !seen["DATABASE_URL"] || !seen["BROKER_NODE_ID"] {
		t.Fatalf("LoadConfig read only %v: the env var probe no longer works", seen)
	}
	return seen
}

// brokerConfig checks that every variable in env is one the broker reads, and returns the
// configuration a replica started with env would run with.
func brokerConfig(t *testing.T, where string, env map[string]string) broker.Config {
	t.Helper()
	known := knownEnvVars(t)
	for k := range env {
		if !known[k] {
			t.Errorf("%s sets %s, which the broker does not read (typo?)", where, k)
		}
	}
	cfg, err := broker.LoadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatalf("%s: the broker refuses this environment: %v", where, err)
	}
	return cfg
}

// ---------------------------------------------------------------------------------------------
// compose.yaml

type composeFile struct {
	Name     string                    `yaml:"name"`
	Services map[string]composeService `yaml:"services"`
	Volumes  map[string]any            `yaml:"volumes"`
	// Extension fields (x-...) that hold the YAML anchors.
	Extensions map[string]any `yaml:",inline"`
}

type composeService struct {
	Image           string                      `yaml:"image"`
	Build           *composeBuild               `yaml:"build"`
	Command         []string                    `yaml:"command"`
	Environment     map[string]string           `yaml:"environment"`
	Ports           []string                    `yaml:"ports"`
	Volumes         []string                    `yaml:"volumes"`
	DependsOn       map[string]composeDependsOn `yaml:"depends_on"`
	Healthcheck     *composeHealthcheck         `yaml:"healthcheck"`
	StopGracePeriod string                      `yaml:"stop_grace_period"`
	Restart         string                      `yaml:"restart"`
	Ulimits         map[string]any              `yaml:"ulimits"`
}

type composeBuild struct {
	Context    string            `yaml:"context"`
	Dockerfile string            `yaml:"dockerfile"`
	Args       map[string]string `yaml:"args"`
}

type composeDependsOn struct {
	Condition string `yaml:"condition"`
}

type composeHealthcheck struct {
	Test        []string `yaml:"test"`
	Interval    string   `yaml:"interval"`
	Timeout     string   `yaml:"timeout"`
	StartPeriod string   `yaml:"start_period"`
	Retries     int      `yaml:"retries"`
}

// loadCompose parses compose.yaml strictly: a misspelt key is an error, not a silent default.
func loadCompose(t *testing.T) composeFile {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(readFile(t, "compose.yaml")))
	dec.KnownFields(true)
	var c composeFile
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("compose.yaml does not parse: %v", err)
	}
	for k := range c.Extensions {
		if !strings.HasPrefix(k, "x-") {
			t.Errorf("compose.yaml: unknown top-level key %q", k)
		}
	}
	return c
}

// portMapping is one "[ip:]host:container" entry of a service's ports.
type portMapping struct {
	IP        string
	Host      int
	Container int
}

func parsePort(t *testing.T, s string) portMapping {
	t.Helper()
	parts := strings.Split(s, ":")
	var pm portMapping
	var err1, err2 error
	switch len(parts) {
	case 2:
		pm.Host, err1 = strconv.Atoi(parts[0])
		pm.Container, err2 = strconv.Atoi(parts[1])
	case 3:
		pm.IP = parts[0]
		pm.Host, err1 = strconv.Atoi(parts[1])
		pm.Container, err2 = strconv.Atoi(parts[2])
		if net.ParseIP(pm.IP) == nil {
			t.Errorf("port %q: %q is not an IP address", s, pm.IP)
		}
	default:
		t.Fatalf("port %q: want [ip:]host:container", s)
	}
	if err1 != nil || err2 != nil {
		t.Fatalf("port %q: not numeric", s)
	}
	return pm
}

// replicas returns the names of the services that run `broker serve`, sorted.
func replicas(c composeFile) []string {
	var names []string
	for name, s := range c.Services {
		if len(s.Command) > 0 && s.Command[0] == "serve" {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}

func TestComposeServices(t *testing.T) {
	c := loadCompose(t)
	for _, name := range []string{"postgres", "migrate", "haproxy", "broker-1", "broker-2", "broker-3"} {
		if _, ok := c.Services[name]; !ok {
			t.Errorf("compose.yaml: service %q is missing", name)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// Postgres 15, healthy before anything uses it.
	pg := c.Services["postgres"]
	if !strings.HasPrefix(pg.Image, "postgres:15") {
		t.Errorf("postgres image is %q, want postgres:15", pg.Image)
	}
	if pg.Healthcheck == nil || !strings.Contains(strings.Join(pg.Healthcheck.Test, " "), "pg_isready") {
		t.Errorf("postgres needs a pg_isready healthcheck, has %+v", pg.Healthcheck)
	}
	pgURL := func(where, raw string) {
		u, err := url.Parse(raw)
		if err != nil {
			t.Errorf("%s: DATABASE_URL %q: %v", where, raw, err)
			return
		}
		pw, _ := u.User.Password()
		switch {
		case u.Hostname() != "postgres":
			t.Errorf("%s: DATABASE_URL host %q is not the postgres service", where, u.Hostname())
		case u.User.Username() != pg.Environment["POSTGRES_USER"] || pw != pg.Environment["POSTGRES_PASSWORD"]:
			t.Errorf("%s: DATABASE_URL credentials do not match the postgres service's", where)
		case strings.TrimPrefix(u.Path, "/") != pg.Environment["POSTGRES_DB"]:
			t.Errorf("%s: DATABASE_URL database %q is not POSTGRES_DB %q", where, u.Path, pg.Environment["POSTGRES_DB"])
		}
	}

	// The one-shot migration.
	mig := c.Services["migrate"]
	if !slices.Equal(mig.Command, []string{"migrate", "up"}) {
		t.Errorf("migrate runs %q, want [migrate up]", mig.Command)
	}
	if mig.Restart != "no" {
		t.Errorf("migrate has restart %q: a one-shot job must not restart", mig.Restart)
	}
	if mig.DependsOn["postgres"].Condition != "service_healthy" {
		t.Errorf("migrate must wait for postgres to be healthy, has %+v", mig.DependsOn)
	}
	brokerConfig(t, "service migrate", mig.Environment)
	pgURL("service migrate", mig.Environment["DATABASE_URL"])

	names := replicas(c)
	if !slices.Equal(names, []string{"broker-1", "broker-2", "broker-3"}) {
		t.Fatalf("services running `serve`: %v, want broker-1..3", names)
	}
	nodeIDs := map[string]string{}
	hostPorts := map[int]string{}
	for _, name := range names {
		s := c.Services[name]
		where := "service " + name
		if !slices.Equal(s.Command, []string{"serve", "--no-migrate"}) {
			t.Errorf("%s runs %q, want [serve --no-migrate] (the migrate service migrates)", where, s.Command)
		}
		if s.Image != mig.Image || s.Build == nil || mig.Build == nil || !sameBuild(s.Build, mig.Build) {
			t.Errorf("%s does not run the same image as migrate (%q vs %q)", where, s.Image, mig.Image)
		}
		if s.Environment["DATABASE_URL"] == "" {
			t.Errorf("%s has no DATABASE_URL (it would start an embedded Postgres of its own)", where)
		}
		if s.Environment["DATABASE_URL"] != mig.Environment["DATABASE_URL"] {
			t.Errorf("%s and migrate use different databases", where)
		}
		pgURL(where, s.Environment["DATABASE_URL"])
		cfg := brokerConfig(t, where, s.Environment)

		id := s.Environment["BROKER_NODE_ID"]
		switch {
		case id == "":
			t.Errorf("%s has no BROKER_NODE_ID", where)
		case nodeIDs[id] != "":
			t.Errorf("%s and %s share BROKER_NODE_ID %q", where, nodeIDs[id], id)
		default:
			nodeIDs[id] = name
		}
		if cfg.NodeID != id {
			t.Errorf("%s: broker reads node id %q, want %q", where, cfg.NodeID, id)
		}

		if s.DependsOn["migrate"].Condition != "service_completed_successfully" {
			t.Errorf("%s must start after migrate completed, has %+v", where, s.DependsOn)
		}
		if s.Healthcheck == nil {
			t.Errorf("%s has no healthcheck", where)
		} else {
			test := strings.Join(s.Healthcheck.Test, " ")
			if !strings.Contains(test, fmt.Sprintf(":%d/health", cfg.Port)) {
				t.Errorf("%s: healthcheck %q does not probe /health on port %d", where, test, cfg.Port)
			}
		}

		grace, err := time.ParseDuration(s.StopGracePeriod)
		if err != nil {
			t.Errorf("%s: stop_grace_period %q: %v", where, s.StopGracePeriod, err)
		} else if bound := cfg.DrainTimeout + broker.StopMargin; grace <= bound {
			t.Errorf("%s: stop_grace_period %s must exceed the drain deadline plus the stop margin %s, or Docker kills the drain", where, grace, bound)
		}

		for _, p := range s.Ports {
			pm := parsePort(t, p)
			if pm.Container != cfg.Port {
				t.Errorf("%s publishes container port %d, but the broker listens on %d", where, pm.Container, cfg.Port)
			}
			if other := hostPorts[pm.Host]; other != "" {
				t.Errorf("%s and %s both publish host port %d", where, other, pm.Host)
			}
			hostPorts[pm.Host] = name
		}
	}

	// The load balancer: HAProxy with our config, published on the broker's port.
	lb := c.Services["haproxy"]
	if !strings.HasPrefix(lb.Image, "haproxy:") {
		t.Errorf("load balancer image is %q, want haproxy:<version>", lb.Image)
	}
	if !slices.Contains(lb.Volumes, "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro") {
		t.Errorf("haproxy does not mount ./haproxy.cfg read-only at the image's config path: %v", lb.Volumes)
	}
	lbPorts := map[int]int{}
	for _, p := range lb.Ports {
		pm := parsePort(t, p)
		lbPorts[pm.Host] = pm.Container
		if other := hostPorts[pm.Host]; other != "" {
			t.Errorf("haproxy and %s both publish host port %d", other, pm.Host)
		}
	}
	if lbPorts[broker.DefaultPort] != broker.DefaultPort {
		t.Errorf("haproxy must publish host port %d to its frontend on %d, has %v", broker.DefaultPort, broker.DefaultPort, lb.Ports)
	}
	for _, name := range names {
		if _, ok := lb.DependsOn[name]; !ok {
			t.Errorf("haproxy does not depend on %s", name)
		}
	}

	hc := loadHAProxy(t)
	fe := hc.section("frontend", "")
	if fe == nil {
		t.Fatal("haproxy.cfg has no frontend")
	}
	if bind := fe.bindPort(t); lbPorts[broker.DefaultPort] != bind {
		t.Errorf("haproxy frontend binds %d, compose publishes %d:%d", bind, broker.DefaultPort, lbPorts[broker.DefaultPort])
	}
	be := hc.section("backend", fe.first("default_backend"))
	if be == nil {
		t.Fatalf("haproxy.cfg: the frontend's default_backend %q does not exist", fe.first("default_backend"))
	}
	var servers []string
	for _, srv := range be.all("server") {
		f := strings.Fields(srv)
		if len(f) < 2 {
			t.Fatalf("haproxy.cfg: malformed server line %q", srv)
		}
		host, port, err := net.SplitHostPort(f[1])
		if err != nil {
			t.Fatalf("haproxy.cfg: server %q: %v", srv, err)
		}
		servers = append(servers, host)
		s, ok := c.Services[host]
		if !ok {
			t.Errorf("haproxy.cfg: server %s points at %q, which is no compose service", f[0], host)
			continue
		}
		if want := strconv.Itoa(brokerConfig(t, "service "+host, s.Environment).Port); port != want {
			t.Errorf("haproxy.cfg: server %s uses port %s, the replica listens on %s", f[0], port, want)
		}
		if !slices.Contains(f[2:], "check") {
			t.Errorf("haproxy.cfg: server %s has no health check", f[0])
		}
	}
	slices.Sort(servers)
	if !slices.Equal(servers, names) {
		t.Errorf("haproxy.cfg backend %q serves %v, compose runs replicas %v", be.name, servers, names)
	}

	// Per-address limits key on each client, not on HAProxy: the replicas trust a header that
	// the frontend sets (replacing the client's own) to the client's address.
	for _, name := range names {
		h := brokerConfig(t, "service "+name, c.Services[name].Environment).TrustedProxyHeader
		if h == "" {
			t.Errorf("service %s sets no TRUSTED_PROXY_HEADER: every client would share HAProxy's address", name)
			continue
		}
		if !fe.has("http-request set-header " + h + " %[src]") {
			t.Errorf("service %s trusts %s, which the haproxy frontend does not set to the client's address "+
				"(http-request set-header %s %%[src])", name, h, h)
		}
	}
}

func sameBuild(a, b *composeBuild) bool {
	if a.Context != b.Context || a.Dockerfile != b.Dockerfile || len(a.Args) != len(b.Args) {
		return false
	}
	for k, v := range a.Args {
		if b.Args[k] != v {
			return false
		}
	}
	return true
}

// The compose build points at this Dockerfile with the repository root as context.
func TestComposeBuildContext(t *testing.T) {
	c := loadCompose(t)
	b := c.Services["migrate"].Build
	if b == nil {
		t.Fatal("migrate has no build section")
	}
	ctxDir := filepath.Clean(b.Context) // relative to deploy/, where compose.yaml lives
	if _, err := os.Stat(filepath.Join(ctxDir, "go.mod")); err != nil {
		t.Errorf("build context %q is not the module root: %v", b.Context, err)
	}
	if _, err := os.Stat(filepath.Join(ctxDir, b.Dockerfile)); err != nil {
		t.Errorf("build dockerfile %q (relative to the context) does not exist: %v", b.Dockerfile, err)
	}
	if _, ok := b.Args["VERSION"]; !ok {
		t.Error("the compose build does not pass the VERSION build arg")
	}
}

// ---------------------------------------------------------------------------------------------
// haproxy.cfg

type haSection struct {
	kind, name string
	lines      []string // directives, comments and blank lines removed
}

func (s *haSection) all(keyword string) []string {
	var out []string
	for _, l := range s.lines {
		if f := strings.Fields(l); len(f) > 0 && f[0] == keyword {
			out = append(out, strings.TrimSpace(strings.TrimPrefix(l, keyword)))
		}
	}
	return out
}

func (s *haSection) first(keyword string) string {
	if v := s.all(keyword); len(v) > 0 {
		return v[0]
	}
	return ""
}

func (s *haSection) has(line string) bool {
	want := strings.Fields(line)
	for _, l := range s.lines {
		if slices.Equal(strings.Fields(l), want) {
			return true
		}
	}
	return false
}

func (s *haSection) bindPort(t *testing.T) int {
	t.Helper()
	b := strings.Fields(s.first("bind"))
	if len(b) == 0 {
		t.Fatalf("haproxy.cfg: %s %s has no bind", s.kind, s.name)
	}
	_, port, err := net.SplitHostPort(b[0])
	if err != nil {
		t.Fatalf("haproxy.cfg: bind %q: %v", b[0], err)
	}
	n, err := strconv.Atoi(port)
	if err != nil {
		t.Fatalf("haproxy.cfg: bind %q: %v", b[0], err)
	}
	return n
}

type haConfig []*haSection

// section returns the first section of that kind (and name, when not empty).
func (c haConfig) section(kind, name string) *haSection {
	for _, s := range c {
		if s.kind == kind && (name == "" || s.name == name) {
			return s
		}
	}
	return nil
}

var haSectionKinds = []string{"global", "defaults", "frontend", "backend", "listen", "resolvers", "peers", "userlist", "mailers", "cache", "program", "http-errors", "ring"}

func loadHAProxy(t *testing.T) haConfig {
	t.Helper()
	var cfg haConfig
	sc := bufio.NewScanner(bytes.NewReader(readFile(t, "haproxy.cfg")))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.Index(line, "#"); i >= 0 {
			line = line[:i]
		}
		if strings.TrimSpace(line) == "" {
			continue
		}
		f := strings.Fields(line)
		if line[0] != ' ' && line[0] != '\t' {
			if !slices.Contains(haSectionKinds, f[0]) {
				t.Fatalf("haproxy.cfg:%d: %q is not a section keyword (directives must be indented)", n, f[0])
			}
			s := &haSection{kind: f[0]}
			if len(f) > 1 {
				s.name = f[1]
			}
			cfg = append(cfg, s)
			continue
		}
		if len(cfg) == 0 {
			t.Fatalf("haproxy.cfg:%d: directive outside any section", n)
		}
		cfg[len(cfg)-1].lines = append(cfg[len(cfg)-1].lines, strings.TrimSpace(line))
	}
	return cfg
}

// haTime parses an HAProxy time value (default unit: milliseconds).
func haTime(t *testing.T, v string) time.Duration {
	t.Helper()
	m := regexp.MustCompile(`^(\d+)(us|ms|s|m|h|d)?$`).FindStringSubmatch(v)
	if m == nil {
		t.Fatalf("haproxy.cfg: %q is not a time", v)
	}
	n, _ := strconv.Atoi(m[1])
	unit := map[string]time.Duration{"": time.Millisecond, "us": time.Microsecond, "ms": time.Millisecond,
		"s": time.Second, "m": time.Minute, "h": time.Hour, "d": 24 * time.Hour}[m[2]]
	return time.Duration(n) * unit
}

func TestHAProxyConfig(t *testing.T) {
	cfg := loadHAProxy(t)
	def := cfg.section("defaults", "")
	if def == nil || !def.has("mode http") {
		t.Fatal("haproxy.cfg needs a defaults section in mode http (WebSocket upgrades are HTTP)")
	}
	timeouts := map[string]time.Duration{}
	for _, v := range def.all("timeout") {
		f := strings.Fields(v)
		if len(f) != 2 {
			t.Fatalf("haproxy.cfg: malformed timeout %q", v)
		}
		timeouts[f[0]] = haTime(t, f[1])
	}
	// The broker pings every 30 s; idle tunnels must outlive that by far, and the HTTP-phase
	// timeouts must not be shorter than a ping interval either.
	if timeouts["tunnel"] < time.Hour {
		t.Errorf("timeout tunnel is %s: WebSockets need a long tunnel timeout (1h)", timeouts["tunnel"])
	}
	for _, k := range []string{"connect", "client", "server"} {
		if timeouts[k] == 0 {
			t.Errorf("timeout %s is unset (HAProxy warns and never times out)", k)
		}
	}
	if timeouts["client"] < 30*time.Second || timeouts["server"] < 30*time.Second {
		t.Errorf("timeout client/server (%s/%s) must exceed the broker's 30 s ping interval", timeouts["client"], timeouts["server"])
	}

	fe := cfg.section("frontend", "")
	if fe == nil {
		t.Fatal("haproxy.cfg has no frontend")
	}
	be := cfg.section("backend", fe.first("default_backend"))
	if be == nil {
		t.Fatal("no backend for the frontend")
	}
	if got := be.first("balance"); got != "roundrobin" {
		t.Errorf("backend balance is %q, want roundrobin", got)
	}
	for _, l := range append(slices.Clone(be.lines), def.lines...) {
		f := strings.Fields(l)
		if f[0] == "cookie" || strings.HasPrefix(f[0], "stick") || f[0] == "hash-type" ||
			(f[0] == "balance" && f[1] != "roundrobin") {
			t.Errorf("haproxy.cfg: %q makes sessions sticky; replicas are interchangeable", l)
		}
	}
	if !be.has("option httpchk") {
		t.Error("backend has no `option httpchk`: draining replicas would stay in rotation")
	}
	if send := be.all("http-check"); !slices.ContainsFunc(send, func(l string) bool {
		f := strings.Fields(l)
		return len(f) > 0 && f[0] == "send" && slices.Contains(f, "/health")
	}) {
		t.Errorf("backend health checks do not send GET /health: %q", send)
	}
	if !be.has("http-check expect status 200") {
		t.Error("backend health check must expect 200 (the broker answers 503 while draining or degraded)")
	}
	for _, srv := range be.all("server") {
		if strings.Contains(srv, "shutdown-sessions") || strings.Contains(be.first("default-server"), "shutdown-sessions") {
			t.Errorf("server %q: on-marked-down shutdown-sessions would cut WebSockets the broker drains itself", srv)
		}
	}
}

// When an HAProxy binary is on PATH, it checks the file too (`haproxy -c`).
func TestHAProxyConfigCheck(t *testing.T) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Skip("no haproxy binary on PATH; TestHAProxyConfig's parse is the check here")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "-c", "-f", "haproxy.cfg").CombinedOutput()
	if err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
}

// When the Docker Compose plugin is installed, `docker compose config` validates the file
// against the compose specification (client side: no Docker engine needed).
func TestComposeConfigWithDocker(t *testing.T) {
	if _, err := exec.LookPath("docker"); err != nil {
		t.Skip("no docker CLI; TestComposeServices's parse is the check here")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "docker", "compose", "version").CombinedOutput(); err != nil {
		t.Skipf("docker CLI without the compose plugin (%v: %s); TestComposeServices's parse is the check here",
			err, bytes.TrimSpace(out))
	}
	out, err := exec.CommandContext(ctx, "docker", "compose", "-f", "compose.yaml", "config", "-q").CombinedOutput()
	if err != nil {
		t.Fatalf("docker compose config: %v\n%s", err, out)
	}
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

type dockerInstr struct {
	cmd  string // upper case
	args string
	line int
}

type dockerStage struct {
	from   string // the FROM arguments
	instrs []dockerInstr
}

func (s dockerStage) all(cmd string) []dockerInstr {
	var out []dockerInstr
	for _, in := range s.instrs {
		if in.cmd == cmd {
			out = append(out, in)
		}
	}
	return out
}

// loadDockerfile splits the Dockerfile into stages of instructions (continuations joined).
func loadDockerfile(t *testing.T) (global []dockerInstr, stages []dockerStage) {
	t.Helper()
	sc := bufio.NewScanner(bytes.NewReader(readFile(t, "Dockerfile")))
	var cur strings.Builder
	start := 0
	flush := func() {
		text := strings.TrimSpace(cur.String())
		cur.Reset()
		if text == "" {
			return
		}
		cmd, args, _ := strings.Cut(text, " ")
		in := dockerInstr{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args), line: start}
		if in.cmd == "FROM" {
			stages = append(stages, dockerStage{from: in.args})
			return
		}
		if len(stages) == 0 {
			global = append(global, in)
		} else {
			stages[len(stages)-1].instrs = append(stages[len(stages)-1].instrs, in)
		}
	}
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") {
			continue // comments (and the syntax directive), also inside continuations
		}
		if cur.Len() == 0 {
			if trimmed == "" {
				continue
			}
			start = n
		}
		if body, ok := strings.CutSuffix(strings.TrimRight(line, " \t"), "\\"); ok {
			cur.WriteString(body + " ")
			continue
		}
		cur.WriteString(line)
		flush()
	}
	flush()
	return global, stages
}

func TestDockerfile(t *testing.T) {
	global, stages := loadDockerfile(t)
	if len(stages) < 2 {
		t.Fatalf("Dockerfile has %d stage(s), want a multi-stage build", len(stages))
	}
	for _, in := range global {
		if in.cmd != "ARG" {
			t.Errorf("Dockerfile:%d: %s before the first FROM", in.line, in.cmd)
		}
	}
	build, final := stages[0], stages[len(stages)-1]

	// Builder: a static binary of ./cmd/broker with the version stamped in.
	if !strings.Contains(build.from, "golang:") {
		t.Errorf("build stage is FROM %q, want a golang image", build.from)
	}
	buildText := ""
	for _, in := range build.instrs {
		buildText += in.cmd + " " + in.args + "\n"
	}
	for _, want := range []string{"CGO_ENABLED=0", "go build", "./cmd/broker", versionLDFlag + "${VERSION}", "ARG VERSION"} {
		if !strings.Contains(buildText, want) {
			t.Errorf("build stage lacks %q", want)
		}
	}
	makefile := string(readFile(t, "../Makefile"))
	if !strings.Contains(makefile, versionLDFlag) {
		t.Errorf("the Makefile no longer stamps the version with %q: update the Dockerfile with it", versionLDFlag)
	}

	// Final stage: small, non-root, healthy, broker as the entrypoint.
	if strings.Contains(final.from, "golang") {
		t.Errorf("final stage is FROM %q: the runtime image must not carry the toolchain", final.from)
	}
	if !strings.Contains(final.from, "alpine") {
		// busybox wget is what the HEALTHCHECK below runs; distroless has no shell or wget.
		t.Errorf("final stage is FROM %q; the HEALTHCHECK relies on Alpine's busybox wget", final.from)
	}
	copied := false
	for _, in := range final.all("COPY") {
		if strings.Contains(in.args, "--from=") && strings.Contains(in.args, "broker") {
			copied = true
		}
	}
	if !copied {
		t.Error("final stage does not COPY the broker binary from the build stage")
	}

	users := final.all("USER")
	if len(users) == 0 {
		t.Fatal("final stage has no USER: the broker would run as root")
	}
	user, _, _ := strings.Cut(users[len(users)-1].args, ":")
	if user == "root" || user == "0" || user == "" {
		t.Errorf("final USER is %q, want an unprivileged user", users[len(users)-1].args)
	}

	exposed := false
	for _, in := range final.all("EXPOSE") {
		for _, p := range strings.Fields(in.args) {
			if strings.TrimSuffix(p, "/tcp") == strconv.Itoa(broker.DefaultPort) {
				exposed = true
			}
		}
	}
	if !exposed {
		t.Errorf("final stage does not EXPOSE %d", broker.DefaultPort)
	}

	hcs := final.all("HEALTHCHECK")
	if len(hcs) != 1 {
		t.Fatalf("final stage has %d HEALTHCHECK instructions, want 1", len(hcs))
	}
	if hc := hcs[0].args; !strings.Contains(hc, "CMD") || !strings.Contains(hc, "/health") {
		t.Errorf("HEALTHCHECK %q does not probe /health", hc)
	}

	env := map[string]string{}
	for _, in := range final.all("ENV") {
		for _, kv := range strings.Fields(in.args) {
			if k, v, ok := strings.Cut(kv, "="); ok {
				env[k] = strings.Trim(v, `"`)
			}
		}
	}
	if env["LOG_FORMAT"] != "json" {
		t.Errorf("the image's LOG_FORMAT is %q, want json", env["LOG_FORMAT"])
	}
	if port, ok := env["BROKER_PORT"]; ok && port != strconv.Itoa(broker.DefaultPort) {
		t.Errorf("the image sets BROKER_PORT=%s but EXPOSEs %d", port, broker.DefaultPort)
	}
	brokerConfig(t, "Dockerfile ENV", env)

	execForm := func(cmd string) []string {
		ins := final.all(cmd)
		if len(ins) == 0 {
			t.Fatalf("final stage has no %s", cmd)
		}
		var v []string
		if err := json.Unmarshal([]byte(ins[len(ins)-1].args), &v); err != nil {
			t.Fatalf("%s %s is not in exec (JSON) form, so signals would go to a shell: %v", cmd, ins[len(ins)-1].args, err)
		}
		return v
	}
	if ep := execForm("ENTRYPOINT"); len(ep) != 1 || filepath.Base(ep[0]) != "broker" {
		t.Errorf("ENTRYPOINT is %q, want the broker binary alone (so `migrate up` works as a release command)", ep)
	}
	if cmd := execForm("CMD"); !slices.Equal(cmd, []string{"serve"}) {
		t.Errorf("CMD is %q, want [serve]", cmd)
	}
	if sig := final.all("STOPSIGNAL"); len(sig) > 0 && sig[0].args != "SIGTERM" {
		t.Errorf("STOPSIGNAL is %s: the broker drains on SIGTERM", sig[0].args)
	}
}

// The build context is the repository root: .dockerignore keeps local state out and the sources in.
func TestDockerignore(t *testing.T) {
	data := readFile(t, "../.dockerignore")
	var patterns []string
	for _, l := range strings.Split(string(data), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			patterns = append(patterns, strings.TrimSuffix(l, "/"))
		}
	}
	for _, want := range []string{".git", "**/.broker-data", "bin"} {
		if !slices.Contains(patterns, want) {
			t.Errorf(".dockerignore does not exclude %s", want)
		}
	}
	// Files the build needs must not match any pattern.
	for _, need := range []string{"go.mod", "go.sum", "cmd/broker/main.go", "broker/config.go", "migrations/00001_schema.sql", "deploy/Dockerfile"} {
		if _, err := os.Stat(filepath.Join("..", need)); err != nil {
			continue // the tree changed; only check files that exist
		}
		for _, p := range patterns {
			if strings.HasPrefix(p, "!") {
				continue
			}
			if ignoreMatches(p, need) {
				t.Errorf(".dockerignore pattern %q excludes %s, which the build needs", p, need)
			}
		}
	}
}

// ignoreMatches approximates Docker's matching: a pattern matches a path or one of its parents;
// "**/" matches any number of leading directories.
func ignoreMatches(pattern, path string) bool {
	parts := strings.Split(path, "/")
	for i := 1; i <= len(parts); i++ {
		prefix := strings.Join(parts[:i], "/")
		if ok, _ := filepath.Match(pattern, prefix); ok {
			return true
		}
		if rest, ok := strings.CutPrefix(pattern, "**/"); ok {
			for j := 0; j < i; j++ {
				if ok, _ := filepath.Match(rest, strings.Join(parts[j:i], "/")); ok {
					return true
				}
			}
		}
	}
	return false
}

// ---------------------------------------------------------------------------------------------
// fly.toml

type flyConfig struct {
	App           string            `toml:"app"`
	PrimaryRegion string            `toml:"primary_region"`
	KillSignal    string            `toml:"kill_signal"`
	KillTimeout   any               `toml:"kill_timeout"` // seconds, or a duration string
	Build         flyBuild          `toml:"build"`
	Deploy        flyDeploy         `toml:"deploy"`
	Env           map[string]string `toml:"env"`
	Processes     map[string]string `toml:"processes"`
	HTTPService   *flyHTTPService   `toml:"http_service"`
	VM            []flyVM           `toml:"vm"`
}

type flyBuild struct {
	Dockerfile string `toml:"dockerfile"`
}

type flyDeploy struct {
	ReleaseCommand string `toml:"release_command"`
	Strategy       string `toml:"strategy"`
}

type flyHTTPService struct {
	InternalPort       int      `toml:"internal_port"`
	ForceHTTPS         bool     `toml:"force_https"`
	Processes          []string `toml:"processes"`
	AutoStopMachines   any      `toml:"auto_stop_machines"` // bool, or "off"/"stop"/"suspend"
	AutoStartMachines  bool     `toml:"auto_start_machines"`
	MinMachinesRunning int      `toml:"min_machines_running"`
	Concurrency        struct {
		Type      string `toml:"type"`
		SoftLimit int    `toml:"soft_limit"`
		HardLimit int    `toml:"hard_limit"`
	} `toml:"concurrency"`
	Checks []struct {
		GracePeriod string `toml:"grace_period"`
		Interval    string `toml:"interval"`
		Timeout     string `toml:"timeout"`
		Method      string `toml:"method"`
		Path        string `toml:"path"`
	} `toml:"checks"`
}

type flyVM struct {
	Size   string `toml:"size"`
	Memory string `toml:"memory"`
}

func TestFlyConfig(t *testing.T) {
	var fc flyConfig
	md, err := toml.Decode(string(readFile(t, "fly.toml")), &fc)
	if err != nil {
		t.Fatalf("fly.toml does not parse as TOML: %v", err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		t.Errorf("fly.toml has keys this test does not know (typo, or extend the test): %v", und)
	}

	if !regexp.MustCompile(`^[a-z0-9][a-z0-9-]*$`).MatchString(fc.App) {
		t.Errorf("app %q is not a valid Fly app name", fc.App)
	}
	if !regexp.MustCompile(`^[a-z]{3}$`).MatchString(fc.PrimaryRegion) {
		t.Errorf("primary_region %q is not a Fly region code", fc.PrimaryRegion)
	}

	cfg := brokerConfig(t, "fly.toml [env]", fc.Env)
	if cfg.TrustedProxyHeader != "Fly-Client-IP" {
		t.Errorf("TRUSTED_PROXY_HEADER is %q: Fly's proxy puts the client's address in Fly-Client-IP; without it every client "+
			"shares the proxy's address", cfg.TrustedProxyHeader)
	}
	if fc.KillSignal != "SIGTERM" {
		t.Errorf("kill_signal is %q: the broker drains on SIGTERM", fc.KillSignal)
	}
	var kill time.Duration
	switch v := fc.KillTimeout.(type) {
	case int64:
		kill = time.Duration(v) * time.Second
	case string:
		kill, err = time.ParseDuration(v)
		if err != nil {
			t.Errorf("kill_timeout %q: %v", v, err)
		}
	default:
		t.Errorf("kill_timeout is %v (%T), want seconds", v, v)
	}
	if bound := cfg.DrainTimeout + broker.StopMargin; kill <= bound {
		t.Errorf("kill_timeout %s does not exceed the drain deadline plus the stop margin %s: Fly would SIGKILL a draining replica", kill, bound)
	}

	// The Dockerfile path is relative to fly.toml; the build context is where `fly deploy` runs.
	if fc.Build.Dockerfile == "" {
		t.Error("[build] has no dockerfile")
	} else if _, err := os.Stat(fc.Build.Dockerfile); err != nil {
		t.Errorf("[build] dockerfile %q (relative to fly.toml) does not exist: %v", fc.Build.Dockerfile, err)
	}

	if fc.Deploy.ReleaseCommand != "migrate up" {
		t.Errorf("[deploy] release_command is %q, want \"migrate up\" (run by the image's broker entrypoint)", fc.Deploy.ReleaseCommand)
	}
	if fc.Deploy.Strategy != "rolling" {
		t.Errorf("[deploy] strategy is %q, want rolling (one replica drains at a time)", fc.Deploy.Strategy)
	}

	hs := fc.HTTPService
	if hs == nil {
		t.Fatal("fly.toml has no [http_service]")
	}
	if hs.InternalPort != cfg.Port || hs.InternalPort != broker.DefaultPort {
		t.Errorf("internal_port %d, broker port %d (default %d): they must agree", hs.InternalPort, cfg.Port, broker.DefaultPort)
	}
	for _, p := range hs.Processes {
		cmd, ok := fc.Processes[p]
		if !ok {
			t.Errorf("[http_service] serves process group %q, which [processes] does not define", p)
		} else if f := strings.Fields(cmd); len(f) == 0 || f[0] != "serve" {
			t.Errorf("process group %q runs %q, want `serve ...`", p, cmd)
		}
	}
	if len(fc.Processes) > 0 && len(hs.Processes) == 0 {
		t.Error("[processes] is set but [http_service] names none of its groups")
	}
	if v := hs.AutoStopMachines; v != false && v != "off" {
		t.Errorf("auto_stop_machines is %v: Fly would stop Machines holding long-lived WebSockets", v)
	}
	if hs.Concurrency.Type != "connections" {
		t.Errorf("concurrency type is %q, want connections (each WebSocket is one)", hs.Concurrency.Type)
	}
	if hs.Concurrency.SoftLimit <= 0 || hs.Concurrency.HardLimit < hs.Concurrency.SoftLimit {
		t.Errorf("concurrency limits soft %d / hard %d are not 0 < soft <= hard", hs.Concurrency.SoftLimit, hs.Concurrency.HardLimit)
	}
	health := false
	for _, c := range hs.Checks {
		if c.Path == "/health" && (c.Method == "" || strings.EqualFold(c.Method, "GET")) {
			health = true
			for _, d := range []string{c.GracePeriod, c.Interval, c.Timeout} {
				if _, err := time.ParseDuration(d); err != nil {
					t.Errorf("[[http_service.checks]] duration %q: %v", d, err)
				}
			}
		}
	}
	if !health {
		t.Error("[http_service] has no GET /health check: draining Machines would keep receiving peers")
	}
	for _, vm := range fc.VM {
		if vm.Size == "" && vm.Memory == "" {
			t.Error("[[vm]] sets neither size nor memory")
		}
	}
}

// ---------------------------------------------------------------------------------------------
// The command lines the files run exist in the broker binary (built here, never run against a
// database: only argument parsing via --help).

func TestCommandLinesParse(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the broker binary")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command on PATH")
	}
	bin := filepath.Join(t.TempDir(), "broker")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	build := exec.CommandContext(ctx, goBin, "build", "-o", bin, "../cmd/broker")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/broker: %v\n%s", err, out)
	}

	lines := map[string][]string{}
	c := loadCompose(t)
	for name, s := range c.Services {
		if len(s.Command) > 0 && (s.Image == c.Services["migrate"].Image) {
			lines["compose service "+name] = s.Command
		}
	}
	var fc flyConfig
	if _, err := toml.Decode(string(readFile(t, "fly.toml")), &fc); err != nil {
		t.Fatal(err)
	}
	lines["fly release_command"] = strings.Fields(fc.Deploy.ReleaseCommand)
	for g, cmd := range fc.Processes {
		lines["fly process "+g] = strings.Fields(cmd)
	}
	lines["Dockerfile CMD"] = []string{"serve"}
	// Commands that README.md and docs/operations.md tell operators to run.
	lines["README broker dev"] = []string{"dev", "--replicas", "3"}
	lines["operations audit verify"] = []string{"audit", "verify", "--mesh", "SLUG", "--json"}
	lines["operations audit tail"] = []string{"audit", "tail", "--mesh", "SLUG", "-n", "1"}
	lines["operations mesh list"] = []string{"mesh", "list", "--json"}

	for where, args := range lines {
		cmd := exec.CommandContext(ctx, bin, append(slices.Clone(args), "--help")...)
		cmd.Env = append(os.Environ(), "DATABASE_URL=") // never reach a database
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("%s: `broker %s` is not a valid command line: %v\n%s", where, strings.Join(args, " "), err, out)
			continue
		}
		// An unknown subcommand of a command group prints the group's help without an error:
		// the usage line must name the whole verb path.
		var verbs []string
		for _, a := range args {
			if strings.HasPrefix(a, "-") {
				break // flags (and their values) follow the verbs
			}
			verbs = append(verbs, a)
		}
		if usage := "broker " + strings.Join(verbs, " ") + " [flags]"; !bytes.Contains(out, []byte(usage)) {
			t.Errorf("%s: `broker %s --help` is not the help of %q:\n%s", where, strings.Join(args, " "), usage, out)
		}
	}
}

// ---------------------------------------------------------------------------------------------

func readFile(t *testing.T, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(name)
	if err != nil {
		t.Fatalf("read %s: %v", name, err)
	}
	return data
}
