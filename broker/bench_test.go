package broker

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/protocol"
)

// BenchmarkSendPushAcrossReplicas measures send → ack → push with senders on one replica and
// recipients on another, every push crossing the bus. Senders run concurrently, so the
// replica's group commit batches them; msgs/s and the mean batch size show it.
func BenchmarkSendPushAcrossReplicas(b *testing.B) {
	for _, pairs := range []int{1, 16, 64} {
		b.Run(fmt.Sprintf("pairs=%d", pairs), func(b *testing.B) { benchSendPush(b, pairs) })
	}
}

func benchSendPush(b *testing.B, pairs int) {
	c := newCluster(b, 2, nil)
	m := c.mesh(10 * pairs)
	senders := make([]*client.Client, pairs)
	receivers := make([]*client.Client, pairs)
	keys := make([]string, pairs)
	for i := range pairs {
		snd, rcv := m.member(fmt.Sprintf("s%d", i)), m.member(fmt.Sprintf("r%d", i))
		senders[i] = m.dial(0, snd, func(o *client.Options) { o.Capabilities = nil; o.PushBuffer = 4096 })
		receivers[i] = m.dial(1, rcv, func(o *client.Options) { o.Capabilities = nil; o.PushBuffer = 4096 })
		keys[i] = rcv.pub
	}
	payload := fmt.Sprintf("%0256d", 0)
	batches0 := histCount(c.nodes[0].metrics.BatchSize)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	per := (b.N + pairs - 1) / pairs
	var wg sync.WaitGroup
	for i := range pairs {
		wg.Add(2)
		go func() {
			defer wg.Done()
			ctx := b.Context()
			for range per {
				if _, err := senders[i].Send(ctx, keys[i], protocol.PriorityNow, "bm9uY2U=", payload, ""); err != nil {
					b.Error(err)
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			for range per {
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
	total := per * pairs
	b.ReportMetric(float64(total)/elapsed.Seconds(), "msgs/s")
	if n := histCount(c.nodes[0].metrics.BatchSize) - batches0; n > 0 {
		b.ReportMetric(float64(total)/float64(n), "sends/commit")
	}
}

func histCount(h prometheus.Histogram) uint64 {
	var m dto.Metric
	_ = h.Write(&m)
	return m.GetHistogram().GetSampleCount()
}
