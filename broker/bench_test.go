package broker

import (
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/protocol"
)

// BenchmarkSendPushAcrossReplicas measures send → ack → push with senders on one replica and
// recipients on another, so every push crosses the bus. Each sender keeps `inflight` sends
// outstanding, as a busy peer would; the replica's group commit turns them into few
// transactions. msgs/s and sends/commit show the batching: the naive design (one notifying
// commit per message) tops out near 4k/s on this machine kind (design.md).
func BenchmarkSendPushAcrossReplicas(b *testing.B) {
	for _, c := range []struct{ pairs, inflight int }{{1, 1}, {64, 1}, {64, 8}, {128, 16}} {
		b.Run(fmt.Sprintf("pairs=%d/inflight=%d", c.pairs, c.inflight), func(b *testing.B) { benchSendPush(b, 2, c.pairs, c.inflight, 0) })
	}
	// The issue-13 shape: three replicas, each sending to the next, so every replica's commit
	// lane is busy and every push crosses the bus.
	b.Run("replicas=3/pairs=129/inflight=16", func(b *testing.B) { benchSendPush(b, 3, 129, 16, 0) })
	// The same load with group commit off: one notifying commit per message, the naive
	// design's ceiling measured with this broker's own per-message work.
	b.Run("nobatch/pairs=128/inflight=16", func(b *testing.B) { benchSendPush(b, 2, 128, 16, 1) })
}

// analyze gives the benchmark's fresh tables the statistics a running cluster's have
// (autovacuum analyzes them as they grow): without any, the planner takes the few presences as
// none, and may scan them all once per envelope rather than probe an index.
func analyze(b *testing.B, c *testCluster) {
	_, err := c.pool.Exec(b.Context(), `ANALYZE claudemesh.presence, claudemesh.member, claudemesh.session_key`)
	require.NoError(b, err)
}

func benchSendPush(b *testing.B, replicas, pairs, inflight, maxBatch int) {
	c := newCluster(b, replicas, func(cfg *Config) { cfg.MaxBatch = maxBatch; cfg.Committers = benchCommitters })
	m := c.mesh(10 * pairs)
	senders := make([]*client.Client, pairs)
	receivers := make([]*client.Client, pairs)
	keys := make([]string, pairs)
	quiet := func(o *client.Options) { o.Capabilities = nil; o.PushBuffer = 4096; o.Logger = nil }
	for i := range pairs {
		snd, rcv := m.member(fmt.Sprintf("s%d", i)), m.member(fmt.Sprintf("r%d", i))
		senders[i] = m.dial(i%replicas, snd, quiet)
		receivers[i] = m.dial((i+1)%replicas, rcv, quiet)
		keys[i] = rcv.pub
	}
	analyze(b, c)
	payload := fmt.Sprintf("%0256d", 0) // a 256-byte ciphertext
	batches0 := c.batches()
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	per := (b.N + pairs*inflight - 1) / (pairs * inflight)
	var wg sync.WaitGroup
	for i := range pairs {
		for range inflight {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range per {
					if _, err := senders[i].Send(b.Context(), keys[i], protocol.PriorityNow, "bm9uY2U=", payload, ""); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range per * inflight {
				select {
				case <-receivers[i].Pushes():
				case <-time.After(30 * time.Second):
					b.Error("push timeout")
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	total := per * pairs * inflight
	b.ReportMetric(float64(total)/elapsed.Seconds(), "msgs/s")
	if n := c.batches() - batches0; n > 0 {
		b.ReportMetric(float64(total)/float64(n), "sends/commit")
	}
}

// BenchmarkBroadcast measures one sender's broadcasts fanning out to receivers on two other
// replicas: each envelope is stored once and encoded once per replica.
func BenchmarkBroadcast(b *testing.B) {
	c := newCluster(b, 3, nil)
	m := c.mesh(1000)
	quiet := func(o *client.Options) { o.Capabilities = nil; o.PushBuffer = 8192; o.Logger = nil }
	sender := m.dial(0, m.member("sender"), quiet)
	const receivers = 50
	var rcv []*client.Client
	for i := range receivers {
		rcv = append(rcv, m.dial(1+i%2, m.member(fmt.Sprintf("r%d", i)), quiet))
	}
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for _, r := range rcv {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range b.N {
				select {
				case <-r.Pushes():
				case <-time.After(30 * time.Second):
					b.Error("push timeout")
					return
				}
			}
		}()
	}
	sem := make(chan struct{}, 32)
	for range b.N {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			if _, err := sender.Send(b.Context(), "*", protocol.PriorityNow, "bm9uY2U=", "Y2lwaGVy", ""); err != nil {
				b.Error(err)
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N*receivers)/time.Since(start).Seconds(), "pushes/s")
}

func histCount(h prometheus.Histogram) uint64 {
	var m dto.Metric
	_ = h.Write(&m)
	return m.GetHistogram().GetSampleCount()
}

// batches counts the group commits of every replica.
func (c *testCluster) batches() (n uint64) {
	for _, s := range c.nodes {
		n += histCount(s.metrics.BatchSize)
	}
	return n
}

// benchCommitters is the commit lanes per replica for the send benchmarks: BENCH_COMMITTERS,
// else the default (COMMITTERS's, one).
var benchCommitters = func() int { n, _ := strconv.Atoi(os.Getenv("BENCH_COMMITTERS")); return n }()
