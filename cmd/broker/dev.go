package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/cobra"

	"github.com/claudemesh/broker/broker"
	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/pgproxy"
)

func init() { extraCommands = append(extraCommands, newDevCmd) }

func newDevCmd() *cobra.Command {
	var replicas int
	var dbDelay time.Duration
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a local cluster: embedded Postgres, N replicas and a round-robin load balancer",
		Long: `dev runs a whole cluster in one process for trying the broker: the embedded Postgres
(or DATABASE_URL), N replicas on the ports after BROKER_PORT, each with its own pool and LISTEN
connection exactly as separate processes would have, and a round-robin TCP load balancer on
BROKER_PORT (default 7900) with no stickiness.

--db-delay D puts the primary in another region: every replica reaches Postgres through an
in-process proxy that holds each byte D in each direction (a round trip costs 2×D more), so one
machine shows what a replica far from the primary pays per operation. Migrations go direct.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if replicas < 1 || replicas > 16 {
				return fmt.Errorf("--replicas must be between 1 and 16, got %d", replicas)
			}
			if dbDelay < 0 {
				return fmt.Errorf("--db-delay must be 0 or more (a delay each way, e.g. 20ms), got %s", dbDelay)
			}
			return withDatabase(cmd, ownEmbedded, func(ctx context.Context, url string, cfg broker.Config, logger *slog.Logger) error {
				return runDev(ctx, cmd, url, cfg, logger, replicas, dbDelay)
			})
		},
	}
	cmd.Flags().IntVar(&replicas, "replicas", 3, "number of broker replicas")
	cmd.Flags().DurationVar(&dbDelay, "db-delay", 0, "delay added each way between the replicas and Postgres (e.g. 20ms; 0: direct)")
	return cmd
}

func runDev(ctx context.Context, cmd *cobra.Command, url string, cfg broker.Config, logger *slog.Logger, replicas int, dbDelay time.Duration) error {
	tuneGC(ctx, logger)
	if err := migrateWithRetry(ctx, url, logger); err != nil {
		return stoppedOr(ctx, err, logger)
	}
	go warnIfSchemaNewer(ctx, url, logger)
	// The replicas' pools (and their LISTEN connections, which the bus derives from the pool's
	// config) go through the proxy; with no delay they connect direct, as before.
	replicaURL := url
	if dbDelay > 0 {
		target, err := pgproxy.TargetFromURL(url)
		if err != nil {
			return fmt.Errorf("--db-delay: %w", err)
		}
		proxy, err := startDBProxy(ctx, target, "", dbDelay, logger)
		if err != nil {
			return err
		}
		// Stopped after the replicas (deferred first, so it runs last): they mark their nodes
		// stopped through it.
		defer func() { _ = proxy.Close() }()
		if replicaURL, err = proxy.URL(url); err != nil {
			return err
		}
	}
	// BROKER_HOST is where the load balancer and the replicas listen, as `broker serve` does: a
	// replica on loopback takes the April clients' unsigned hooks (Config.UnsignedHooks), which
	// only a cluster that listens on loopback alone may do.
	dialHost, showHost := devHosts(cfg.Host)
	lbLn, err := net.Listen("tcp", net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.Port)))
	if err != nil {
		return fmt.Errorf("load balancer port %d: %w (set BROKER_PORT to use another)", cfg.Port, err)
	}
	defer lbLn.Close() // for an error before the load balancer serves (it closes it itself)
	var servers []*broker.Server
	var pools []*pgxpool.Pool
	var backends []string
	stopped := false
	// On an error part way, the replicas started so far stop (and mark their nodes stopped)
	// before their pools close.
	defer func() {
		if !stopped {
			_ = stopWithin(cfg.DrainTimeout, logger, servers, pools)
		}
	}()
	for i := 1; i <= replicas; i++ {
		pool, err := db.NewPool(ctx, replicaURL, db.PoolConfig{MinIdle: db.ReplicaMinIdle, AppName: fmt.Sprintf("claudemesh-dev-%d", i), Prepare: store.RequestPathSQL(),
			Named: namedSQL(cfg)})
		if err != nil {
			return err
		}
		pools = append(pools, pool)
		rc := cfg
		rc.NodeID = fmt.Sprintf("dev-%d", i)
		if rc.MetricsAddr, err = devMetricsAddr(cfg.MetricsAddr, i); err != nil {
			return err
		}
		srv, err := broker.NewServer(rc, pool, logger.With("replica", i))
		if err != nil {
			return err
		}
		addr := net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.Port+i))
		if err := srv.Start(ctx, addr); err != nil {
			return err
		}
		servers = append(servers, srv)
		backends = append(backends, net.JoinHostPort(dialHost, strconv.Itoa(cfg.Port+i)))
	}
	lb := &roundRobin{backends: backends, log: logger}
	lbCtx, stopLB := context.WithCancel(context.WithoutCancel(ctx))
	defer stopLB()
	lbDone := make(chan struct{})
	go func() { lb.serve(lbCtx, lbLn); close(lbDone) }()

	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "\nclaudemesh dev cluster\n")
	fmt.Fprintf(out, "  load balancer  ws://%s/ws   (round-robin, no stickiness)\n", net.JoinHostPort(showHost, strconv.Itoa(cfg.Port)))
	for i, s := range servers {
		fmt.Fprintf(out, "  replica %-2d     ws://%s/ws   node %s\n", i+1, net.JoinHostPort(showHost, strconv.Itoa(cfg.Port+i+1)), s.NodeID())
	}
	fmt.Fprintf(out, "  postgres       %s\n", db.Redact(url))
	if dbDelay > 0 {
		fmt.Fprintf(out, "  db delay       %s each way (+%s per round trip): replicas reach Postgres through %s\n",
			dbDelay, 2*dbDelay, db.Redact(replicaURL))
	}
	fmt.Fprintf(out, "  health         http://%s/health   metrics /metrics\n", net.JoinHostPort(showHost, strconv.Itoa(cfg.Port)))
	for i, s := range servers {
		if a := s.MetricsAddr(); a != "" {
			fmt.Fprintf(out, "  metrics %-2d     http://%s/metrics (and /debug/pprof/)\n", i+1, a)
		}
	}
	fmt.Fprintf(out, "\nCtrl-C stops everything.\n")

	// A replica that must stop on its own (another process took its node id: two dev clusters
	// on one DATABASE_URL share dev-1..N) stops the cluster, with the reason.
	fatal := make(chan error, 1)
	watching, stopWatching := context.WithCancel(ctx)
	defer stopWatching()
	for _, s := range servers {
		go func() {
			select {
			case err := <-s.Fatal():
				select {
				case fatal <- err:
				default:
				}
			case <-watching.Done():
			}
		}()
	}
	var failed error
	select {
	case <-ctx.Done():
	case failed = <-fatal:
		logger.Error("stopping", "err", failed)
	}
	logger.Info("stopping dev cluster")
	// The replicas drain while the load balancer still carries their connections: a client on
	// its port gets the 1012 that sends it elsewhere, as one on a replica's own port does,
	// instead of a cut connection. Then the load balancer stops.
	stopped = true
	err = stopWithin(cfg.DrainTimeout, logger, servers, pools)
	stopLB()
	<-lbDone
	if failed != nil {
		return errors.Join(failed, err)
	}
	return err
}

// devMetricsAddr gives replica i (from 1) its own METRICS_ADDR: the port plus i-1, so one
// setting serves every replica of the dev cluster (they share one process, not one listener).
func devMetricsAddr(addr string, i int) (string, error) {
	if addr == "" || i == 1 {
		return addr, nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("METRICS_ADDR %q: %w", addr, err)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p == 0 {
		return "", fmt.Errorf("METRICS_ADDR %q: give a fixed port for a dev cluster (replica i serves on port+i-1)", addr)
	}
	return net.JoinHostPort(host, strconv.Itoa(p+i-1)), nil
}

// devHosts gives the address the load balancer dials its replicas on and the one the banner
// shows, for a cluster listening on host ("" or an unspecified address: every interface).
func devHosts(host string) (dial, show string) {
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		return "127.0.0.1", "localhost"
	}
	return host, host
}
