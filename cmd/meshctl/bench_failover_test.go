package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/protocol"
)

// A child process of the test binary runs as a broker replica when these are set: the
// failover test needs a replica it can really kill -9 (an in-process one can only be
// stopped, which closes its sockets politely and marks its node stopped).
const (
	replicaDBEnv = "MESHCTL_TEST_REPLICA_DB"
	replicaIDEnv = "MESHCTL_TEST_REPLICA_ID"
)

// replicaMain runs one replica on the database in $MESHCTL_TEST_REPLICA_DB, prints
// "addr host:port" once it serves and listens to the bus, and runs until it is killed or its
// stdin closes (the test ended without killing it). It returns the process's exit code.
func replicaMain(url string) int {
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	pool, err := db.NewPool(ctx, url, db.PoolConfig{MaxConns: 8, AppName: "meshctl-test-replica"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "replica:", err)
		return 1
	}
	defer pool.Close()
	srv, err := broker.NewServer(broker.Config{NodeID: os.Getenv(replicaIDEnv), Region: "test", SessionGrace: 5 * time.Second}, pool, log)
	if err == nil {
		err = srv.Start(ctx, "127.0.0.1:0")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "replica:", err)
		return 1
	}
	// Announced only once it listens to the bus, as newEnv waits for its replicas: a session
	// registered before would miss what other replicas notify it of.
	for deadline := time.Now().Add(30 * time.Second); !srv.BusConnected(); {
		if time.Now().After(deadline) {
			fmt.Fprintln(os.Stderr, "replica: bus not connected after 30 s")
			return 1
		}
		time.Sleep(10 * time.Millisecond)
	}
	fmt.Printf("addr %s\n", srv.Addr())
	_, _ = io.Copy(io.Discard, os.Stdin)
	stopCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	_ = srv.Stop(stopCtx)
	return 0
}

// replicaProcess is a replica in a child process (see replicaMain).
type replicaProcess struct {
	cmd    *exec.Cmd
	addr   string
	exited chan error // the child's Wait result, once
}

func startReplicaProcess(t *testing.T, dbURL, id string) *replicaProcess {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), replicaDBEnv+"="+dbURL, replicaIDEnv+"="+id)
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var stderr syncBuffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	p := &replicaProcess{cmd: cmd, exited: make(chan error, 1)}
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "addr "); ok {
				addr <- a
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
		// Wait only once stdout is drained (os/exec: Wait closes the pipe).
		p.exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = stdin.Close() // a replica that is still alive stops
		select {
		case <-p.exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-p.exited
		}
	})
	select {
	case p.addr = <-addr:
	case err := <-p.exited:
		p.exited <- err
		t.Fatalf("replica %s exited before serving: %v\n%s", id, err, stderr.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("replica %s did not come up\n%s", id, stderr.String())
	}
	return p
}

func (p *replicaProcess) wsURL() string { return "ws://" + p.addr + protocol.PathWS }

// Failover end to end: 30 sessions over 5 meshes, round-robin over two in-process replicas
// and one replica process; meshctl kill -9s the process, and the 10 sessions it held come
// back on the other two (none back to the dead URL), each with a new hello_ack, none failed.
// The database agrees: no live presence is left on the killed replica's node.
func TestBenchFailover(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 2, nil)
	victim := startReplicaProcess(t, e.dbURL, "victim")
	c := newCLI(t)
	urls := []string{e.wsURL(0), e.wsURL(1), victim.wsURL()}
	out := c.must("bench", "--json", "--no-progress", "--urls", strings.Join(urls, ","), "--setup-db", e.dbURL,
		"--idle-conns", "30", "--meshes", "5", "--dial-concurrency", "8",
		"--kill-pid", strconv.Itoa(victim.cmd.Process.Pid), "--kill-after", "0s", "--hold", "0s", "--failover-timeout", "20s")
	var rep benchReport
	require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
	require.Equal(t, "idle", rep.Mode)
	require.Equal(t, 30, rep.Setup.Connections, rep.Setup.FirstError)
	ir := rep.Idle
	require.NotNil(t, ir)
	require.Equal(t, 5, ir.Meshes)
	require.Equal(t, 6, ir.MembersPerMesh)
	require.Equal(t, 30, ir.Alive, "every session is open at the end, the killed replica's on the others")

	f := ir.Failover
	require.NotNil(t, f, out)
	require.Equal(t, victim.cmd.Process.Pid, f.KilledPID)
	require.Equal(t, urls[2], f.VictimURL)
	require.Equal(t, 10, f.SessionsOnVictim)
	require.Equal(t, 10, f.Dropped)
	require.Equal(t, map[string]int{urls[2]: 10}, f.DroppedFrom)
	require.Equal(t, 10, f.Reconnected, f.FirstError)
	require.Zero(t, f.Failed)
	require.Zero(t, f.StillDialing)
	require.True(t, f.Complete)
	require.NotContains(t, f.ReconnectedTo, urls[2])
	require.Equal(t, 10, f.ReconnectedTo[urls[0]]+f.ReconnectedTo[urls[1]])
	require.EqualValues(t, 10, f.KillToHelloAck.Count)
	require.Positive(t, f.AllBackMs)
	require.InDelta(t, f.AllBackMs, f.KillToHelloAck.MaxMs, 0.01)
	require.LessOrEqual(t, f.KillToDrop.MaxMs, f.AllBackMs)

	// It really was a kill -9: the process ended by SIGKILL, not a clean exit.
	var exitErr *exec.ExitError
	err := <-victim.exited
	victim.exited <- err
	require.True(t, errors.As(err, &exitErr), "replica exit: %v", err)
	require.Equal(t, "signal: killed", exitErr.Error())
	var onVictim int
	require.NoError(t, e.pool.QueryRow(context.Background(),
		`SELECT count(*) FROM claudemesh.presence WHERE node_id = 'victim' AND ended_at IS NULL`).Scan(&onVictim))
	require.Zero(t, onVictim, "the reconnects took over every presence of the killed replica")

}

// --meshes spreads idle sessions over meshes (session i in mesh i mod M) and URLs (i mod U),
// and a mesh's members over its sessions.
func TestBenchIdleMeshes(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 2, nil)
	c := newCLI(t)
	out := c.must("bench", "--json", "--no-progress", "--urls", e.wsURL(0)+","+e.wsURL(1), "--setup-db", e.dbURL,
		"--idle-conns", "12", "--meshes", "3", "--hold", "0s")
	var rep benchReport
	require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
	ir := rep.Idle
	require.NotNil(t, ir)
	require.Equal(t, 12, ir.Opened)
	require.Equal(t, 12, ir.Alive)
	require.Equal(t, 3, ir.Meshes)
	require.Equal(t, 4, ir.MembersPerMesh)
	require.Nil(t, ir.Failover)

	// Each mesh had 4 sessions, 2 on each replica, each of its own member.
	rows, err := e.pool.Query(context.Background(), `
		SELECT p.mesh_id, p.node_id, count(*), count(DISTINCT p.member_id)
		FROM claudemesh.presence p JOIN claudemesh.mesh m ON m.id = p.mesh_id
		WHERE m.slug LIKE 'bench-%' AND p.session_id LIKE 'idle-%'
		GROUP BY 1, 2`)
	require.NoError(t, err)
	perMesh := map[string]int{}
	for rows.Next() {
		var mesh, node string
		var n, members int
		require.NoError(t, rows.Scan(&mesh, &node, &n, &members))
		require.Equal(t, 2, n, "mesh %s on node %s", mesh, node)
		require.Equal(t, 2, members, "mesh %s on node %s", mesh, node)
		perMesh[mesh] += n
	}
	require.NoError(t, rows.Err())
	require.Len(t, perMesh, 3)

	out = c.must("bench", "--no-progress", "--urls", e.wsURL(0), "--setup-db", e.dbURL, "--idle-conns", "4", "--meshes", "2", "--hold", "0s")
	require.Contains(t, out, "4 sessions in 2 mesh(es) (2 members each)")
}

// --cross-replica: every delivery is between peers on different URLs; without it, a run over
// the same URLs has deliveries within one replica too.
func TestBenchCrossReplica(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 2, nil)
	c := newCLI(t)
	urls := e.wsURL(0) + "," + e.wsURL(1)
	run := func(args ...string) msgReport {
		t.Helper()
		out := c.must(append([]string{"bench", "--json", "--no-progress", "--urls", urls, "--setup-db", e.dbURL,
			"--peers", "6", "--messages", "20", "--plain"}, args...)...)
		var rep benchReport
		require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
		require.NotNil(t, rep.Messages)
		m := *rep.Messages
		require.EqualValues(t, 120, m.Acked)
		require.EqualValues(t, 120, m.Delivered)
		return m
	}
	m := run("--cross-replica")
	require.Zero(t, m.SameURL)
	// Each peer has 5 others, 2 on its own URL: 120 uniform picks that all avoid them would
	// be a (3/5)^120 chance.
	m = run()
	require.Positive(t, m.SameURL)

	// Over 3 meshes (mesh i mod 3, URL i mod 2): 2 peers per mesh, on different URLs.
	out := c.must("bench", "--json", "--no-progress", "--urls", urls, "--setup-db", e.dbURL,
		"--peers", "6", "--messages", "10", "--plain", "--meshes", "3", "--cross-replica")
	var rep benchReport
	require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
	require.Equal(t, 3, rep.Meshes)
	require.EqualValues(t, 60, rep.Messages.Delivered)
	require.Zero(t, rep.Messages.SameURL)
	var meshes int
	require.NoError(t, e.pool.QueryRow(context.Background(), `
		SELECT count(DISTINCT e.mesh_id) FROM claudemesh.envelope e JOIN claudemesh.mesh m ON m.id = e.mesh_id
		WHERE m.created_at > now() - interval '1 hour' AND m.max_peers = 18`).Scan(&meshes))
	require.Equal(t, 3, meshes, "the messages went through three meshes")

	// A broadcast reaches the other peers of the sender's mesh only.
	out = c.must("bench", "--json", "--no-progress", "--urls", urls, "--setup-db", e.dbURL,
		"--peers", "6", "--messages", "5", "--plain", "--meshes", "2", "--target-mix", "broadcast=1")
	rep = benchReport{}
	require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
	require.EqualValues(t, 30, rep.Messages.Acked)
	require.EqualValues(t, 60, rep.Messages.Expected, "each broadcast reaches the 2 others of its mesh of 3")
	require.EqualValues(t, 60, rep.Messages.Delivered)
}

func TestBenchTargets(t *testing.T) {
	t.Parallel()
	got, err := benchTargets(5, 1, []string{"a", "b"}, true)
	require.NoError(t, err)
	// Peers 0, 2, 4 on a; 1, 3 on b.
	require.Equal(t, [][]int{{1, 3}, {0, 2, 4}, {1, 3}, {0, 2, 4}, {1, 3}}, got)

	got, err = benchTargets(4, 1, []string{"a", "b", "a"}, true) // a URL given twice is one replica
	require.NoError(t, err)
	require.Equal(t, [][]int{{1}, {0, 2, 3}, {1}, {1}}, got)

	// Without cross: everyone of the mesh, the peer itself included (the sender skips it).
	got, err = benchTargets(6, 2, []string{"a"}, false)
	require.NoError(t, err)
	require.Equal(t, [][]int{{0, 2, 4}, {1, 3, 5}, {0, 2, 4}, {1, 3, 5}, {0, 2, 4}, {1, 3, 5}}, got)

	// Meshes and URLs: mesh i mod 3, URL i mod 2; peer 0 (mesh 0, a) may send to 3 (mesh 0, b).
	got, err = benchTargets(9, 3, []string{"a", "b"}, true)
	require.NoError(t, err)
	require.Equal(t, []int{3}, got[0])
	require.Equal(t, []int{0, 6}, got[3])

	for _, tc := range []struct {
		n, meshes int
		urls      []string
		cross     bool
		want      string
	}{
		{4, 1, []string{"a"}, true, "no peer of its mesh on another URL"},
		{4, 1, []string{"a", "a"}, true, "no peer of its mesh on another URL"},
		{8, 2, []string{"a", "b"}, true, "no peer of its mesh on another URL"}, // each mesh on one URL
		{3, 2, []string{"a"}, false, "alone in its mesh"},
	} {
		_, err = benchTargets(tc.n, tc.meshes, tc.urls, tc.cross)
		require.ErrorContains(t, err, tc.want, tc)
	}
}

func TestBenchIdleFlags(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--meshes", "0", "--idle-conns", "3"}, "--meshes must be at least 1"},
		{[]string{"--meshes", "2", "--probe", "3"}, "for message and idle modes"},
		{[]string{"--meshes", "3", "--peers", "5"}, "fewer than two of the 5 peers"},
		{[]string{"--kill-pid", "1"}, "for idle mode"},
		{[]string{"--meshes", "4", "--idle-conns", "3"}, "more than the 3 sessions"},
		{[]string{"--idle-conns", "3", "--kill-pid", "1"}, "at least two --urls"},
		{[]string{"--idle-conns", "3", "--cross-replica"}, "--cross-replica is for message mode"},
		{[]string{"--peers", "4", "--cross-replica", "--target-mix", "direct=1,broadcast=1", "--setup-db", "postgres://x"}, "drop broadcast"},
		{[]string{"--peers", "4", "--cross-replica", "--setup-db", "postgres://x"}, "no peer of its mesh on another URL"},
		{[]string{"--idle-conns", "3", "--meshes", "2", "--mesh-slug", "demo", "--setup-db", "postgres://127.0.0.1:1/x"}, "drop --mesh-slug"},
	} {
		_, _, err := c.run("", append([]string{"bench", "--urls", "ws://127.0.0.1:1/ws"}, tc.args...)...)
		require.ErrorContains(t, err, tc.want, tc.args)
	}
}
