package broker

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/claudemesh/broker/broker/store"
)

// helloBatch bounds the hellos of one statement: the per-mesh locks each takes are held until
// the statement commits, so a batch is kept to about 20 ms of server time (0.3 ms a hello).
// lanes × helloBatch is what a replica far from the primary registers per round trip. Not more
// than 64: each hello of a batch writes in its own subtransaction (claudemesh.hello_batch), and
// past 64 in one transaction Postgres's per-backend subtransaction cache overflows, which slows
// every other backend's snapshots until the batch commits.
const helloBatch = 64

// registrar registers hellos in groups, as the committer stores sends: the hellos that arrive
// while a statement is in flight go together into the next one, over at most lanes statements
// at once. A storm of hellos then costs a few round trips, not one wave of statements per pool
// of connections. Beyond its queue (or after waiting longer than wait for a statement) a hello
// is refused at once as overloaded: retryable, never a timeout reported as internal.
type registrar struct {
	service
	store        *store.Store
	nodeID       string
	defaultLimit int
	wait         time.Duration
	log          *slog.Logger
	metrics      *Metrics
	jobs         chan *helloJob
	lanes        int
	stopped      chan struct{}
}

type helloJob struct {
	params store.HelloParams
	queued time.Time
	done   chan store.HelloResult // buffered: the lane never waits for the handler
}

func newRegistrar(st *store.Store, nodeID string, defaultLimit, lanes, queue int, wait time.Duration, log *slog.Logger, m *Metrics) *registrar {
	return &registrar{store: st, nodeID: nodeID, defaultLimit: defaultLimit, wait: wait, log: log, metrics: m,
		jobs: make(chan *helloJob, queue), lanes: max(lanes, 1), stopped: make(chan struct{})}
}

// register queues a verified hello and waits for its outcome.
func (r *registrar) register(ctx context.Context, p store.HelloParams) (store.HelloResult, error) {
	j := &helloJob{params: p, queued: time.Now(), done: make(chan store.HelloResult, 1)}
	select {
	case r.jobs <- j:
	default:
		return store.HelloResult{}, errOverloaded
	}
	select {
	case res := <-j.done:
		if res.Err == errOverloaded {
			return store.HelloResult{}, errOverloaded
		}
		return res, res.Err
	case <-r.stopped:
		return store.HelloResult{}, errOverloaded
	case <-ctx.Done():
		// Waited past the hello's deadline: the database is behind, which the peer is told as
		// overloaded (retry), not as a failure. The statement may still register it: with
		// nobody holding its socket here, the reconcile puts that presence in its grace.
		return store.HelloResult{}, errOverloaded
	}
}

// Start runs the lanes until Stop.
func (r *registrar) Start(ctx context.Context) error {
	return r.start(ctx, func(ctx context.Context) {
		defer close(r.stopped)
		var wg sync.WaitGroup
		for range r.lanes {
			wg.Go(func() { r.lane(ctx) })
		}
		wg.Wait()
	})
}

func (r *registrar) lane(ctx context.Context) {
	batch := make([]*helloJob, 0, helloBatch)
	for {
		select {
		case <-ctx.Done():
			return
		case j := <-r.jobs:
			batch = append(batch[:0], j)
		}
	fill:
		for len(batch) < helloBatch {
			select {
			case j := <-r.jobs:
				batch = append(batch, j)
			default:
				break fill
			}
		}
		r.run(context.WithoutCancel(ctx), batch)
	}
}

// run registers one batch. A hello that waited too long for its turn is refused (overloaded)
// without being run: its client has been told nothing for seconds and will retry.
func (r *registrar) run(ctx context.Context, batch []*helloJob) {
	now := time.Now()
	live := batch[:0]
	for _, j := range batch {
		if now.Sub(j.queued) > r.wait {
			j.done <- store.HelloResult{Err: errOverloaded}
			continue
		}
		live = append(live, j)
	}
	if len(live) == 0 {
		return
	}
	params := make([]store.HelloParams, len(live))
	for i, j := range live {
		params[i] = j.params
	}
	r.metrics.HelloBatchSize.Observe(float64(len(live)))
	ctx, cancel := context.WithTimeout(ctx, helloTimeout)
	defer cancel()
	res, err := r.store.Hellos(ctx, r.nodeID, r.defaultLimit, params)
	if errors.Is(err, context.DeadlineExceeded) {
		err = errOverloaded // too slow, not broken: the peers retry
	}
	for i, j := range live {
		switch {
		case err != nil:
			j.done <- store.HelloResult{Err: err}
		case errors.Is(res[i].Err, store.ErrHelloBusy):
			j.done <- store.HelloResult{Err: errOverloaded} // alone behind a lock: retryable
		default:
			j.done <- res[i]
		}
	}
}
