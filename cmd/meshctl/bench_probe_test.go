package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/protocol"
)

// Probe end to end over three replicas: every operation runs its repetitions without a
// failure (in particular the hook's message really was held, and released from replica C),
// in ms and in round trips; the text report names each operation.
func TestBenchProbe(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 3, nil)
	c := newCLI(t)
	urls := strings.Join([]string{e.wsURL(0), e.wsURL(1), e.httpURL(2)}, ",")
	out := c.must("bench", "--json", "--no-progress", "--urls", urls, "--probe", "4", "--rtt", "2ms", "--setup-db", e.dbURL)
	var rep benchReport
	require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
	require.Equal(t, "probe", rep.Mode)
	p := rep.Probe
	require.NotNil(t, p)
	require.Equal(t, 4, p.Repetitions)
	require.Equal(t, probeWarmup, p.Warmup)
	require.InDelta(t, 2, p.RTTMs, 1e-9)
	require.Equal(t, e.wsURL(0), p.ReplicaA)
	require.Equal(t, e.wsURL(1), p.ReplicaB)
	require.Equal(t, "ws://"+e.nodes[2].Addr()+protocol.PathWS, p.ReplicaC)
	var names []string
	for _, op := range p.Operations {
		names = append(names, op.Name)
		require.Zero(t, op.Failed, "%s: %s", op.Name, op.FirstError)
		require.Equal(t, 4, op.Count, op.Name)
		require.Positive(t, op.MedianMs, op.Name)
		require.LessOrEqual(t, op.MedianMs, op.P90Ms, op.Name)
		require.LessOrEqual(t, op.P90Ms, op.MaxMs, op.Name)
		require.InDelta(t, op.MedianMs/2, op.MedianRTT, 0.01, op.Name)
	}
	require.Equal(t, []string{opHello, opSendAck, opSendPush, opHookPush, opListPeers}, names)

	// One URL serves as A, B and C; without --rtt there are no round-trip columns.
	out = c.must("bench", "--no-progress", "--urls", e.wsURL(0), "--probe", "1", "--setup-db", e.dbURL)
	require.Contains(t, out, "hook idle on C → held next pushed on A")
	require.Contains(t, out, "no --rtt")
	require.NotContains(t, out, "median RTT")
}

// Storm: every member is answered; with a mesh smaller than the storm the surplus is refused
// and counted by the broker's code; with --invite the members join through /join.
func TestBenchStorm(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1, nil)
	_, _, err := e.svc.CreateMesh(context.Background(), membership.CreateMeshParams{Slug: "small", OwnerPubkey: e.key.Pubkey(), MaxPeers: 3})
	require.NoError(t, err)
	c := newCLI(t)
	storm := func(args ...string) stormReport {
		t.Helper()
		out := c.must(append([]string{"bench", "--json", "--no-progress", "--urls", e.wsURL(0)}, args...)...)
		var rep benchReport
		require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
		require.Equal(t, "storm", rep.Mode)
		require.NotNil(t, rep.Storm)
		return *rep.Storm
	}

	s := storm("--storm", "12", "--rtt", "10ms", "--setup-db", e.dbURL) // a throwaway mesh sized for the storm
	require.Equal(t, 12, s.Members)
	require.Equal(t, 12, s.OK, s.FirstError)
	require.Zero(t, s.Refused)
	require.EqualValues(t, 12, s.Hello.Count)
	require.Positive(t, s.LastAnswerMs)
	require.InDelta(t, s.LastAnswerMs/10, s.LastAnswerRTT, 0.01)

	s = storm("--storm", "5", "--setup-db", e.dbURL, "--mesh-slug", "small")
	require.Equal(t, 3, s.OK)
	require.Equal(t, 2, s.Refused)
	require.Equal(t, map[string]int{protocol.CodeCapacity: 2}, s.RefusedBy)
	require.Contains(t, s.FirstError, protocol.CodeCapacity)

	s = storm("--storm", "4", "--invite", e.invite(4))
	require.Equal(t, 4, s.OK, s.FirstError)
	members, err := e.svc.Members(context.Background(), e.mesh.ID)
	require.NoError(t, err)
	require.Len(t, members, 5, "the owner and the four who joined with the invite")

	out := c.must("bench", "--no-progress", "--urls", e.wsURL(0), "--storm", "2", "--setup-db", e.dbURL)
	require.Contains(t, out, "storm         2 members said hello to A at once: 2 answered OK, 0 refused")
}

func TestBenchModeFlags(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--probe", "3", "--storm", "3"}, "separate modes"},
		{[]string{"--idle-conns", "3", "--probe", "3"}, "separate modes"},
		{[]string{"--probe", "-1"}, "positive count"},
		{[]string{"--probe", "3", "--rtt", "-1ms"}, "--rtt"},
		{[]string{"--storm", "3", "--invite", "ic://join/x", "--mesh-slug", "demo"}, "--mesh-slug"},
		{[]string{"--storm", "3", "--invite", "ic://join/x"}, "--invite"},
	} {
		_, _, err := c.run("", append([]string{"bench", "--urls", "ws://127.0.0.1:1/ws"}, tc.args...)...)
		require.ErrorContains(t, err, tc.want, tc.args)
	}
}

func TestProbeOpFill(t *testing.T) {
	t.Parallel()
	var op probeOp
	op.fill([]time.Duration{40 * time.Millisecond, 10 * time.Millisecond, 30 * time.Millisecond, 20 * time.Millisecond}, 20*time.Millisecond)
	require.Equal(t, probeOp{Count: 4, MedianMs: 25, P90Ms: 40, MaxMs: 40, MedianRTT: 1.25, P90RTT: 2, MaxRTT: 2}, op)

	samples := make([]time.Duration, 30)
	for i := range samples {
		samples[i] = time.Duration(30-i) * time.Millisecond // 30 ... 1
	}
	op = probeOp{}
	op.fill(samples, 0)
	require.Equal(t, probeOp{Count: 30, MedianMs: 15.5, P90Ms: 27, MaxMs: 30}, op)

	op = probeOp{}
	op.fill(nil, time.Millisecond)
	require.Equal(t, probeOp{}, op)
}

func TestRefusalCode(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&client.HelloError{Code: protocol.CodeOverloaded, CloseCode: 1013}, protocol.CodeOverloaded},
		{fmt.Errorf("wrapped: %w", &client.HelloError{Code: "internal", CloseCode: 1011}), "internal"},
		{&client.HelloError{CloseCode: 1006}, "closed_1006"},
		{fmt.Errorf("hello: %w", context.DeadlineExceeded), "timeout"},
		{errors.New("dial ws://x/ws: HTTP 503: websocket: bad handshake"), "http_503"},
		{errors.New("dial ws://x/ws: connection refused"), "dial"},
	} {
		require.Equal(t, tc.want, refusalCode(tc.err), tc.err.Error())
	}
}
