package main

import (
	"cmp"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/time/rate"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/client/e2e"
	"github.com/claudemesh/broker/protocol"
)

// benchOpts are the bench flags.
type benchOpts struct {
	urls            []string
	peers           int
	messages        int
	duration        time.Duration
	rate            float64
	priorityMix     string
	targetMix       string
	size            int
	inflight        int
	setupDB         string
	meshSlug        string
	ownerKey        string
	pids            []int
	idleConns       int
	hold            time.Duration
	dialConcurrency int
	gcPercent       int
	drainTimeout    time.Duration
	pushLog         string
	plain           bool
	noProgress      bool
	invite          string
	probe           int
	storm           int
	rtt             time.Duration
	crossReplica    bool
	meshes          int
	killPID         int
	killAfter       time.Duration
	failoverTimeout time.Duration
}

// setup is the bench setup for members members in a mesh of capacity live sessions.
func (o benchOpts) setup(members, capacity int) benchSetup {
	return benchSetup{dbURL: o.setupDB, meshSlug: o.meshSlug, ownerKey: o.ownerKey, invite: o.invite,
		members: members, capacity: capacity}
}

func newBenchCmd(a *app) *cobra.Command {
	var o benchOpts
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Load-test a broker or a cluster",
		Long: "Load-test one broker or several replicas (peers are spread round-robin over --urls).\n\n" +
			"Message mode (default): --peers peers each send --messages messages (or for --duration)\n" +
			"at a total --rate (0: as fast as acks allow, --inflight sends outstanding per peer),\n" +
			"direct or broadcast and of each priority by the given mixes, encrypted as meshctl\n" +
			"encrypts (box / secretbox; --plain sends unencrypted base64). Every peer uses\n" +
			"client_ack and acknowledges what it receives. At the end: sent, acked, delivered (%),\n" +
			"duplicates, throughput, send→ack and send→push latency, connection set-up rate, and the\n" +
			"brokers' RSS (--pids).\n\n" +
			"With --cross-replica every peer sends only to peers connected to another URL (give the\n" +
			"replicas' own URLs, not a load balancer's), so every message crosses replicas. --meshes N\n" +
			"spreads the peers over N throwaway meshes (peer i in mesh i mod N), each sending within\n" +
			"its mesh: a mesh's sends serialise on its audit chain, so this shows the cluster's\n" +
			"capacity for many meshes rather than one.\n\n" +
			"Idle mode (--idle-conns N): open N authenticated sessions that stay idle for --hold and\n" +
			"report the set-up rate and the brokers' memory per connection (RSS delta / N, --pids).\n" +
			"--meshes M spreads them over M throwaway meshes (session i in mesh i mod M, on URL i mod\n" +
			"the URL count). Failover: --kill-pid P sends SIGKILL to process P (a replica serving one\n" +
			"of --urls) --kill-after the set-up; every session whose connection drops dials another\n" +
			"URL at once, the dropped sessions spread over the others as a round-robin load balancer\n" +
			"would spread them (retrying with a short backoff when refused), and the report gives the time\n" +
			"from the kill until every dropped session had a new hello_ack, per session and in all.\n\n" +
			"Probe mode (--probe N): time single operations, one at a time, N times each after a\n" +
			"warm-up, across replicas A, B and C (--urls, in that order; fewer are reused):\n" +
			"hello → hello_ack (fresh dial to A), send on A → ack and → push on B, a signed hook\n" +
			"`idle` on C → the held `next` message pushed on A, list_peers on A. Reports median,\n" +
			"p90 and max, also in round trips with --rtt (e.g. 40ms: twice a --db-delay of 20ms).\n\n" +
			"Storm mode (--storm N): N members of one mesh say hello to A at the same instant;\n" +
			"reports how many were answered OK, refusals by code and the time to the last answer.\n\n" +
			"Members are created in the broker's database (--setup-db, default $DATABASE_URL) in a\n" +
			"throwaway mesh bench-<random>, or in the existing mesh --mesh-slug; or, without database\n" +
			"access, they join with --invite (one use each, through the invite's broker).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if len(o.urls) == 0 && a.brokerURL != "" {
				o.urls = []string{a.brokerURL}
			}
			if o.setupDB == "" {
				o.setupDB = a.getenv("DATABASE_URL")
			}
			return a.bench(cmd.Context(), o)
		},
	}
	f := cmd.Flags()
	f.StringSliceVar(&o.urls, "urls", nil, "broker URLs, comma-separated (ws://host:7900/ws or http://host:7900)")
	f.IntVar(&o.peers, "peers", 10, "peers (each a member with its own connection)")
	f.IntVar(&o.messages, "messages", 100, "messages each peer sends (ignored with --duration)")
	f.DurationVar(&o.duration, "duration", 0, "send for this long instead of a message count")
	f.Float64Var(&o.rate, "rate", 0, "target total send rate in messages/s (0: as fast as acks allow)")
	f.StringVar(&o.priorityMix, "priority-mix", "now=1", "weights of now, next and low, e.g. now=1,next=1,low=0")
	f.StringVar(&o.targetMix, "target-mix", "direct=1", "weights of direct and broadcast sends, e.g. direct=9,broadcast=1")
	f.IntVar(&o.size, "size", 256, "plaintext bytes per message (at least 24)")
	f.IntVar(&o.inflight, "inflight", 1, "sends each peer keeps outstanding")
	f.StringVar(&o.setupDB, "setup-db", "", "the broker's database, to create the bench members (default $DATABASE_URL)")
	f.StringVar(&o.meshSlug, "mesh-slug", "", "use this existing mesh instead of a throwaway one")
	f.StringVar(&o.ownerKey, "owner-key", "", "owner key file whose mesh root key encrypts broadcasts (default: a random key)")
	f.IntSliceVar(&o.pids, "pids", nil, "broker process ids whose RSS to report")
	f.IntVar(&o.idleConns, "idle-conns", 0, "idle mode: open this many idle sessions")
	f.DurationVar(&o.hold, "hold", 5*time.Second, "idle mode: how long to keep the sessions open")
	f.IntVar(&o.dialConcurrency, "dial-concurrency", 16, "connections being set up at once")
	f.IntVar(&o.gcPercent, "gc-percent", 400, "the load generator's own garbage-collection target (as GOGC): it shares the machine with what it measures, so it collects less often than Go's default of 100; 0 leaves GOGC's")
	f.DurationVar(&o.drainTimeout, "drain-timeout", 30*time.Second, "how long to wait for outstanding deliveries after the last send")
	f.StringVar(&o.pushLog, "push-log", "", "message mode: write each delivery's send time (Unix ns), send→push latency (ns), sender and recipient (peer numbers) to this file, one per line in send order, to see when and where the tail happened")
	f.BoolVar(&o.plain, "plain", false, "send unencrypted base64 bodies (measures the broker without client crypto)")
	f.BoolVar(&o.noProgress, "no-progress", false, "no progress bar on stderr")
	f.StringVar(&o.invite, "invite", "", "create the members by joining with this invite link instead of in the database")
	f.IntVar(&o.probe, "probe", 0, "probe mode: time each operation this many times, one at a time")
	f.IntVar(&o.storm, "storm", 0, "storm mode: this many members say hello to the first URL at once")
	f.DurationVar(&o.rtt, "rtt", 0, "probe and storm: also report latencies in round trips of this length (twice the one-way --db-delay)")
	f.BoolVar(&o.crossReplica, "cross-replica", false, "message mode: each peer sends only to peers connected to another of --urls")
	f.IntVar(&o.meshes, "meshes", 1, "message and idle modes: spread the peers over this many throwaway meshes (peer i in mesh i mod N)")
	f.IntVar(&o.killPID, "kill-pid", 0, "idle mode: SIGKILL this replica process --kill-after the set-up and time the failover")
	f.DurationVar(&o.killAfter, "kill-after", 5*time.Second, "idle mode with --kill-pid: how long after the set-up to kill")
	f.DurationVar(&o.failoverTimeout, "failover-timeout", time.Minute, "idle mode with --kill-pid: how long a dropped session may take to come back before it counts as failed")
	return cmd
}

// mix is a weighted choice among names.
type mix struct {
	names []string
	cum   []float64
}

func parseMix(s string, allowed ...string) (mix, error) {
	var m mix
	total := 0.0
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, w, ok := strings.Cut(part, "=")
		if !ok {
			w = "1"
		}
		name = strings.TrimSpace(name)
		weight, err := strconv.ParseFloat(strings.TrimSpace(w), 64)
		if err != nil || weight < 0 || math.IsInf(weight, 0) || math.IsNaN(weight) {
			return m, fmt.Errorf("mix %q: weight of %s must be a number >= 0", s, name)
		}
		found := false
		for _, a := range allowed {
			found = found || a == name
		}
		if !found {
			return m, fmt.Errorf("mix %q: unknown %q (want %s)", s, name, strings.Join(allowed, ", "))
		}
		if weight == 0 {
			continue
		}
		total += weight
		m.names = append(m.names, name)
		m.cum = append(m.cum, total)
	}
	if total == 0 {
		return m, fmt.Errorf("mix %q: no positive weight", s)
	}
	for i := range m.cum {
		m.cum[i] /= total
	}
	return m, nil
}

func (m mix) pick(r *rand.Rand) string {
	if len(m.names) == 1 {
		return m.names[0]
	}
	x := r.Float64()
	for i, c := range m.cum {
		if x < c {
			return m.names[i]
		}
	}
	return m.names[len(m.names)-1]
}

// benchTargets gives, for each of n peers (peer i in mesh i mod meshes, on URL i mod
// len(urls)), the peers it may send to: those of its mesh, and with cross only those on
// another URL (peers on the same URL string share a replica). Peers with the same choice share
// one slice, so this is n × (distinct URLs) entries at most; a non-cross list includes the
// peer itself, which the sender skips. A peer with nobody to send to is an error.
func benchTargets(n, meshes int, urls []string, cross bool) ([][]int, error) {
	type key struct {
		mesh int
		url  string
	}
	lists := map[key][]int{}
	targets := make([][]int, n)
	for i := range targets {
		k := key{mesh: i % meshes}
		if cross {
			k.url = urls[i%len(urls)]
		}
		list, ok := lists[k]
		if !ok {
			list = []int{}
			for j := k.mesh; j < n; j += meshes {
				if !cross || urls[j%len(urls)] != k.url {
					list = append(list, j)
				}
			}
			lists[k] = list
		}
		if len(list) == 0 || (len(list) == 1 && list[0] == i) {
			if cross {
				return nil, fmt.Errorf("bench: --cross-replica: peer %d has no peer of its mesh on another URL (give the replicas' own --urls, not one load balancer, and a --meshes that does not divide by the URL count)", i)
			}
			return nil, fmt.Errorf("bench: peer %d is alone in its mesh", i)
		}
		targets[i] = list
	}
	return targets, nil
}

// benchReport is the result of a run (--json prints it as is).
type benchReport struct {
	Mode     string       `json:"mode"` // messages, idle, probe or storm
	URLs     []string     `json:"urls"`
	MeshID   string       `json:"meshId"`
	MeshSlug string       `json:"meshSlug"`
	Meshes   int          `json:"meshes,omitempty"` // message mode: how many meshes the peers were spread over
	Setup    setupReport  `json:"setup"`
	Messages *msgReport   `json:"messages,omitempty"`
	Idle     *idleReport  `json:"idle,omitempty"`
	Probe    *probeReport `json:"probe,omitempty"`
	Storm    *stormReport `json:"storm,omitempty"`
	RSS      []rssReport  `json:"rss,omitempty"`
	Config   benchSummary `json:"config"`
}

type benchSummary struct {
	Peers       int     `json:"peers"`
	Messages    int     `json:"messagesPerPeer,omitempty"`
	DurationS   float64 `json:"durationSeconds,omitempty"`
	Rate        float64 `json:"rate"`
	PriorityMix string  `json:"priorityMix"`
	TargetMix   string  `json:"targetMix"`
	Size        int     `json:"size"`
	Inflight    int     `json:"inflight"`
	Encrypted   bool    `json:"encrypted"`
}

type setupReport struct {
	Connections int           `json:"connections"`
	Failed      int           `json:"failed"`
	Seconds     float64       `json:"seconds"`
	PerSecond   float64       `json:"perSecond"`
	Hello       latencyReport `json:"helloLatency"`
	FirstError  string        `json:"firstError,omitempty"`
}

type msgReport struct {
	Sent         int64            `json:"sent"`
	Acked        int64            `json:"acked"`
	Refused      map[string]int64 `json:"refused,omitempty"`
	Expected     int64            `json:"expectedDeliveries"`
	Delivered    int64            `json:"delivered"`
	DeliveredPct float64          `json:"deliveredPct"`
	Duplicates   int64            `json:"duplicates"`
	Corrupt      int64            `json:"corrupt"`
	Disconnects  int64            `json:"disconnects"`
	// SameURL counts deliveries whose sender and recipient were connected to the same URL
	// (0 with --cross-replica: every delivery crossed replicas).
	SameURL         int64         `json:"sameUrlDeliveries"`
	SendSeconds     float64       `json:"sendSeconds"`
	AckedPerSec     float64       `json:"ackedPerSecond"`
	DeliveredPerSec float64       `json:"deliveredPerSecond"`
	SendToAck       latencyReport `json:"sendToAck"`
	SendToPush      latencyReport `json:"sendToPush"`
}

// benchPeer is one connection of a message run.
type benchPeer struct {
	idx  int
	mesh *benchMesh
	m    *benchMember
	url  string
	cl   *client.Client
	keys *e2e.Keyring
	seq  atomic.Int64

	// Receiver-only state.
	pushHist histogram
	pushLog  [][4]int64 // with --push-log: send time and latency of each delivery (ns), sender and recipient
	seen     [][]uint64 // per sender, a bitset of sequence numbers
	recvDone chan struct{}
}

// benchSendTimeout bounds one send's wait for its ack: a broker that stops answering counts
// as timeouts instead of hanging the run.
const benchSendTimeout = 30 * time.Second

// The plaintext of a bench message starts with a header the receiver reads back.
const (
	benchMagic      = "cmb1"
	benchHeaderSize = 24 // magic(4) sender(4) seq(8) sent-at unix ns(8)
)

type benchRun struct {
	a     *app
	o     benchOpts
	mesh  *benchMesh
	peers []*benchPeer

	sent, acked, expected       atomic.Int64
	delivered, dups, corrupt    atomic.Int64
	disconnects, lastDeliveryNs atomic.Int64
	closing                     atomic.Bool
	refusedMu                   sync.Mutex
	refused                     map[string]int64
	prioMix, targetMix          mix
	// targets[i] lists the peers peer i may send to: those of its mesh (on another URL with
	// --cross-replica), maybe itself (skipped when picked).
	targets [][]int
	// meshSize[k] is the number of peers in mesh k (a broadcast reaches all but its sender).
	meshSize []int
	// sameURL counts deliveries whose sender and recipient use the same URL.
	sameURL atomic.Int64
}

func (a *app) bench(ctx context.Context, o benchOpts) error {
	if len(o.urls) == 0 {
		return errors.New("bench: --urls is required (the brokers to load)")
	}
	for i, u := range o.urls {
		ws, err := wsURL(u)
		if err != nil {
			return err
		}
		o.urls[i] = ws
	}
	o.size = max(o.size, benchHeaderSize)
	o.inflight = max(o.inflight, 1)
	o.dialConcurrency = max(o.dialConcurrency, 1)
	if o.gcPercent > 0 {
		// Ten thousand clients' buffers and goroutines, marked at every collection, and their
		// stacks shrunk and grown again: 8 % and 13 % of this process in a connect run at 100.
		debug.SetGCPercent(o.gcPercent)
	}
	modes := 0
	for _, n := range []int{o.idleConns, o.probe, o.storm} {
		if n < 0 {
			return errors.New("bench: --idle-conns, --probe and --storm take a positive count")
		}
		if n > 0 {
			modes++
		}
	}
	switch {
	case modes > 1:
		return errors.New("bench: --idle-conns, --probe and --storm are separate modes: give one")
	case o.rtt < 0:
		return errors.New("bench: --rtt must be a positive duration (twice the one-way delay, e.g. 40ms)")
	case o.invite != "" && o.meshSlug != "":
		return errors.New("bench: --invite names its mesh: drop --mesh-slug")
	case o.meshes < 1:
		return errors.New("bench: --meshes must be at least 1")
	case o.killPID != 0 && o.idleConns == 0:
		return errors.New("bench: --kill-pid is for idle mode (--idle-conns)")
	case o.meshes > 1 && (o.probe > 0 || o.storm > 0):
		return errors.New("bench: --meshes is for message and idle modes")
	case o.crossReplica && (o.idleConns > 0 || o.probe > 0 || o.storm > 0):
		return errors.New("bench: --cross-replica is for message mode")
	case o.idleConns > 0:
		return a.benchIdle(ctx, o)
	case o.probe > 0:
		return a.benchProbe(ctx, o)
	case o.storm > 0:
		return a.benchStorm(ctx, o)
	}
	if o.peers < 2 {
		return errors.New("bench: --peers must be at least 2")
	}
	if o.messages <= 0 && o.duration <= 0 {
		return errors.New("bench: give --messages > 0 or a --duration")
	}
	r := &benchRun{a: a, o: o, refused: map[string]int64{}}
	var err error
	if r.prioMix, err = parseMix(o.priorityMix, "now", "next", "low"); err != nil {
		return err
	}
	if r.targetMix, err = parseMix(o.targetMix, "direct", "broadcast"); err != nil {
		return err
	}
	if o.crossReplica && slices.Contains(r.targetMix.names, "broadcast") {
		return errors.New("bench: --cross-replica sends direct messages only: drop broadcast from --target-mix")
	}
	if o.meshes > o.peers/2 {
		return fmt.Errorf("bench: --meshes %d leaves meshes with fewer than two of the %d peers", o.meshes, o.peers)
	}
	if r.targets, err = benchTargets(o.peers, o.meshes, o.urls, o.crossReplica); err != nil {
		return err
	}
	// Peer i is in mesh i mod M (member i div M of it), on URL i mod U.
	perMesh := (o.peers + o.meshes - 1) / o.meshes
	var meshes []*benchMesh
	if o.meshes == 1 {
		var m *benchMesh
		m, err = setupBenchMesh(ctx, o.setup(o.peers, o.peers+16))
		meshes = []*benchMesh{m}
	} else {
		meshes, err = setupBenchMeshes(ctx, o.setup(perMesh, perMesh+16), o.meshes)
	}
	if err != nil {
		return err
	}
	r.mesh = meshes[0]
	r.meshSize = make([]int, len(meshes))
	for i := range o.peers {
		r.meshSize[i%len(meshes)]++
	}
	rep := &benchReport{Mode: "messages", URLs: o.urls, MeshID: r.mesh.id, MeshSlug: r.mesh.slug, Meshes: len(meshes), Config: benchSummary{
		Peers: o.peers, Messages: o.messages, DurationS: o.duration.Seconds(), Rate: o.rate, PriorityMix: o.priorityMix,
		TargetMix: o.targetMix, Size: o.size, Inflight: o.inflight, Encrypted: !o.plain,
	}}
	if o.duration > 0 {
		rep.Config.Messages = 0
	}
	probe := newRSSProbe(o.pids)
	warn := func(err error) { fmt.Fprintln(a.stderr, "meshctl bench: rss:", err) }
	probe.sample(func(r *rssReport) *int64 { return &r.BeforeKiB }, warn)

	// Connect every peer.
	r.peers = make([]*benchPeer, o.peers)
	for i := range r.peers {
		mesh := meshes[i%len(meshes)]
		m := &mesh.members[i/len(meshes)]
		r.peers[i] = &benchPeer{idx: i, mesh: mesh, m: m, url: o.urls[i%len(o.urls)], keys: e2e.NewKeyring(m.key, mesh.root),
			seen: make([][]uint64, o.peers), recvDone: make(chan struct{})}
	}
	var dialed atomic.Int64
	bar := startProgress(a.stderr, !o.noProgress, func() (float64, string) {
		n := dialed.Load()
		return float64(n) / float64(o.peers), fmt.Sprintf("%d/%d connected", n, o.peers)
	})
	setup, clients := a.dialMany(ctx, o, len(r.peers), func(i int) client.Options {
		p := r.peers[i]
		return client.Options{URL: p.url, MeshID: p.mesh.id, MemberID: p.m.id, MemberKey: p.m.key, DisplayName: p.m.name,
			SessionID: fmt.Sprintf("bench-%s-%d", p.mesh.slug, i), PID: i + 1, CWD: "/bench/" + p.m.name,
			Capabilities: []string{protocol.CapClientAck}, PushBuffer: 1024, Logger: a.log}
	}, &dialed)
	bar.Stop()
	rep.Setup = setup
	defer func() {
		r.closing.Store(true)
		closeAll(clients)
	}()
	if setup.Failed > 0 {
		return fmt.Errorf("bench: %d of %d peers could not connect (first error: %s)", setup.Failed, o.peers, setup.FirstError)
	}
	for i, cl := range clients {
		r.peers[i].cl = cl
	}
	probe.sample(func(r *rssReport) *int64 { return &r.ConnectedKiB }, warn)

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, p := range r.peers {
		go r.receive(runCtx, p)
		go r.watch(p)
	}

	var limiter *rate.Limiter
	if o.rate > 0 {
		limiter = rate.NewLimiter(rate.Limit(o.rate), max(1, int(o.rate/100)))
	}
	planned := int64(o.peers) * int64(o.messages)
	start := time.Now()
	deadline := time.Time{}
	if o.duration > 0 {
		deadline = start.Add(o.duration)
	}
	bar = startProgress(a.stderr, !o.noProgress, func() (float64, string) {
		frac := 0.0
		if o.duration > 0 {
			frac = float64(time.Since(start)) / float64(o.duration)
		} else if planned > 0 {
			frac = float64(r.sent.Load()) / float64(planned)
		}
		el := time.Since(start).Seconds()
		return frac, fmt.Sprintf("sent %s  acked %s  delivered %s/%s  %s msg/s", si(float64(r.sent.Load())), si(float64(r.acked.Load())),
			si(float64(r.delivered.Load())), si(float64(r.expected.Load())), si(float64(r.acked.Load())/max(el, 1e-9)))
	})
	ackHists := make([]*histogram, o.peers*o.inflight)
	var senders sync.WaitGroup
	for i, p := range r.peers {
		for j := range o.inflight {
			h := &histogram{}
			ackHists[i*o.inflight+j] = h
			senders.Go(func() { r.send(runCtx, p, h, limiter, deadline) })
		}
	}
	senders.Wait()
	sendElapsed := time.Since(start)

	// Wait for what was acked to arrive.
	drainEnd := time.Now().Add(o.drainTimeout)
	for r.delivered.Load() < r.expected.Load() && time.Now().Before(drainEnd) && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	bar.Stop()
	probe.sample(func(r *rssReport) *int64 { return &r.AfterKiB }, warn)
	r.closing.Store(true)
	closeAll(clients)
	cancel()
	for _, p := range r.peers {
		<-p.recvDone
	}

	if o.pushLog != "" {
		if err := writePushLog(o.pushLog, r.peers); err != nil {
			return err
		}
	}
	var ackHist, pushHist histogram
	for _, h := range ackHists {
		ackHist.merge(h)
	}
	for _, p := range r.peers {
		pushHist.merge(&p.pushHist)
	}
	mr := &msgReport{
		Sent: r.sent.Load(), Acked: r.acked.Load(), Expected: r.expected.Load(), Delivered: r.delivered.Load(),
		Duplicates: r.dups.Load(), Corrupt: r.corrupt.Load(), Disconnects: r.disconnects.Load(), SameURL: r.sameURL.Load(),
		SendSeconds: round3(sendElapsed.Seconds()), SendToAck: ackHist.report(), SendToPush: pushHist.report(),
	}
	if len(r.refused) > 0 {
		mr.Refused = r.refused
	}
	if mr.Expected > 0 {
		mr.DeliveredPct = math.Round(float64(mr.Delivered)/float64(mr.Expected)*10000) / 100
	}
	mr.AckedPerSec = math.Round(float64(mr.Acked) / max(sendElapsed.Seconds(), 1e-9))
	if last := r.lastDeliveryNs.Load(); last > 0 {
		mr.DeliveredPerSec = math.Round(float64(mr.Delivered) / max(time.Unix(0, last).Sub(start).Seconds(), 1e-9))
	}
	rep.Messages = mr
	if len(o.pids) > 0 {
		rep.RSS = probe.reports
	}
	return a.printBench(rep)
}

// dialMany connects n sessions, dialConcurrency at a time, and measures the set-up.
func (a *app) dialMany(ctx context.Context, o benchOpts, n int, opts func(int) client.Options, dialed *atomic.Int64) (setupReport, []*client.Client) {
	clients := make([]*client.Client, n)
	hists := make([]histogram, o.dialConcurrency)
	var firstErr sync.Once
	var rep setupReport
	next := atomic.Int64{}
	start := time.Now()
	var wg sync.WaitGroup
	for w := range o.dialConcurrency {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				t0 := time.Now()
				cl, err := client.Dial(ctx, opts(i))
				if err != nil {
					firstErr.Do(func() { rep.FirstError = err.Error() })
					continue
				}
				hists[w].record(time.Since(t0))
				clients[i] = cl
				dialed.Add(1)
			}
		})
	}
	wg.Wait()
	el := time.Since(start)
	var h histogram
	for i := range hists {
		h.merge(&hists[i])
	}
	rep.Connections = int(dialed.Load())
	rep.Failed = n - rep.Connections // failed, or never tried because ctx ended
	rep.Seconds = round3(el.Seconds())
	rep.PerSecond = math.Round(float64(rep.Connections) / max(el.Seconds(), 1e-9))
	rep.Hello = h.report()
	return rep, clients
}

func closeAll(clients []*client.Client) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, cl := range clients {
		if cl == nil {
			continue
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			_ = cl.Close()
		})
	}
	wg.Wait()
}

func round3(f float64) float64 { return math.Round(f*1000) / 1000 }

// send is one sender loop of peer p.
func (r *benchRun) send(ctx context.Context, p *benchPeer, hist *histogram, lim *rate.Limiter, deadline time.Time) {
	rng := rand.New(rand.NewPCG(rand.Uint64(), uint64(p.idx)))
	buf := make([]byte, r.o.size)
	for i := benchHeaderSize; i < len(buf); i++ {
		buf[i] = byte('a' + rng.IntN(26))
	}
	copy(buf, benchMagic)
	binary.LittleEndian.PutUint32(buf[4:], uint32(p.idx))
	for ctx.Err() == nil {
		seq := p.seq.Add(1) - 1
		if deadline.IsZero() && seq >= int64(r.o.messages) {
			return
		}
		if !deadline.IsZero() && time.Now().After(deadline) {
			return
		}
		if lim != nil && lim.Wait(ctx) != nil {
			return
		}
		direct := r.targetMix.pick(rng) == "direct"
		prio := protocol.Priority(r.prioMix.pick(rng))
		binary.LittleEndian.PutUint64(buf[8:], uint64(seq))
		binary.LittleEndian.PutUint64(buf[16:], uint64(time.Now().UnixNano()))
		var spec, nonce, ct string
		var err error
		if direct {
			t := r.targets[p.idx]
			j := t[rng.IntN(len(t))]
			for j == p.idx { // a list holds the peer itself only beside others
				j = t[rng.IntN(len(t))]
			}
			spec = r.peers[j].m.pub
		} else {
			spec = "*"
		}
		switch {
		case r.o.plain:
			nonce, ct = "plain", base64.StdEncoding.EncodeToString(buf)
		case direct:
			nonce, ct, err = p.keys.SealDirect(spec, buf)
		default:
			nonce, ct, err = p.keys.SealGroup(buf)
		}
		if err != nil {
			r.refuse("encrypt")
			continue
		}
		r.sent.Add(1)
		t0 := time.Now()
		sctx, cancel := context.WithTimeout(ctx, benchSendTimeout)
		_, err = p.cl.Send(sctx, spec, prio, nonce, ct, "")
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			var pe *protocol.Error
			switch {
			case errors.As(err, &pe):
				r.refuse(pe.Code)
				continue
			case errors.Is(err, context.DeadlineExceeded):
				r.refuse("timeout")
				continue
			}
			r.refuse("connection")
			select {
			case <-p.cl.Done():
				return // the watcher counts the disconnect
			default:
				continue
			}
		}
		hist.record(time.Since(t0))
		r.acked.Add(1)
		if direct {
			r.expected.Add(1)
		} else {
			r.expected.Add(int64(r.meshSize[p.idx%len(r.meshSize)] - 1))
		}
	}
}

func (r *benchRun) refuse(code string) {
	r.refusedMu.Lock()
	r.refused[code]++
	r.refusedMu.Unlock()
}

// watch counts connections that end before the run closes them.
func (r *benchRun) watch(p *benchPeer) {
	<-p.cl.Done()
	if !r.closing.Load() {
		r.disconnects.Add(1)
		r.a.log.Warn("bench peer disconnected", "peer", p.idx, "close_code", p.cl.CloseCode(), "reason", p.cl.CloseReason())
	}
}

// receive reads p's pushes, checks and times them, and acknowledges them in batches: at
// most ackWait after the first of a batch arrived. The timer runs only while acks wait; a
// ticker per peer woke the load generator 50 times a second per peer, idle or not (100
// peers: 5,000 wake-ups a second, CPU taken from the brokers it shares the machine with).
func (r *benchRun) receive(ctx context.Context, p *benchPeer) {
	defer close(p.recvDone)
	const ackWait = 20 * time.Millisecond
	pending := make([]string, 0, 256)
	timer := time.NewTimer(ackWait)
	timer.Stop()
	defer timer.Stop()
	var due <-chan time.Time // nil while no ack waits
	flush := func() {
		due = nil
		timer.Stop()
		if len(pending) == 0 {
			return
		}
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_ = p.cl.AckMessages(actx, pending...)
		cancel()
		pending = pending[:0]
	}
	pushes := p.cl.Pushes()
	for {
		select {
		case push, ok := <-pushes:
			if !ok {
				return
			}
			now := time.Now()
			if push.IsSystem() {
				continue
			}
			pending = append(pending, push.MessageID)
			if len(pending) >= cap(pending) {
				flush()
			} else if due == nil {
				timer.Reset(ackWait)
				due = timer.C
			}
			r.account(p, push, now)
		case <-due:
			flush()
		}
	}
}

func (r *benchRun) account(p *benchPeer, push protocol.Push, now time.Time) {
	var pt []byte
	var err error
	if r.o.plain {
		pt, err = base64.StdEncoding.DecodeString(push.Ciphertext)
	} else {
		var o e2e.Opened
		o, err = p.keys.Open(push.Nonce, push.Ciphertext, push.SenderPubkey, push.SenderMemberPubkey)
		pt = o.Plaintext
	}
	if err != nil || len(pt) < benchHeaderSize || string(pt[:4]) != benchMagic {
		r.corrupt.Add(1)
		return
	}
	sender := int(binary.LittleEndian.Uint32(pt[4:]))
	seq := binary.LittleEndian.Uint64(pt[8:])
	sentAt := int64(binary.LittleEndian.Uint64(pt[16:]))
	if sender < 0 || sender >= len(p.seen) || seq > 1<<40 {
		r.corrupt.Add(1)
		return
	}
	bits := p.seen[sender]
	word := int(seq / 64)
	if word >= len(bits) {
		bits = append(bits, make([]uint64, word+1-len(bits)+len(bits)/2)...)
		p.seen[sender] = bits
	}
	mask := uint64(1) << (seq % 64)
	if bits[word]&mask != 0 {
		r.dups.Add(1)
		return
	}
	bits[word] |= mask
	if r.peers[sender].url == p.url {
		r.sameURL.Add(1)
	}
	p.pushHist.record(now.Sub(time.Unix(0, sentAt)))
	if r.o.pushLog != "" {
		p.pushLog = append(p.pushLog, [4]int64{sentAt, now.UnixNano() - sentAt, int64(sender), int64(p.idx)})
	}
	r.delivered.Add(1)
	r.lastDeliveryNs.Store(now.UnixNano())
}

func (a *app) printBench(rep *benchReport) error {
	if a.asJSON {
		return printJSON(a.stdout, rep)
	}
	w := a.stdout
	fmt.Fprintf(w, "mesh %s  brokers %s\n", rep.MeshSlug, strings.Join(rep.URLs, ", "))
	if rep.Storm != nil {
		printStorm(w, rep.Storm)
		return nil
	}
	s := rep.Setup
	fmt.Fprintf(w, "connections   %d opened, %d failed in %.2fs (%.0f/s); hello %s\n", s.Connections, s.Failed, s.Seconds, s.PerSecond, s.Hello)
	if s.FirstError != "" {
		fmt.Fprintf(w, "              first error: %s\n", s.FirstError)
	}
	if rep.Probe != nil {
		printProbe(w, rep.Probe)
	}
	if m := rep.Messages; m != nil {
		fmt.Fprintf(w, "sent          %d\n", m.Sent)
		fmt.Fprintf(w, "acked         %d", m.Acked)
		if len(m.Refused) > 0 {
			fmt.Fprintf(w, "  failed%s", formatCounts(m.Refused))
		}
		fmt.Fprintln(w)
		fmt.Fprintf(w, "delivered     %d of %d (%.2f%%), %d duplicates, %d corrupt, %d disconnects; %d between peers on the same URL\n",
			m.Delivered, m.Expected, m.DeliveredPct, m.Duplicates, m.Corrupt, m.Disconnects, m.SameURL)
		fmt.Fprintf(w, "throughput    %.0f acked/s over %.2fs; %.0f deliveries/s\n", m.AckedPerSec, m.SendSeconds, m.DeliveredPerSec)
		fmt.Fprintf(w, "send→ack      %s\n", m.SendToAck)
		fmt.Fprintf(w, "send→push     %s\n", m.SendToPush)
	}
	if ir := rep.Idle; ir != nil {
		printIdle(w, ir)
	}
	for _, r := range rep.RSS {
		fmt.Fprintf(w, "rss pid %-7d before %s  connected %s  after %s\n", r.PID, mib(r.BeforeKiB), mib(r.ConnectedKiB), mib(r.AfterKiB))
	}
	return nil
}

// writePushLog writes every peer's deliveries, in send order.
func writePushLog(path string, peers []*benchPeer) error {
	var all [][4]int64
	for _, p := range peers {
		all = append(all, p.pushLog...)
	}
	slices.SortFunc(all, func(a, b [4]int64) int { return cmp.Compare(a[0], b[0]) })
	var b strings.Builder
	for _, d := range all {
		fmt.Fprintf(&b, "%d %d %d %d\n", d[0], d[1], d[2], d[3])
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("push log: %w", err)
	}
	return nil
}

func mib(kib int64) string { return fmt.Sprintf("%.1f MiB", float64(kib)/1024) }
