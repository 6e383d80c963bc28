package main

// Probe and storm modes of bench: latency of single operations, one at a time, across
// replicas, and a burst of hellos. They answer "what does a replica far from the Postgres
// primary cost per operation" (run them against `broker dev --db-delay`): every number can be
// read in round trips to the database (--rtt, twice the one-way delay).

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/client/e2e"
	"github.com/claudemesh/broker/protocol"
)

const (
	// probeWarmup repetitions of each operation run before the measured ones and are not
	// counted: they open pool connections and prepare statements on every replica.
	probeWarmup = 3
	// probeOpTimeout bounds one probed operation; a broker that stops answering fails the
	// repetition rather than hanging the run.
	probeOpTimeout = 30 * time.Second
	// repsPerHeldPeer bounds the hook repetitions one held peer takes part in: brokers
	// rate-limit hooks per pid + cwd (HOOK_RATE_LIMIT_PER_MIN, 30 with a burst of 30) and each
	// repetition sends two, so repetitions rotate over enough peers to stay inside the burst.
	repsPerHeldPeer = 10
	// stormHandshakeTimeout is how long a storm hello may wait for its answer: long enough that
	// a slow answer is measured as slow rather than counted as lost.
	stormHandshakeTimeout = 60 * time.Second
)

// Probe operation names, in the order they run and are reported.
const (
	opHello     = "hello"
	opSendAck   = "send_ack"
	opSendPush  = "send_push"
	opHookPush  = "hook_push"
	opListPeers = "list_peers"
)

// probeReport is the result of --probe: per operation, latencies over the repetitions.
type probeReport struct {
	Repetitions int       `json:"repetitions"`
	Warmup      int       `json:"warmup"`
	RTTMs       float64   `json:"rttMs,omitempty"`
	ReplicaA    string    `json:"replicaA"`
	ReplicaB    string    `json:"replicaB"`
	ReplicaC    string    `json:"replicaC"`
	Operations  []probeOp `json:"operations"`
}

// probeOp is one operation's latencies in ms, and in round trips when --rtt is given.
type probeOp struct {
	Name       string  `json:"name"`
	What       string  `json:"what"`
	Count      int     `json:"count"`
	Failed     int     `json:"failed,omitempty"`
	FirstError string  `json:"firstError,omitempty"`
	MedianMs   float64 `json:"medianMs"`
	P90Ms      float64 `json:"p90Ms"`
	MaxMs      float64 `json:"maxMs"`
	MedianRTT  float64 `json:"medianRtt,omitempty"`
	P90RTT     float64 `json:"p90Rtt,omitempty"`
	MaxRTT     float64 `json:"maxRtt,omitempty"`
}

// stormReport is the result of --storm.
type stormReport struct {
	Members int `json:"members"`
	OK      int `json:"ok"`
	Refused int `json:"refused"`
	// RefusedBy counts refusals by the broker's error code (overloaded, internal, capacity,
	// ...), "closed_<code>" for a close without an error frame, "http_<status>" for a refused
	// upgrade, "timeout" for no answer, "dial" for the rest.
	RefusedBy     map[string]int `json:"refusedBy,omitempty"`
	FirstError    string         `json:"firstError,omitempty"`
	LastAnswerMs  float64        `json:"lastAnswerMs"`
	LastAnswerRTT float64        `json:"lastAnswerRtt,omitempty"`
	RTTMs         float64        `json:"rttMs,omitempty"`
	Hello         latencyReport  `json:"helloLatency"` // of the answered OK
}

// probePeer is a long-lived session of the probe; watch stamps its pushes on arrival.
type probePeer struct {
	m         *benchMember
	sessionID string
	pid       int
	cwd       string
	cl        *client.Client
	arrivals  chan arrival
}

type arrival struct {
	messageID string
	at        time.Time
}

// watch reads every channel of the peer's client (a full one would stall its read loop) and
// passes pushes on with the time they came off the socket, so a probe waiting on something
// else does not add its own wait to a push's latency.
func (p *probePeer) watch() {
	pushes, changes, errs := p.cl.Pushes(), p.cl.StateChanges(), p.cl.Errors()
	defer close(p.arrivals)
	for pushes != nil || changes != nil || errs != nil {
		select {
		case push, ok := <-pushes:
			if !ok {
				pushes = nil
				continue
			}
			if push.IsSystem() {
				continue
			}
			select {
			case p.arrivals <- arrival{messageID: push.MessageID, at: time.Now()}:
			default: // nobody waits for it: a probe reads only the push it caused
			}
		case _, ok := <-changes:
			if !ok {
				changes = nil
			}
		case _, ok := <-errs:
			if !ok {
				errs = nil
			}
		}
	}
}

// await returns when the push of messageID arrived, skipping older ones.
func (p *probePeer) await(ctx context.Context, messageID string) (time.Time, error) {
	for {
		select {
		case a, ok := <-p.arrivals:
			if !ok {
				return time.Time{}, fmt.Errorf("connection of %s ended: %w", p.m.name, p.cl.Err())
			}
			if a.messageID == messageID {
				return a.at, nil
			}
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("push %s to %s: %w", messageID, p.m.name, ctx.Err())
		}
	}
}

// arrived reports, without waiting, whether the push of messageID is already there.
func (p *probePeer) arrived(messageID string) bool {
	for {
		select {
		case a, ok := <-p.arrivals:
			if !ok || a.messageID == messageID {
				return ok
			}
		default:
			return false
		}
	}
}

// probeRun holds the probe's sessions.
type probeRun struct {
	a        *app
	o        benchOpts
	mesh     *benchMesh
	urlA     string
	hookBase string // replica C's HTTP base
	rtt      time.Duration
	sender   *probePeer   // on A: sends, lists peers
	receiver *probePeer   // on B: receives the probe's sends, sends the held messages
	held     []*probePeer // on A: set working by a hook, released by the next
	hello    *benchMember // dialled fresh to A for every hello
	keys     *e2e.Keyring // the sender's
	recvKeys *e2e.Keyring // the receiver's
	probed   atomic.Int64 // operations done, for the progress bar
}

func (a *app) benchProbe(ctx context.Context, o benchOpts) error {
	n := o.probe
	urlA, urlB, urlC := o.urls[0], o.urls[1%len(o.urls)], o.urls[2%len(o.urls)]
	hookBase, err := httpBaseURL(urlC)
	if err != nil {
		return err
	}
	// Sessions: the sender on A, the receiver on B, the held peers on A; one more member
	// for the hellos.
	peerURLs := []string{urlA, urlB}
	for range (n + probeWarmup + repsPerHeldPeer - 1) / repsPerHeldPeer {
		peerURLs = append(peerURLs, urlA)
	}
	members := len(peerURLs) + 1
	// Every hello adds a session that may linger until the broker ends it: room for all.
	mesh, err := setupBenchMesh(ctx, o.setup(members, members+n+probeWarmup+16))
	if err != nil {
		return err
	}
	r := &probeRun{a: a, o: o, mesh: mesh, urlA: urlA, hookBase: hookBase, rtt: o.rtt, hello: &mesh.members[len(peerURLs)]}
	peers := make([]*probePeer, len(peerURLs))
	var run [4]byte
	_, _ = rand.Read(run[:])
	for i := range peers {
		m := &mesh.members[i]
		peers[i] = &probePeer{m: m, sessionID: fmt.Sprintf("probe-%x-%d", run, i), pid: 4000 + i,
			cwd: fmt.Sprintf("/bench/%s/probe-%d", mesh.slug, i), arrivals: make(chan arrival, 64)}
	}
	var dialed atomic.Int64
	// One at a time, as the probe runs: concurrent hellos queue on the mesh's capacity lock,
	// which far from the database takes longer than an older broker's hello timeout.
	serial := o
	serial.dialConcurrency = 1
	setup, clients := a.dialMany(ctx, serial, len(peers), func(i int) client.Options {
		p := peers[i]
		return client.Options{URL: peerURLs[i], MeshID: mesh.id, MemberID: p.m.id, MemberKey: p.m.key, DisplayName: p.m.name,
			SessionID: p.sessionID, PID: p.pid, CWD: p.cwd, Logger: a.log}
	}, &dialed)
	defer closeAll(clients)
	if setup.Failed > 0 {
		return fmt.Errorf("bench probe: %d of %d sessions could not connect (first error: %s)", setup.Failed, len(peers), setup.FirstError)
	}
	for i, cl := range clients {
		peers[i].cl = cl
		go peers[i].watch()
	}
	r.sender, r.receiver, r.held = peers[0], peers[1], peers[2:]
	r.keys = e2e.NewKeyring(r.sender.m.key, mesh.root)
	r.recvKeys = e2e.NewKeyring(r.receiver.m.key, mesh.root)

	pr := &probeReport{Repetitions: n, Warmup: probeWarmup, RTTMs: ms(o.rtt), ReplicaA: urlA, ReplicaB: urlB, ReplicaC: urlC}
	bar := startProgress(a.stderr, !o.noProgress, func() (float64, string) {
		done := r.probed.Load()
		return float64(done) / 4, fmt.Sprintf("%d/4 operations probed", done)
	})
	hello := r.probe(ctx, opHello, "hello → hello_ack, fresh dial to A", r.helloOnce)
	sendAck, sendPush := r.probeSend(ctx)
	hook := r.probe(ctx, opHookPush, "hook idle on C → held next pushed on A", r.hookOnce)
	list := r.probe(ctx, opListPeers, "list_peers on A", func(ctx context.Context, _ int) (time.Duration, error) {
		t0 := time.Now()
		_, err := r.sender.cl.ListPeers(ctx)
		return time.Since(t0), err
	})
	bar.Stop()
	pr.Operations = []probeOp{hello, sendAck, sendPush, hook, list}
	return a.printBench(&benchReport{Mode: "probe", URLs: o.urls, MeshID: mesh.id, MeshSlug: mesh.slug, Setup: setup, Probe: pr})
}

// probe runs op warm-up + n times, one at a time, and summarises the measured repetitions.
func (r *probeRun) probe(ctx context.Context, name, what string, op func(ctx context.Context, i int) (time.Duration, error)) probeOp {
	var samples []time.Duration
	res := probeOp{Name: name, What: what}
	for i := range probeWarmup + r.o.probe {
		if ctx.Err() != nil {
			break
		}
		octx, cancel := context.WithTimeout(ctx, probeOpTimeout)
		d, err := op(octx, i)
		cancel()
		if i < probeWarmup {
			continue
		}
		if err != nil {
			res.Failed++
			if res.FirstError == "" {
				res.FirstError = err.Error()
			}
			continue
		}
		samples = append(samples, d)
	}
	res.fill(samples, r.rtt)
	r.probed.Add(1)
	return res
}

// probeSend times sends from A to B: each gives a send → ack and a send → push sample.
func (r *probeRun) probeSend(ctx context.Context) (probeOp, probeOp) {
	var pushes []time.Duration
	var pushErr error
	ack := r.probe(ctx, opSendAck, "send on A → ack (recipient on B)", func(ctx context.Context, i int) (time.Duration, error) {
		nonce, ct, err := r.keys.SealDirect(r.receiver.m.pub, fmt.Appendf(nil, "probe %d", i))
		if err != nil {
			return 0, err
		}
		t0 := time.Now()
		a, err := r.sender.cl.Send(ctx, r.receiver.m.pub, protocol.PriorityNow, nonce, ct, "")
		took := time.Since(t0)
		if err != nil {
			return 0, err
		}
		at, err := r.receiver.await(ctx, a.MessageID)
		if i >= probeWarmup {
			if err != nil {
				pushErr = cmpOr(pushErr, err)
			} else {
				pushes = append(pushes, at.Sub(t0))
			}
		}
		return took, nil
	})
	push := probeOp{Name: opSendPush, What: "send on A → push on B"}
	push.fill(pushes, r.rtt)
	push.Failed = ack.Count - push.Count + ack.Failed
	if pushErr != nil {
		push.FirstError = pushErr.Error()
	} else if ack.FirstError != "" {
		push.FirstError = ack.FirstError
	}
	return ack, push
}

func cmpOr(err, next error) error {
	if err != nil {
		return err
	}
	return next
}

// helloOnce dials a fresh session of the hello member to A and closes it.
func (r *probeRun) helloOnce(ctx context.Context, i int) (time.Duration, error) {
	m := r.hello
	t0 := time.Now()
	cl, err := client.Dial(ctx, client.Options{URL: r.urlA, MeshID: r.mesh.id, MemberID: m.id, MemberKey: m.key,
		DisplayName: m.name, SessionID: fmt.Sprintf("probe-hello-%s-%d", r.mesh.slug, i), PID: 3000 + i,
		CWD: "/bench/" + r.mesh.slug + "/hello", Logger: r.a.log})
	took := time.Since(t0)
	if err != nil {
		return 0, err
	}
	_ = cl.Close()
	return took, nil
}

// hookOnce: a signed hook sets a held peer on A working, the receiver on B sends it a `next`
// message, which the broker holds; then the timed part: the hook `idle` posted to C until the
// held message is pushed on A.
func (r *probeRun) hookOnce(ctx context.Context, i int) (time.Duration, error) {
	p := r.held[i%len(r.held)]
	if err := r.postHook(ctx, p, protocol.StatusWorking); err != nil {
		return 0, fmt.Errorf("hook working: %w", err)
	}
	nonce, ct, err := r.recvKeys.SealDirect(p.m.pub, fmt.Appendf(nil, "held %d", i))
	if err != nil {
		return 0, err
	}
	a, err := r.receiver.cl.Send(ctx, p.m.pub, protocol.PriorityNext, nonce, ct, "")
	if err != nil {
		return 0, fmt.Errorf("send next: %w", err)
	}
	// The release is only meaningful if the message waited: a recipient that was not working
	// got it already (or has it on the way, which message_status shows as delivered).
	if st, err := r.receiver.cl.MessageStatus(ctx, a.MessageID); err == nil {
		for _, rc := range st.Recipients {
			if rc.Status == protocol.RecipientDelivered {
				return 0, fmt.Errorf("message %s was not held: %s is %s", a.MessageID, p.m.name, rc.Status)
			}
		}
	}
	if p.arrived(a.MessageID) {
		return 0, fmt.Errorf("message %s was not held: pushed before the hook", a.MessageID)
	}
	t0 := time.Now()
	hookErr := make(chan error, 1)
	go func() { hookErr <- r.postHook(ctx, p, protocol.StatusIdle) }()
	at, err := p.await(ctx, a.MessageID)
	if herr := <-hookErr; herr != nil {
		return 0, fmt.Errorf("hook idle: %w", herr)
	}
	if err != nil {
		return 0, err
	}
	return at.Sub(t0), nil
}

// postHook posts a hook for p's session to replica C, signed with p's member key as
// `meshctl hook` signs (brokers without signed hooks ignore the extra fields).
func (r *probeRun) postHook(ctx context.Context, p *probePeer, status protocol.Status) error {
	req := protocol.HookRequest{CWD: p.cwd, PID: p.pid, Status: status, SessionID: p.sessionID}
	protocol.SignHook(p.m.key, &req, time.Now())
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	return postHook(ctx, r.hookBase, body, r.a.getenv(hookTokenEnv))
}

// fill sets the statistics of samples: exact order statistics (a probe has few samples).
func (op *probeOp) fill(samples []time.Duration, rtt time.Duration) {
	op.Count = len(samples)
	if len(samples) == 0 {
		return
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	n := len(s)
	median := s[n/2]
	if n%2 == 0 {
		median = (s[n/2-1] + s[n/2]) / 2
	}
	p90 := s[max(int(math.Ceil(0.9*float64(n)))-1, 0)]
	op.MedianMs, op.P90Ms, op.MaxMs = ms(median), ms(p90), ms(s[n-1])
	if rtt > 0 {
		op.MedianRTT, op.P90RTT, op.MaxRTT = rtts(median, rtt), rtts(p90, rtt), rtts(s[n-1], rtt)
	}
}

// ms is d in milliseconds, rounded to µs.
func ms(d time.Duration) float64 { return math.Round(float64(d)/float64(time.Microsecond)) / 1000 }

// rtts is d in round trips of rtt, two decimals.
func rtts(d, rtt time.Duration) float64 { return math.Round(float64(d)/float64(rtt)*100) / 100 }

// benchStorm has o.storm members dial replica A at the same instant.
func (a *app) benchStorm(ctx context.Context, o benchOpts) error {
	n := o.storm
	mesh, err := setupBenchMesh(ctx, o.setup(n, n+16))
	if err != nil {
		return err
	}
	urlA := o.urls[0]
	var run [4]byte
	_, _ = rand.Read(run[:])
	type answer struct {
		cl   *client.Client
		err  error
		took time.Duration
	}
	answers := make([]answer, n)
	start := make(chan struct{})
	var ready, wg sync.WaitGroup
	var t0 time.Time
	for i := range n {
		m := &mesh.members[i]
		opts := client.Options{URL: urlA, MeshID: mesh.id, MemberID: m.id, MemberKey: m.key, DisplayName: m.name,
			SessionID: fmt.Sprintf("storm-%x-%d", run, i), PID: 5000 + i, CWD: "/bench/" + mesh.slug + "/storm",
			HandshakeTimeout: stormHandshakeTimeout, Logger: a.log}
		ready.Add(1)
		wg.Go(func() {
			ready.Done()
			<-start
			cl, err := client.Dial(ctx, opts)
			answers[i] = answer{cl: cl, err: err, took: time.Since(t0)}
		})
	}
	ready.Wait() // every goroutine is parked on start: they leave together
	t0 = time.Now()
	close(start)
	wg.Wait()

	sr := &stormReport{Members: n, RTTMs: ms(o.rtt)}
	var clients []*client.Client
	var hist histogram
	var last time.Duration
	for _, ans := range answers {
		if ans.err == nil {
			clients = append(clients, ans.cl)
			sr.OK++
			hist.record(ans.took)
			last = max(last, ans.took)
			continue
		}
		code := refusalCode(ans.err)
		if sr.RefusedBy == nil {
			sr.RefusedBy = map[string]int{}
		}
		sr.RefusedBy[code]++
		sr.Refused++
		if sr.FirstError == "" {
			sr.FirstError = ans.err.Error()
		}
		if code != "timeout" {
			last = max(last, ans.took)
		}
	}
	closeAll(clients)
	sr.LastAnswerMs = ms(last)
	if o.rtt > 0 {
		sr.LastAnswerRTT = rtts(last, o.rtt)
	}
	sr.Hello = hist.report()
	setup := setupReport{Connections: sr.OK, Failed: sr.Refused, Seconds: round3(last.Seconds()), Hello: sr.Hello, FirstError: sr.FirstError}
	if last > 0 {
		setup.PerSecond = math.Round(float64(sr.OK) / last.Seconds())
	}
	return a.printBench(&benchReport{Mode: "storm", URLs: o.urls, MeshID: mesh.id, MeshSlug: mesh.slug, Setup: setup, Storm: sr})
}

var httpStatusRe = regexp.MustCompile(`HTTP (\d{3})`)

// refusalCode names why a hello got no hello_ack (see stormReport.RefusedBy).
func refusalCode(err error) string {
	var he *client.HelloError
	switch {
	case errors.As(err, &he) && he.Code != "":
		return he.Code
	case he != nil:
		return fmt.Sprintf("closed_%d", he.CloseCode)
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	}
	if m := httpStatusRe.FindStringSubmatch(err.Error()); m != nil {
		return "http_" + m[1]
	}
	return "dial"
}

func printProbe(w io.Writer, p *probeReport) {
	rtt := "no --rtt"
	if p.RTTMs > 0 {
		rtt = fmt.Sprintf("RTT %g ms", p.RTTMs)
	}
	fmt.Fprintf(w, "probe         %d repetitions of each operation, one at a time, after %d warm-up; %s\n", p.Repetitions, p.Warmup, rtt)
	fmt.Fprintf(w, "replicas      A %s  B %s  C %s\n\n", p.ReplicaA, p.ReplicaB, p.ReplicaC)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	header := "operation\tmedian ms\tp90 ms\tmax ms\t"
	if p.RTTMs > 0 {
		header += "median RTT\tp90 RTT\tmax RTT\t"
	}
	fmt.Fprintln(tw, header+"n\tfailed\t")
	for _, op := range p.Operations {
		line := fmt.Sprintf("%s\t%.2f\t%.2f\t%.2f\t", op.What, op.MedianMs, op.P90Ms, op.MaxMs)
		if p.RTTMs > 0 {
			line += fmt.Sprintf("%.2f\t%.2f\t%.2f\t", op.MedianRTT, op.P90RTT, op.MaxRTT)
		}
		fmt.Fprintf(tw, "%s%d\t%d\t\n", line, op.Count, op.Failed)
	}
	_ = tw.Flush()
	for _, op := range p.Operations {
		if op.FirstError != "" {
			fmt.Fprintf(w, "%s: first error: %s\n", op.Name, op.FirstError)
		}
	}
}

func printStorm(w io.Writer, s *stormReport) {
	fmt.Fprintf(w, "storm         %d members said hello to A at once: %d answered OK, %d refused%s\n", s.Members, s.OK, s.Refused, formatCounts(s.RefusedBy))
	last := fmt.Sprintf("%.2f ms", s.LastAnswerMs)
	if s.RTTMs > 0 {
		last += fmt.Sprintf(" (%.2f RTT of %g ms)", s.LastAnswerRTT, s.RTTMs)
	}
	fmt.Fprintf(w, "last answer   after %s\n", last)
	fmt.Fprintf(w, "hello_ack     %s\n", s.Hello)
	if s.FirstError != "" {
		fmt.Fprintf(w, "first error   %s\n", s.FirstError)
	}
}

// formatCounts prints " (a=1 b=2)" in key order, "" for none.
func formatCounts[V int | int64](m map[string]V) string {
	if len(m) == 0 {
		return ""
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, m[k])
	}
	return " (" + strings.Join(parts, " ") + ")"
}
