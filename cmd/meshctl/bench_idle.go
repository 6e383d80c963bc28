package main

// Idle mode of bench: many authenticated sessions that say hello and then stay quiet, spread
// over one or several meshes and round-robin over the URLs. It measures the set-up rate
// (hellos per second, cluster-wide) and the brokers' memory per session, and, with
// --kill-pid, a failover: one replica process is killed with SIGKILL while the sessions are
// held, every session it held dials another URL at once, and the report gives the time from
// the kill until each of them (and the last) had a new hello_ack, that is until the cluster had
// registered it again on a surviving replica.

import (
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/claudemesh/broker/client"
)

// idleMembersPerMesh caps the members of an idle mesh: sessions share members beyond it (a
// member may hold many sessions), which keeps the set-up (one audited insert per member) short.
const idleMembersPerMesh = 100

// reconnectBackoff paces a dropped session's retries after a refused dial: the first dial is
// immediate, then each refusal (overloaded, a full gate, a dial error) waits a jittered
// 25 ms .. 1 s before trying the next URL, as a real peer backs off instead of hammering.
var reconnectBackoff = client.Backoff{Min: 50 * time.Millisecond, Max: time.Second}

type idleReport struct {
	Opened         int     `json:"opened"`
	Alive          int     `json:"aliveAfterHold"`
	HoldS          float64 `json:"holdSeconds"`
	Meshes         int     `json:"meshes"`
	MembersPerMesh int     `json:"membersPerMesh"`
	PerConnKiB     float64 `json:"perConnectionKiB,omitempty"` // total RSS delta / opened
	// Failover is the --kill-pid measurement.
	Failover *failoverReport `json:"failover,omitempty"`
}

// failoverReport: what happened to the sessions after the kill. Times are from the kill.
type failoverReport struct {
	KilledPID  int     `json:"killedPid"`
	KillAfterS float64 `json:"killAfterSeconds"` // after the set-up ended
	// VictimURL is the URL whose sessions dropped first after the kill, and SessionsOnVictim
	// how many sessions were connected to it then: the ones that must come back.
	VictimURL        string `json:"victimUrl,omitempty"`
	SessionsOnVictim int    `json:"sessionsOnVictim"`
	// DroppedBeforeKill counts connections that ended before the kill (they reconnect too,
	// but are not timed).
	DroppedBeforeKill int `json:"droppedBeforeKill,omitempty"`
	// Dropped counts connections that ended after the kill (by URL in DroppedFrom);
	// Reconnected of them got a new hello_ack (by URL in ReconnectedTo, Resumed of them with
	// resumed=true), Failed did not within --failover-timeout.
	Dropped       int            `json:"dropped"`
	DroppedFrom   map[string]int `json:"droppedFrom,omitempty"`
	Reconnected   int            `json:"reconnected"`
	ReconnectedTo map[string]int `json:"reconnectedTo,omitempty"`
	Resumed       int            `json:"resumed"`
	Failed        int            `json:"failed"`
	// StillDialing counts dropped sessions neither back nor failed when the run ended.
	StillDialing int `json:"stillDialing,omitempty"`
	// Attempts counts reconnect dials; RefusedBy the failed ones by code (as the storm's).
	Attempts   int            `json:"attempts"`
	RefusedBy  map[string]int `json:"refusedBy,omitempty"`
	FirstError string         `json:"firstError,omitempty"`
	// AllBackMs: from the kill to the last dropped session's new hello_ack (0 if none came
	// back); Complete says whether every dropped session came back.
	AllBackMs float64 `json:"allBackMs"`
	Complete  bool    `json:"complete"`
	// Per dropped session: kill → connection ended on the client, kill → new hello_ack, and
	// the successful reconnect dial alone (connect, upgrade, hello, hello_ack).
	KillToDrop     latencyReport `json:"killToDrop"`
	KillToHelloAck latencyReport `json:"killToHelloAck"`
	ReconnectDial  latencyReport `json:"reconnectDial"`
}

// idleSession is one session of idle mode. A failover moves it to another URL; its options
// (mesh, member, sessionId) stay, so the new hello takes over its presence.
type idleSession struct {
	opts client.Options // URL set per dial
	n    int            // its index in the run: where it starts among the other URLs after a drop

	mu  sync.Mutex
	url int // index in the URLs of its current connection
	cl  *client.Client
}

func (s *idleSession) current() (*client.Client, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cl, s.url
}

type idleRun struct {
	a        *app
	o        benchOpts
	sessions []*idleSession
	closing  atomic.Bool
	fo       *failover // nil without --kill-pid
}

// benchIdle opens o.idleConns sessions over o.meshes meshes and holds them (see the file
// comment).
func (a *app) benchIdle(ctx context.Context, o benchOpts) error {
	if o.meshes > o.idleConns {
		return fmt.Errorf("bench: --meshes %d is more than the %d sessions", o.meshes, o.idleConns)
	}
	if o.killPID != 0 && len(o.urls) < 2 {
		return errors.New("bench: --kill-pid needs at least two --urls: the dropped sessions fail over to the others")
	}
	if o.killPID < 0 || o.killAfter < 0 || o.failoverTimeout <= 0 {
		return errors.New("bench: --kill-pid, --kill-after and --failover-timeout must be positive")
	}
	perMesh := (o.idleConns + o.meshes - 1) / o.meshes
	members := min(perMesh, idleMembersPerMesh)
	setupSpec := o.setup(members, perMesh+16)
	var meshes []*benchMesh
	var err error
	if o.meshes == 1 {
		var m *benchMesh
		m, err = setupBenchMesh(ctx, setupSpec)
		meshes = []*benchMesh{m}
	} else {
		meshes, err = setupBenchMeshes(ctx, setupSpec, o.meshes)
	}
	if err != nil {
		return err
	}
	rep := &benchReport{Mode: "idle", URLs: o.urls, MeshID: meshes[0].id, MeshSlug: meshes[0].slug, Config: benchSummary{Peers: o.idleConns}}
	probe := newRSSProbe(o.pids)
	warn := func(err error) { fmt.Fprintln(a.stderr, "meshctl bench: rss:", err) }
	probe.sample(func(r *rssReport) *int64 { return &r.BeforeKiB }, warn)

	r := &idleRun{a: a, o: o, sessions: make([]*idleSession, o.idleConns)}
	var run [4]byte
	_, _ = crand.Read(run[:])
	for i := range r.sessions {
		// Mesh i mod M and URL i mod U: with M and U coprime (250 and 3) every mesh has sessions
		// on every replica, as a mesh of peers spread over a cluster does.
		mesh := meshes[i%len(meshes)]
		m := &mesh.members[(i/len(meshes))%members]
		r.sessions[i] = &idleSession{n: i, url: i % len(o.urls), opts: client.Options{MeshID: mesh.id, MemberID: m.id,
			MemberKey: m.key, DisplayName: m.name, SessionID: fmt.Sprintf("idle-%x-%d", run, i), PID: i + 1,
			CWD: "/bench/idle", PushBuffer: 4, EventBuffer: 4, Logger: a.log}}
	}

	var dialed atomic.Int64
	bar := startProgress(a.stderr, !o.noProgress, func() (float64, string) {
		n := dialed.Load()
		return float64(n) / float64(o.idleConns), fmt.Sprintf("%d/%d sessions", n, o.idleConns)
	})
	setup, clients := a.dialMany(ctx, o, o.idleConns, func(i int) client.Options {
		s := r.sessions[i]
		opts := s.opts
		opts.URL = o.urls[s.url]
		return opts
	}, &dialed)
	bar.Stop()
	rep.Setup = setup
	setupEnd := time.Now()
	probe.sample(func(r *rssReport) *int64 { return &r.ConnectedKiB }, warn)

	if o.killPID != 0 {
		r.fo = newFailover(o)
	}
	runCtx, cancel := context.WithCancel(ctx)
	var keepers sync.WaitGroup
	for i, cl := range clients {
		if cl == nil {
			continue
		}
		s := r.sessions[i]
		s.cl = cl
		keepers.Go(func() { r.keep(runCtx, s) })
	}
	// However the run ends, the sessions close and their keepers with them.
	defer func() {
		r.closeSessions(cancel)
		keepers.Wait()
	}()

	if r.fo != nil {
		if !sleepCtx(ctx, o.killAfter) {
			return ctx.Err()
		}
		if err := r.fo.kill(); err != nil {
			return err
		}
		select {
		case <-r.fo.done:
		case <-time.After(o.failoverTimeout):
			// The dropped sessions that are still dialing give up at their own deadline.
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	sleepCtx(ctx, time.Until(setupEnd.Add(o.hold)))
	probe.sample(func(r *rssReport) *int64 { return &r.AfterKiB }, warn)
	alive := 0
	for _, s := range r.sessions {
		if cl, _ := s.current(); cl != nil && cl.Err() == nil {
			alive++
		}
	}
	ir := &idleReport{Opened: setup.Connections, Alive: alive, HoldS: o.hold.Seconds(), Meshes: len(meshes), MembersPerMesh: members}
	if len(o.pids) > 0 && setup.Connections > 0 {
		delta := probe.total(func(r *rssReport) *int64 { return &r.ConnectedKiB }) - probe.total(func(r *rssReport) *int64 { return &r.BeforeKiB })
		ir.PerConnKiB = math.Round(float64(delta)/float64(setup.Connections)*100) / 100
		rep.RSS = probe.reports
	}
	if r.fo != nil {
		ir.Failover = r.fo.report(setupEnd)
	}
	rep.Idle = ir
	return a.printBench(rep)
}

// closeSessions ends the run: no session reconnects any more, and every open one is closed.
func (r *idleRun) closeSessions(cancel context.CancelFunc) {
	r.closing.Store(true)
	cancel()
	var open []*client.Client
	for _, s := range r.sessions {
		// Under the session's lock, after closing is set: a reconnect that lands later sees
		// closing under the same lock and closes its client itself.
		if cl, _ := s.current(); cl != nil {
			open = append(open, cl)
		}
	}
	closeAll(open)
}

// keep reads an idle session's odd frames (pings, events) until its connection ends; with
// --kill-pid it then dials another URL and carries on with the new connection.
func (r *idleRun) keep(ctx context.Context, s *idleSession) {
	for {
		cl, from := s.current()
		discardEvents(cl) // returns once the connection ended: its channels are closed
		if r.closing.Load() || r.fo == nil {
			return
		}
		if !r.reconnect(ctx, s, from, r.fo.noteDrop(from, r.sessions)) {
			return
		}
	}
}

// reconnect dials the other URLs in turn, never from itself, until one answers with a
// hello_ack, the session's failover deadline passes or the run ends. The dropped sessions
// start at different URLs, spread over the others as a round-robin load balancer would
// spread their reconnects, rather than all trying the next URL first.
func (r *idleRun) reconnect(ctx context.Context, s *idleSession, from int, droppedAt time.Time) bool {
	urls := r.o.urls
	ctx, cancel := context.WithDeadline(ctx, droppedAt.Add(r.o.failoverTimeout))
	defer cancel()
	bo := reconnectBackoff
	hop := s.n / len(urls) // consecutive sessions of one URL start at different others
	for {
		to := (from + 1 + hop%(len(urls)-1)) % len(urls)
		hop++
		opts := s.opts
		opts.URL = urls[to]
		t0 := time.Now()
		cl, err := client.Dial(ctx, opts)
		if err == nil {
			s.mu.Lock()
			if r.closing.Load() {
				s.mu.Unlock()
				_ = cl.Close()
				return false
			}
			s.cl, s.url = cl, to
			s.mu.Unlock()
			r.fo.noteBack(urls[to], time.Now(), time.Since(t0), cl.HelloAck().Resumed)
			return true
		}
		if r.closing.Load() {
			return false
		}
		r.fo.noteRefused(err)
		if ctx.Err() != nil || !sleepCtx(ctx, bo.Next()) {
			r.fo.noteFailed()
			return false
		}
	}
}

// failover records what the sessions do after the kill.
type failover struct {
	pid       int
	killAfter time.Duration
	urls      []string

	mu         sync.Mutex
	killAt     time.Time // zero until the kill
	victim     int       // index of the first URL that dropped sessions after the kill, -1 before
	onVictim   int
	early      int
	dropped    int
	back       int
	failedN    int
	resumed    int
	attempts   int
	from, to   map[string]int
	refusedBy  map[string]int
	firstErr   string
	lastBack   time.Duration
	detect     histogram
	backHist   histogram
	redialHist histogram
	done       chan struct{} // closed when every session of the victim dropped and every drop ended
	doneOnce   sync.Once
}

func newFailover(o benchOpts) *failover {
	return &failover{pid: o.killPID, killAfter: o.killAfter, urls: o.urls, victim: -1,
		from: map[string]int{}, to: map[string]int{}, refusedBy: map[string]int{}, done: make(chan struct{})}
}

// kill sends SIGKILL to the replica. The kill time is taken just before the signal: every
// latency is counted from it.
func (f *failover) kill() error {
	f.mu.Lock()
	f.killAt = time.Now()
	f.mu.Unlock()
	// os.Process.Kill is SIGKILL on Unix: the replica gets no chance to close its sockets
	// or mark its node stopped, as in a crash.
	p, err := os.FindProcess(f.pid)
	if err == nil {
		err = p.Kill()
	}
	if err != nil {
		return fmt.Errorf("bench: kill -9 %d: %w", f.pid, err)
	}
	return nil
}

// noteDrop records that s's connection to URL from ended, and returns when.
func (f *failover) noteDrop(from int, sessions []*idleSession) time.Time {
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.killAt.IsZero() {
		f.early++
		return now
	}
	if f.victim < 0 {
		// The first drop after the kill names the victim: every session connected to it now
		// has lost its connection or is about to, and none has moved yet (a session moves
		// only after its drop is recorded here). Session locks are only ever taken alone or
		// under this one, never the other way round.
		f.victim = from
		for _, o := range sessions {
			if cl, url := o.current(); url == from && cl != nil {
				f.onVictim++
			}
		}
	}
	f.dropped++
	f.from[f.urls[from]]++
	f.detect.record(now.Sub(f.killAt))
	return now
}

func (f *failover) noteBack(url string, at time.Time, dial time.Duration, resumed bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.killAt.IsZero() {
		return // back from a drop before the kill: not timed
	}
	f.back++
	f.to[url]++
	if resumed {
		f.resumed++
	}
	took := at.Sub(f.killAt)
	f.lastBack = max(f.lastBack, took)
	f.backHist.record(took)
	f.redialHist.record(dial)
	f.checkDone()
}

func (f *failover) noteRefused(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.attempts++
	f.refusedBy[refusalCode(err)]++
	if f.firstErr == "" {
		f.firstErr = err.Error()
	}
}

func (f *failover) noteFailed() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failedN++
	f.checkDone()
}

// checkDone closes done once the victim's sessions all dropped and every drop came back or
// gave up. Called with mu held.
func (f *failover) checkDone() {
	if f.victim >= 0 && f.dropped >= f.onVictim && f.back+f.failedN >= f.dropped {
		f.doneOnce.Do(func() { close(f.done) })
	}
}

func (f *failover) report(setupEnd time.Time) *failoverReport {
	f.mu.Lock()
	defer f.mu.Unlock()
	r := &failoverReport{KilledPID: f.pid, KillAfterS: round3(f.killAt.Sub(setupEnd).Seconds()), SessionsOnVictim: f.onVictim,
		DroppedBeforeKill: f.early, Dropped: f.dropped, Reconnected: f.back, Resumed: f.resumed, Failed: f.failedN,
		StillDialing: max(f.dropped-f.back-f.failedN, 0), Attempts: f.attempts + f.back, FirstError: f.firstErr, AllBackMs: ms(f.lastBack),
		Complete:   f.victim >= 0 && f.back >= f.dropped && f.dropped >= f.onVictim,
		KillToDrop: f.detect.report(), KillToHelloAck: f.backHist.report(), ReconnectDial: f.redialHist.report()}
	if f.victim >= 0 {
		r.VictimURL = f.urls[f.victim]
	}
	if len(f.from) > 0 {
		r.DroppedFrom = f.from
	}
	if len(f.to) > 0 {
		r.ReconnectedTo = f.to
	}
	if len(f.refusedBy) > 0 {
		r.RefusedBy = f.refusedBy
	}
	return r
}

func printIdle(w io.Writer, ir *idleReport) {
	fmt.Fprintf(w, "idle          %d sessions in %d mesh(es) (%d members each) held %.0fs, %d still open\n",
		ir.Opened, ir.Meshes, ir.MembersPerMesh, ir.HoldS, ir.Alive)
	if ir.PerConnKiB != 0 {
		fmt.Fprintf(w, "memory        %.1f KiB per connection (broker RSS delta / sessions)\n", ir.PerConnKiB)
	}
	f := ir.Failover
	if f == nil {
		return
	}
	fmt.Fprintf(w, "failover      kill -9 %d at %.1fs after the set-up; %d sessions on %s\n", f.KilledPID, f.KillAfterS, f.SessionsOnVictim, cmpOrStr(f.VictimURL, "(no URL dropped)"))
	fmt.Fprintf(w, "              %d dropped, %d back (%d resumed), %d failed, %d still dialing; %d dials%s\n",
		f.Dropped, f.Reconnected, f.Resumed, f.Failed, f.StillDialing, f.Attempts, formatCounts(f.RefusedBy))
	if f.DroppedBeforeKill > 0 {
		fmt.Fprintf(w, "              %d dropped before the kill\n", f.DroppedBeforeKill)
	}
	if len(f.ReconnectedTo) > 0 {
		for _, u := range slices.Sorted(maps.Keys(f.ReconnectedTo)) {
			fmt.Fprintf(w, "              %d now on %s\n", f.ReconnectedTo[u], u)
		}
	}
	state := "all back"
	if !f.Complete {
		state = "NOT all back"
	}
	fmt.Fprintf(w, "all back      %s after %.0f ms (kill → last new hello_ack)\n", state, f.AllBackMs)
	fmt.Fprintf(w, "kill→drop     %s\n", f.KillToDrop)
	fmt.Fprintf(w, "kill→ack      %s\n", f.KillToHelloAck)
	fmt.Fprintf(w, "redial        %s\n", f.ReconnectDial)
	if f.FirstError != "" {
		fmt.Fprintf(w, "first error   %s\n", f.FirstError)
	}
}

func cmpOrStr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
