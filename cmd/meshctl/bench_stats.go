package main

import (
	"bufio"
	"fmt"
	"math"
	"math/bits"
	"os"
	"strconv"
	"strings"
	"time"
)

// histogram is a log-linear latency histogram in microseconds (HDR-style): values below 128
// are exact, above they fall in one of 128 sub-buckets per power of two, so any quantile is
// within 1% of the true value. Fixed size, mergeable, not safe for concurrent use.
type histogram struct {
	counts [histBuckets]uint64
	n      uint64
	sum    uint64
	max    uint64
}

const (
	histSubBits = 7
	histSub     = 1 << histSubBits
	histMaxExp  = 34 // values up to 2^41 µs (~25 days)
	histBuckets = histSub + histMaxExp*histSub
)

func histIndex(v uint64) int {
	if v < histSub {
		return int(v)
	}
	shift := bits.Len64(v) - (histSubBits + 1)
	if shift >= histMaxExp {
		return histBuckets - 1
	}
	return histSub + shift*histSub + int(v>>shift) - histSub
}

// histValue is the middle of bucket i.
func histValue(i int) uint64 {
	if i < histSub {
		return uint64(i)
	}
	shift := (i - histSub) / histSub
	top := uint64((i-histSub)%histSub + histSub)
	lo := top << shift
	return lo + (uint64(1)<<shift)/2
}

func (h *histogram) record(d time.Duration) {
	v := uint64(max(d.Microseconds(), 0))
	h.counts[histIndex(v)]++
	h.n++
	h.sum += v
	h.max = max(h.max, v)
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.sum += o.sum
	h.max = max(h.max, o.max)
}

// quantile returns the q-quantile (0 < q <= 1) in microseconds.
func (h *histogram) quantile(q float64) uint64 {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	rank = max(rank, 1)
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return min(histValue(i), h.max)
		}
	}
	return h.max
}

// latencyReport is a histogram summary in milliseconds.
type latencyReport struct {
	Count  uint64  `json:"count"`
	MeanMs float64 `json:"meanMs"`
	P50Ms  float64 `json:"p50Ms"`
	P95Ms  float64 `json:"p95Ms"`
	P99Ms  float64 `json:"p99Ms"`
	MaxMs  float64 `json:"maxMs"`
}

func (h *histogram) report() latencyReport {
	ms := func(us uint64) float64 { return math.Round(float64(us)/10) / 100 }
	r := latencyReport{Count: h.n, P50Ms: ms(h.quantile(0.50)), P95Ms: ms(h.quantile(0.95)), P99Ms: ms(h.quantile(0.99)), MaxMs: ms(h.max)}
	if h.n > 0 {
		r.MeanMs = ms(h.sum / h.n)
	}
	return r
}

func (r latencyReport) String() string {
	if r.Count == 0 {
		return "no samples"
	}
	return fmt.Sprintf("p50 %.2f ms  p95 %.2f ms  p99 %.2f ms  max %.2f ms  (mean %.2f ms, n=%d)", r.P50Ms, r.P95Ms, r.P99Ms, r.MaxMs, r.MeanMs, r.Count)
}

// readRSS returns a process's resident set size in KiB (VmRSS of /proc/PID/status).
func readRSS(pid int) (int64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			fields := strings.Fields(v)
			if len(fields) == 0 {
				break
			}
			kb, err := strconv.ParseInt(fields[0], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("pid %d: VmRSS %q", pid, v)
			}
			return kb, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("pid %d: no VmRSS in /proc/%d/status", pid, pid)
}

// rssReport is one broker process's memory at the phases of a run, in KiB (0 when unread).
type rssReport struct {
	PID          int   `json:"pid"`
	BeforeKiB    int64 `json:"beforeKiB"`
	ConnectedKiB int64 `json:"connectedKiB"`
	AfterKiB     int64 `json:"afterKiB"`
}

type rssProbe struct {
	pids    []int
	reports []rssReport
}

func newRSSProbe(pids []int) *rssProbe {
	p := &rssProbe{pids: pids, reports: make([]rssReport, len(pids))}
	for i, pid := range pids {
		p.reports[i].PID = pid
	}
	return p
}

// sample reads every pid into the field pick selects; unreadable pids are reported once.
func (p *rssProbe) sample(pick func(*rssReport) *int64, warn func(error)) {
	for i, pid := range p.pids {
		kb, err := readRSS(pid)
		if err != nil {
			warn(err)
			continue
		}
		*pick(&p.reports[i]) = kb
	}
}

func (p *rssProbe) total(pick func(*rssReport) *int64) int64 {
	var sum int64
	for i := range p.reports {
		sum += *pick(&p.reports[i])
	}
	return sum
}
