package broker

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/claudemesh/broker/db"
)

// Defaults for every setting; a zero field in Config means its default.
const (
	DefaultPort                 = 7900
	DefaultStatusTTL            = 60 * time.Second
	DefaultHookFreshWindow      = 30 * time.Second
	DefaultMaxConnectionsPerMsh = 100
	DefaultMaxMessageBytes      = 65536
	DefaultHookRateLimitPerMin  = 30
	DefaultSessionGrace         = 90 * time.Second
	DefaultDataDir              = ".broker-data"
	DefaultNodeDeadAfter        = 10 * time.Second
	DefaultHeartbeatInterval    = 2 * time.Second
	DefaultDrainTimeout         = 25 * time.Second
	// Limits on what clients can make a replica hold (docs/operations.md, "Security model").
	DefaultHelloTimeout = 10 * time.Second
	DefaultStallTimeout = 5 * time.Second
	// One hello statement at a time, of up to 64 hellos: concurrent ones only queue for the same
	// locks (Postgres's notification queue at commit, the meshes'), in smaller batches. On 2
	// cores, 10,000 sessions connected at 2,233-3,046 hellos/s (13 runs) with one, against
	// 1,977-2,338 with four of 16 (BENCHMARKS.md); a replica far from the primary registers as
	// many per round trip (64) as four of 16 did. Hellos stuck behind their mesh's lock fail
	// after a second (migration 00035), so they hold up the replica's others for a second, not
	// for the statement's 5 s timeout.
	DefaultHelloConcurrency     = 1
	DefaultCommitters           = 1
	DefaultMaxUnauthenticated   = 2048
	DefaultMaxUnauthPerSource   = 256
	DefaultMaxStateKeysPerMesh  = 1024
	DefaultMaxStateBytesPerMesh = 1 << 20
	DefaultMaxStateValueBytes   = 32 << 10
	DefaultMaxGroupsPerSession  = 64
	// What may wait for one member (stored, not yet delivered): at the default envelope limit
	// about 640 MiB, at a typical envelope of 1-2 KB 10-20 MB; a Claude Code session away for
	// a day receives far fewer, a member flooding another's inbox stops here.
	DefaultMaxPendingPerMember  = 10_000
	DefaultHookRatePerCallerMin = 600
	// Hook requests from one client address (an IPv6 /64) per minute, checked before anything
	// else: room for a hundred busy hook scripts behind one NAT, far below what would keep a
	// replica verifying signatures.
	DefaultHookRatePerSourceMin = 1200
	// Hook statements in the database at once, per replica: a quarter of the default pool, so
	// hooks never hold the connections sends and hellos need. At ~1 ms a statement that is
	// thousands of hooks a second; a far region's round trip divides it (100 ms: 40/s).
	DefaultHookConcurrency = 4
	// Joins from one client address (an IPv6 /64) per minute, and their burst: a join is a
	// person accepting an invite, so a team behind one NAT joins together while a flood of
	// self-signed invites gets one transaction a second.
	DefaultJoinRatePerSourceMin   = 60
	DefaultHelloRatePerSessionMin = 60
	// A member's hellos per minute on one replica, whatever their session ids, and their
	// burst: room for 600 sessions of one member coming back at once after a failover.
	DefaultHelloRatePerMemberMin = 600
	// A member's sends per second on one replica, and the burst above that rate: generous
	// (a Claude Code session sends a few a minute), a cap on a runaway or hostile client.
	DefaultSendRatePerMember  = 500
	DefaultSendBurstPerMember = 1000
	// A member's other requests per second on one replica, and the bursts above: writes
	// (set_state, set_status, set_summary, join_group, leave_group, kick, ban, unban) each
	// commit with a NOTIFY to every replica, take the cluster-wide notification lock and most
	// append an audit entry; a Claude Code session makes a few a minute, tens when it starts.
	// Reads (list_peers, get_state, list_state, message_status, list_bans) write nothing, but
	// a list_state may answer a megabyte: looser, still bounded.
	DefaultWriteRatePerMember  = 20
	DefaultWriteBurstPerMember = 200
	DefaultReadRatePerMember   = 20
	DefaultReadBurstPerMember  = 100
	// envelopeHeadroom is what a send frame holds besides its envelope (type, ids, priority,
	// fingerprint): the default envelope limit leaves it, so an envelope over the limit is
	// still read and refused with too_large instead of closing the socket (1009).
	envelopeHeadroom = 1024
)

// Config is everything a replica is told from outside. Load reads it from the environment;
// tests build it directly.
type Config struct {
	Port            int
	DatabaseURL     string // empty: start the embedded Postgres in DataDir
	StatusTTL       time.Duration
	HookFreshWindow time.Duration
	MaxConnsPerMesh int
	MaxMessageBytes int
	HookRatePerMin  int
	SessionGrace    time.Duration
	DataDir         string
	LogLevel        slog.Level
	LogFormat       string // "text" or "json"
	HookToken       string // when set, /hook/set-status requires it
	AdminToken      string // when set, /status is served behind it
	NodeID          string // empty: generated at start
	Region          string // FLY_REGION when unset
	NodeDeadAfter   time.Duration
	Heartbeat       time.Duration
	DrainTimeout    time.Duration
	// AllowedOrigins lists Origin values accepted on /ws besides same-host; "*" allows all.
	// Non-browser peers send no Origin and are always accepted.
	AllowedOrigins []string
	// MessageTTL is how long an envelope waits for its recipients before it expires.
	MessageTTL time.Duration
	// BusNamespace prefixes the LISTEN channel names (default "claudemesh").
	BusNamespace string
	// MaxBatch caps the sends per commit (default 512). 1 turns group commit off: one
	// notifying commit per message, the baseline the benchmarks compare against.
	MaxBatch int
	// Host is the listen address's host ("" all interfaces). On loopback only, the unsigned
	// April-client hooks are accepted without HookAllowUnsigned: only local processes reach it
	// (unless TrustedProxyHeader says a proxy is in front).
	Host string
	// HelloTimeout is how long a socket may stay open without a successful hello.
	HelloTimeout time.Duration
	// MaxUnauthenticated and MaxUnauthPerSource bound sockets that have not said hello yet,
	// per replica and per client address.
	MaxUnauthenticated int
	MaxUnauthPerSource int
	// TrustedProxyHeader names the header a trusted proxy puts the client address in
	// (Fly-Client-IP, X-Forwarded-For); unset, limits key on the TCP peer address.
	TrustedProxyHeader string
	// Shared-state quotas per mesh, and groups per session.
	MaxStateKeysPerMesh  int
	MaxStateBytesPerMesh int
	MaxStateValueBytes   int
	MaxGroupsPerSession  int
	// MaxPendingPerMember bounds what waits for one member: a send that would add to it (no
	// session takes it now) is refused recipient_full once the sweep finds it at the bound.
	MaxPendingPerMember int
	// HookAllowUnsigned accepts the April clients' unsigned pid/cwd hook requests (see
	// docs/operations.md for what that trusts).
	HookAllowUnsigned bool
	// HookRatePerCallerMin bounds hook requests per proven caller per minute: the member key of
	// a signed hook, the client address of an unsigned one.
	HookRatePerCallerMin int
	// HookRatePerSourceMin bounds hook requests per client address (an IPv6 /64) per minute,
	// signed or not, before the body is read.
	HookRatePerSourceMin int
	// HookConcurrency bounds the hook statements a replica runs at once; a hook waits up to a
	// second for one, else is refused 503 (retryable).
	HookConcurrency int
	// JoinRatePerSourceMin bounds POST /join requests per client address (an IPv6 /64) per
	// minute, before the body is read.
	JoinRatePerSourceMin int
	// HelloRatePerSessionMin bounds one session's verified hellos per minute on this replica
	// (by member key and session id), before any database work.
	HelloRatePerSessionMin int
	// HelloRatePerMemberMin bounds one member's verified hellos per minute on this replica,
	// whatever their session ids (a fresh id per hello would dodge the per-session bound).
	HelloRatePerMemberMin int
	// MetricsToken, when set, is required as a bearer token on /metrics. MetricsAddr, when
	// set, serves /metrics on that address instead of the main port.
	MetricsToken string
	MetricsAddr  string
	// StallTimeout is how long a session's push window may stay full without a write before
	// its peer counts as not reading and is closed with 4008 (default 5 s; tests shorten it).
	StallTimeout time.Duration

	// Committers is how many group-commit lanes a replica runs (default 1), each with at most
	// one send statement in flight; a sender's sends always use one lane. Lanes share one
	// statement while traffic is light and commit side by side only once a lane has 64 sends
	// waiting or its sends have waited 5 ms (committer.go). On 2 cores shared with
	// the load generator one lane is best (saturation 11.1-11.6k msgs/s against 10.3-10.8k
	// with two); with idle cores at the primary two raise the ceiling (Go benchmark: 14.6-15.5k
	// against 16.2-17.2k).
	Committers int

	// NotifyAfterCommit sends a send batch's notifications from a second transaction right
	// after its commit (migration 00033) instead of from inside it. Postgres lets one notifying
	// transaction commit at a time, through its WAL flush: where the primary's flush is slow
	// (a network volume: 1-3 ms) sends take turns at the disk, and this lets them share
	// flushes (at 1,000 msgs/s with the flush 2 ms slower, send→push p50 12 → 8 ms). Off by
	// default: on a local disk the second transaction costs more than the wait it saves (p50
	// 1.1 → 1.2-1.4 ms, p99 9-10 → 10-12 ms, saturation 5-9 % lower on 2 cores).
	NotifyAfterCommit bool
	// PushBeforeFlush commits a send batch without waiting for its WAL flush, so the other
	// replicas push it at once, and acknowledges it once a second transaction in the same
	// round trip has confirmed the flush; the replica's next batch may commit meanwhile. For a
	// primary whose flush is slow (a network volume): with the flush 2 ms slower, at 1,000
	// msgs/s on 2 cores, send→push p50 2.3 ms against 12.3 (8.0 with NotifyAfterCommit),
	// p99 19 against 27, send→ack p50 6.5 against 12.4. Off by default: with a fast local disk
	// its second transaction and smaller batches cost Postgres more CPU (87 % of a core
	// against 75 %) than the flush it takes off the path (push at par, acks slower). The price: a crash of Postgres within a batch's flush time can lose a
	// message a peer was already pushed; its sender was never acknowledged
	// (store.SetPushBeforeFlush). Not with NotifyAfterCommit.
	PushBeforeFlush bool

	// HelloConcurrency bounds the hello statements in the database at once (default 1, each
	// registering up to 64 hellos that waited together); HelloQueue bounds the hellos waiting for
	// one (default MaxUnauthenticated: a queued hello is such a socket). Beyond, or after 3 s in the queue, a hello is refused at once with
	// "overloaded" (close 1013), which clients retry.
	HelloConcurrency int
	HelloQueue       int

	// SendRatePerMember and SendBurstPerMember bound a member's sends on one replica (token
	// bucket); beyond, a send is acked rate_limited. MaxEnvelopeBytes bounds a send's nonce,
	// ciphertext and targetSpec together (too_large); default MAX_MESSAGE_BYTES - 1 KiB.
	SendRatePerMember  int
	SendBurstPerMember int
	MaxEnvelopeBytes   int

	// httpTimeouts overrides the plain HTTP requests' read, write and idle timeouts (tests).
	httpTimeouts *[3]time.Duration
	// plainConnLimits overrides the plain HTTP connections' limits, replica-wide and per
	// source (tests; plainConns).
	plainConnLimits *[2]int
	// WriteRatePerMember and WriteBurstPerMember bound a member's requests that write
	// (set_state, set_status, set_summary, join_group, leave_group, kick, ban, unban) on one
	// replica; ReadRatePerMember and ReadBurstPerMember those that read (list_peers, get_state,
	// list_state, message_status, list_bans). Token buckets shared by the member's sessions
	// there; beyond, the request is answered error rate_limited and the session stays open.
	WriteRatePerMember  int
	WriteBurstPerMember int
	ReadRatePerMember   int
	ReadBurstPerMember  int

	// listBytesRate and listBytesBurst override listBytesPerSecond and listBytesBurst (tests).
	listBytesRate, listBytesBurst int

	// pingEvery and pongWait override the protocol's 30 s ping and 75 s pong deadline (tests).
	pingEvery, pongWait time.Duration

	// quiet stretches the periodic background work (sweeps, the catch-up poll, the bus's
	// self-ping) to an hour, so a test can count the round trips of one operation exactly.
	quiet bool

	// helloRegistered, when set, is called between a hello's statement and its session
	// joining the hub (tests).
	helloRegistered func()

	// sendDeadline overrides a send batch's deadline, sendTimeout (tests).
	sendDeadline time.Duration

	// noLinger closes sockets at once, as when maxLingering are lingering (tests).
	noLinger bool

	// helloJoined, when set, is called once a hello's session joined the hub, before the hello
	// looks at what may wait for it (tests).
	helloJoined func()

	// givingBack, when set, is called in place of the pusher's give-back to pending of assigned
	// deliveries it found no session for, with that give-back to call (tests).
	givingBack func(ids []int64, giveBack func(ids []int64))
}

// minDeadAfter is the shortest NODE_DEAD_AFTER_SECONDS: two heartbeats, so one late heartbeat
// never gets a live replica declared dead.
const minDeadAfter = int(2 * DefaultHeartbeatInterval / time.Second)

// envVar describes one environment variable: its name, what it sets and how to parse it.
type envVar struct {
	name  string
	help  string
	parse func(string, *Config) error
}

var envVars = []envVar{
	{"BROKER_PORT", "a TCP port between 1 and 65535", func(v string, c *Config) error { return intIn(v, 1, 65535, &c.Port) }},
	{"DATABASE_URL", "a postgres:// URL or a key=value connection string", func(v string, c *Config) error {
		if !strings.HasPrefix(v, "postgres://") && !strings.HasPrefix(v, "postgresql://") && !strings.Contains(v, "=") {
			return errors.New("not a postgres:// URL or key=value connection string")
		}
		c.DatabaseURL = v
		return nil
	}},
	{"STATUS_TTL_SECONDS", "a whole number of seconds >= 1", func(v string, c *Config) error { return seconds(v, 1, &c.StatusTTL) }},
	{"HOOK_FRESH_WINDOW_SECONDS", "a whole number of seconds >= 1", func(v string, c *Config) error { return seconds(v, 1, &c.HookFreshWindow) }},
	{"MAX_CONNECTIONS_PER_MESH", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.MaxConnsPerMesh) }},
	{"MAX_MESSAGE_BYTES", "a whole number of bytes between 1024 and 16777216", func(v string, c *Config) error { return intIn(v, 1024, 16<<20, &c.MaxMessageBytes) }},
	{"HOOK_RATE_LIMIT_PER_MIN", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.HookRatePerMin) }},
	{"SESSION_GRACE_SECONDS", "a whole number of seconds >= 0", func(v string, c *Config) error { return seconds(v, 0, &c.SessionGrace) }},
	{"BROKER_DATA_DIR", "a directory path", func(v string, c *Config) error { c.DataDir = v; return nil }},
	{"LOG_LEVEL", "one of debug, info, warn, error", func(v string, c *Config) error { return c.LogLevel.UnmarshalText([]byte(v)) }},
	{"LOG_FORMAT", "text or json", func(v string, c *Config) error {
		if v != "text" && v != "json" {
			return errors.New("unknown format")
		}
		c.LogFormat = v
		return nil
	}},
	{"HOOK_TOKEN", "any non-empty secret", func(v string, c *Config) error { c.HookToken = v; return nil }},
	{"BROKER_ADMIN_TOKEN", "any non-empty secret", func(v string, c *Config) error { c.AdminToken = v; return nil }},
	{"BROKER_NODE_ID", "a short identifier of letters, digits, '-' or '_'", func(v string, c *Config) error { c.NodeID = v; return nil }},
	{"BROKER_REGION", "a region name", func(v string, c *Config) error { c.Region = v; return nil }},
	{"FLY_REGION", "a region name", func(v string, c *Config) error {
		if c.Region == "" {
			c.Region = v
		}
		return nil
	}},
	{"NODE_DEAD_AFTER_SECONDS", fmt.Sprintf("a whole number of seconds >= %d (two heartbeats)", minDeadAfter), func(v string, c *Config) error {
		return seconds(v, minDeadAfter, &c.NodeDeadAfter)
	}},
	{"DRAIN_TIMEOUT_SECONDS", "a whole number of seconds >= 1", func(v string, c *Config) error { return seconds(v, 1, &c.DrainTimeout) }},
	{"MESSAGE_TTL_SECONDS", "a whole number of seconds >= 60", func(v string, c *Config) error { return seconds(v, 60, &c.MessageTTL) }},
	{"BROKER_HOST", "a host or IP address to listen on (127.0.0.1 for this machine only)", func(v string, c *Config) error { c.Host = v; return nil }},
	{"HELLO_TIMEOUT_SECONDS", "a whole number of seconds >= 1", func(v string, c *Config) error { return seconds(v, 1, &c.HelloTimeout) }},
	{"MAX_UNAUTHENTICATED_SOCKETS", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.MaxUnauthenticated) }},
	{"MAX_UNAUTHENTICATED_PER_SOURCE", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.MaxUnauthPerSource) }},
	{"TRUSTED_PROXY_HEADER", "a header name such as Fly-Client-IP or X-Forwarded-For", func(v string, c *Config) error { c.TrustedProxyHeader = v; return nil }},
	{"MAX_STATE_KEYS_PER_MESH", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.MaxStateKeysPerMesh) }},
	{"MAX_STATE_BYTES_PER_MESH", "a whole number of bytes >= 1024", func(v string, c *Config) error { return intIn(v, 1024, 1<<30, &c.MaxStateBytesPerMesh) }},
	{"MAX_STATE_VALUE_BYTES", "a whole number of bytes >= 16", func(v string, c *Config) error { return intIn(v, 16, 1<<30, &c.MaxStateValueBytes) }},
	{"MAX_GROUPS_PER_SESSION", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<20, &c.MaxGroupsPerSession) }},
	{"MAX_PENDING_PER_MEMBER", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<24, &c.MaxPendingPerMember) }},
	{"HOOK_ALLOW_UNSIGNED", "true or false", func(v string, c *Config) error { return boolean(v, &c.HookAllowUnsigned) }},
	{"HOOK_RATE_LIMIT_PER_CALLER_PER_MIN", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.HookRatePerCallerMin) }},
	{"HOOK_RATE_LIMIT_PER_SOURCE_PER_MIN", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.HookRatePerSourceMin) }},
	{"HOOK_CONCURRENCY", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<20, &c.HookConcurrency) }},
	{"JOIN_RATE_LIMIT_PER_SOURCE_PER_MIN", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.JoinRatePerSourceMin) }},
	{"HELLO_RATE_LIMIT_PER_SESSION_PER_MIN", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.HelloRatePerSessionMin) }},
	{"HELLO_RATE_LIMIT_PER_MEMBER_PER_MIN", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.HelloRatePerMemberMin) }},
	{"METRICS_TOKEN", "any non-empty secret", func(v string, c *Config) error { c.MetricsToken = v; return nil }},
	{"METRICS_ADDR", "a listen address such as 127.0.0.1:9090", func(v string, c *Config) error {
		if _, _, err := net.SplitHostPort(v); err != nil {
			return errors.New("not host:port")
		}
		c.MetricsAddr = v
		return nil
	}},
	{"COMMITTERS", "a whole number from 1 to 64", func(v string, c *Config) error { return intIn(v, 1, 64, &c.Committers) }},
	{"NOTIFY_AFTER_COMMIT", "true or false", func(v string, c *Config) error { return boolean(v, &c.NotifyAfterCommit) }},
	{"PUSH_BEFORE_FLUSH", "true or false", func(v string, c *Config) error { return boolean(v, &c.PushBeforeFlush) }},
	{"HELLO_CONCURRENCY", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<20, &c.HelloConcurrency) }},
	{"HELLO_QUEUE", "a whole number >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.HelloQueue) }},
	{"SEND_RATE_PER_MEMBER", "a whole number of sends per second >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.SendRatePerMember) }},
	{"SEND_BURST_PER_MEMBER", "a whole number of sends >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.SendBurstPerMember) }},
	{"WRITE_RATE_PER_MEMBER", "a whole number of requests per second >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.WriteRatePerMember) }},
	{"WRITE_BURST_PER_MEMBER", "a whole number of requests >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.WriteBurstPerMember) }},
	{"READ_RATE_PER_MEMBER", "a whole number of requests per second >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.ReadRatePerMember) }},
	{"READ_BURST_PER_MEMBER", "a whole number of requests >= 1", func(v string, c *Config) error { return intIn(v, 1, 1<<30, &c.ReadBurstPerMember) }},
	{"MAX_ENVELOPE_BYTES", "a whole number of bytes between 64 and 16777216", func(v string, c *Config) error { return intIn(v, 64, 16<<20, &c.MaxEnvelopeBytes) }},
	{"ALLOWED_ORIGINS", "a comma-separated list of origins, or *", func(v string, c *Config) error {
		for _, o := range strings.Split(v, ",") {
			if o = strings.TrimSpace(o); o != "" {
				c.AllowedOrigins = append(c.AllowedOrigins, o)
			}
		}
		return nil
	}},
}

// unsetMeans says what unsetting a variable does where "for the default" would not.
var unsetMeans = map[string]string{"DATABASE_URL": "to use the embedded Postgres in BROKER_DATA_DIR"}

// shown is a setting's value as an error may print it: a database URL's password never is
// (a mistyped URL is exactly the one printed).
func shown(name, v string) string {
	if name == "DATABASE_URL" {
		return db.Redact(v)
	}
	return v
}

// LoadConfig reads the configuration from the environment (getenv is os.Getenv in main).
// Every invalid value is reported, each naming the variable and what it should be.
func LoadConfig(getenv func(string) string) (Config, error) {
	if getenv == nil {
		getenv = os.Getenv
	}
	var c Config
	var errs []error
	for _, ev := range envVars {
		v := strings.TrimSpace(getenv(ev.name))
		if v == "" {
			continue
		}
		if err := ev.parse(v, &c); err != nil {
			unset, ok := unsetMeans[ev.name]
			if !ok {
				unset = "for the default"
			}
			errs = append(errs, fmt.Errorf("%s=%q is invalid (%v): set it to %s, or unset it %s", ev.name, shown(ev.name, v), err, ev.help, unset))
		}
	}
	// The relations between settings are checked too, a value that did not parse standing at
	// its default, so that every mistake is reported in one go.
	c = c.WithDefaults()
	if err := errors.Join(append(errs, c.Validate())...); err != nil {
		return Config{}, err
	}
	return c, nil
}

// WithDefaults returns c with every zero field set to its default.
func (c Config) WithDefaults() Config {
	def := func(p *time.Duration, d time.Duration) {
		if *p == 0 {
			*p = d
		}
	}
	if c.Port == 0 {
		c.Port = DefaultPort
	}
	def(&c.StatusTTL, DefaultStatusTTL)
	def(&c.HookFreshWindow, DefaultHookFreshWindow)
	def(&c.NodeDeadAfter, DefaultNodeDeadAfter)
	def(&c.Heartbeat, DefaultHeartbeatInterval)
	def(&c.DrainTimeout, DefaultDrainTimeout)
	def(&c.SessionGrace, DefaultSessionGrace)
	def(&c.MessageTTL, DefaultMessageTTL)
	def(&c.HelloTimeout, DefaultHelloTimeout)
	def(&c.StallTimeout, DefaultStallTimeout)
	setInt := func(p *int, d int) {
		if *p <= 0 {
			*p = d
		}
	}
	setInt(&c.MaxUnauthenticated, DefaultMaxUnauthenticated)
	setInt(&c.MaxUnauthPerSource, DefaultMaxUnauthPerSource)
	setInt(&c.MaxStateKeysPerMesh, DefaultMaxStateKeysPerMesh)
	setInt(&c.MaxStateBytesPerMesh, DefaultMaxStateBytesPerMesh)
	setInt(&c.MaxStateValueBytes, DefaultMaxStateValueBytes)
	setInt(&c.MaxGroupsPerSession, DefaultMaxGroupsPerSession)
	setInt(&c.MaxPendingPerMember, DefaultMaxPendingPerMember)
	setInt(&c.HookRatePerCallerMin, DefaultHookRatePerCallerMin)
	setInt(&c.HookRatePerSourceMin, DefaultHookRatePerSourceMin)
	setInt(&c.HookConcurrency, DefaultHookConcurrency)
	setInt(&c.JoinRatePerSourceMin, DefaultJoinRatePerSourceMin)
	setInt(&c.HelloRatePerSessionMin, DefaultHelloRatePerSessionMin)
	setInt(&c.HelloRatePerMemberMin, DefaultHelloRatePerMemberMin)
	setInt(&c.HelloConcurrency, DefaultHelloConcurrency)
	setInt(&c.Committers, DefaultCommitters)
	// A queued hello is a socket without a hello, which MaxUnauthenticated already bounds: a
	// smaller queue refused hellos the replica would have registered within its 3 s wait, and
	// each refusal costs the peer a new dial and the replica its handshake again.
	setInt(&c.HelloQueue, c.MaxUnauthenticated)
	if c.MaxConnsPerMesh == 0 {
		c.MaxConnsPerMesh = DefaultMaxConnectionsPerMsh
	}
	if c.MaxBatch <= 0 {
		c.MaxBatch = maxBatch
	}
	if c.MaxMessageBytes == 0 {
		c.MaxMessageBytes = DefaultMaxMessageBytes
	}
	setInt(&c.SendRatePerMember, DefaultSendRatePerMember)
	setInt(&c.SendBurstPerMember, DefaultSendBurstPerMember)
	setInt(&c.WriteRatePerMember, DefaultWriteRatePerMember)
	setInt(&c.WriteBurstPerMember, DefaultWriteBurstPerMember)
	setInt(&c.ReadRatePerMember, DefaultReadRatePerMember)
	setInt(&c.ReadBurstPerMember, DefaultReadBurstPerMember)
	setInt(&c.MaxEnvelopeBytes, max(c.MaxMessageBytes-envelopeHeadroom, 64))
	if c.HookRatePerMin == 0 {
		c.HookRatePerMin = DefaultHookRateLimitPerMin
	}
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
	}
	if c.LogFormat == "" {
		c.LogFormat = "text"
	}
	return c
}

// Grace is the reconnect grace window (SESSION_GRACE_SECONDS=0 is stored as -1 to tell it
// apart from "unset").
func (c Config) Grace() time.Duration { return max(c.SessionGrace, 0) }

// Validate checks relations between settings that single values can't express.
func (c Config) Validate() error {
	var errs []error
	if c.Heartbeat*2 > c.NodeDeadAfter {
		errs = append(errs, fmt.Errorf("NODE_DEAD_AFTER_SECONDS=%d is too short: set it to at least %d, two heartbeats of %s",
			int(c.NodeDeadAfter.Seconds()), int((2*c.Heartbeat+time.Second-1)/time.Second), c.Heartbeat))
	}
	// A send's envelope rides in one frame of at most MAX_MESSAGE_BYTES: a larger limit could
	// never be reached, and the sends it meant to allow would close their sockets (1009)
	// instead of being stored or refused too_large.
	if c.MaxEnvelopeBytes > c.MaxMessageBytes {
		errs = append(errs, fmt.Errorf("MAX_ENVELOPE_BYTES=%d is more than MAX_MESSAGE_BYTES=%d, the largest frame, which carries the envelope: "+
			"raise MAX_MESSAGE_BYTES to at least %d (the envelope plus 1 KiB for the rest of the frame), or unset MAX_ENVELOPE_BYTES for MAX_MESSAGE_BYTES - 1024",
			c.MaxEnvelopeBytes, c.MaxMessageBytes, c.MaxEnvelopeBytes+envelopeHeadroom))
	}
	for _, r := range c.NodeID {
		if !(r == '-' || r == '_' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') {
			errs = append(errs, fmt.Errorf("BROKER_NODE_ID=%q is invalid: use letters, digits, '-' or '_'", c.NodeID))
			break
		}
	}
	if len(c.NodeID) > 40 {
		errs = append(errs, fmt.Errorf("BROKER_NODE_ID is %d characters: use at most 40 (it names a LISTEN channel)", len(c.NodeID)))
	}
	if c.PushBeforeFlush && c.NotifyAfterCommit {
		errs = append(errs, errors.New("PUSH_BEFORE_FLUSH and NOTIFY_AFTER_COMMIT are two answers to a slow flush: set one of them"))
	}
	return errors.Join(errs...)
}

func intIn(v string, lo, hi int, dst *int) error {
	n, err := strconv.Atoi(v)
	if err != nil {
		return errors.New("not a whole number")
	}
	if n < lo || n > hi {
		return fmt.Errorf("out of range %d..%d", lo, hi)
	}
	*dst = n
	return nil
}

func boolean(v string, dst *bool) error {
	b, err := strconv.ParseBool(v)
	if err != nil {
		return errors.New("not true or false")
	}
	*dst = b
	return nil
}

// UnsignedHooks reports whether /hook/set-status accepts the April clients' unsigned form:
// when allowed explicitly, or when the broker listens on loopback only and no proxy is in
// front (TrustedProxyHeader unset): a proxy on this machine brings every client it serves.
func (c Config) UnsignedHooks() bool {
	if c.HookAllowUnsigned {
		return true
	}
	if c.TrustedProxyHeader != "" {
		return false
	}
	if c.Host == "localhost" {
		return true
	}
	ip := net.ParseIP(c.Host)
	return ip != nil && ip.IsLoopback()
}

func seconds(v string, lo int, dst *time.Duration) error {
	var n int
	if err := intIn(v, lo, 1<<30, &n); err != nil {
		return err
	}
	*dst = time.Duration(n) * time.Second
	if n == 0 {
		// Zero is a real choice (no grace), kept distinct from "unset" by a negative sentinel.
		*dst = -1
	}
	return nil
}
