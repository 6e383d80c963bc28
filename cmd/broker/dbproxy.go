package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/spf13/cobra"

	"github.com/claudemesh/broker/broker"
	"github.com/claudemesh/broker/db"
	"github.com/claudemesh/broker/db/pgproxy"
)

func init() { extraCommands = append(extraCommands, newDBProxyCmd) }

// newDBProxyCmd is a development and benchmark aid: db/pgproxy as a process of its own, so
// that replicas started separately (a broker binary too old to have `dev --db-delay`) can be
// measured behind the same distance to Postgres as `broker dev --db-delay`.
func newDBProxyCmd() *cobra.Command {
	var target, listen string
	var delay time.Duration
	cmd := &cobra.Command{
		Use:   "dbproxy",
		Short: "Development aid: a TCP proxy to Postgres that adds a delay each way (feel a far primary)",
		Long: `dbproxy forwards TCP connections to Postgres and holds every byte --delay in each direction,
so a round trip through it costs 2×delay more: point replicas' DATABASE_URL at it to measure a
replica far from the primary on one machine. It runs until SIGINT or SIGTERM.

--target is the server's host:port. Without it the target is DATABASE_URL, or the embedded
Postgres in BROKER_DATA_DIR, which dbproxy then starts and stops on exit; the banner prints the
database URL and the same URL through the proxy. For benchmarks only, never in production.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if delay < 0 {
				return fmt.Errorf("--delay must be 0 or more (a delay each way, e.g. 20ms), got %s", delay)
			}
			if target != "" {
				_, logger, err := loadConfig()
				if err != nil {
					return err
				}
				return runDBProxy(cmd, target, "", listen, delay, logger)
			}
			return withDatabase(cmd, ownEmbedded, func(_ context.Context, url string, _ broker.Config, logger *slog.Logger) error {
				t, err := pgproxy.TargetFromURL(url)
				if err != nil {
					return err
				}
				return runDBProxy(cmd, t, url, listen, delay, logger)
			})
		},
	}
	cmd.Flags().StringVar(&target, "target", "", "Postgres host:port (default: DATABASE_URL's, or the embedded Postgres)")
	cmd.Flags().StringVar(&listen, "listen", pgproxy.DefaultListen, "address to accept connections on (port 0: a free one, printed)")
	cmd.Flags().DurationVar(&delay, "delay", 0, "delay added in each direction, e.g. 20ms")
	return cmd
}

// runDBProxy serves until the command's context ends. dbURL, when known, is printed with the
// proxy in place of its host so that scripts can hand it to replicas.
func runDBProxy(cmd *cobra.Command, target, dbURL, listen string, delay time.Duration, logger *slog.Logger) error {
	ctx := cmd.Context()
	p, err := startDBProxy(ctx, target, listen, delay, logger)
	if err != nil {
		return err
	}
	defer func() { _ = p.Close() }()
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "\nclaudemesh db proxy (development aid)\n")
	fmt.Fprintf(out, "  target     %s\n", target)
	fmt.Fprintf(out, "  listen     %s\n", p.Addr())
	fmt.Fprintf(out, "  delay      %s each way (+%s per round trip)\n", delay, 2*delay)
	if dbURL != "" {
		proxied, err := p.URL(dbURL)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "  postgres   %s\n", db.Redact(dbURL))
		fmt.Fprintf(out, "  proxied    %s\n", db.Redact(proxied))
	}
	fmt.Fprintf(out, "\nCtrl-C stops it.\n")
	<-ctx.Done()
	logger.Info("stopping db proxy")
	return nil
}

// startDBProxy starts a pgproxy to target (host:port) that delays each direction by delay;
// listen "" means a free loopback port.
func startDBProxy(ctx context.Context, target, listen string, delay time.Duration, logger *slog.Logger) (*pgproxy.Proxy, error) {
	if target == "" {
		return nil, errors.New("db proxy: no target")
	}
	p, err := pgproxy.New(pgproxy.Config{Target: target, Listen: listen, Delay: delay, Logger: logger})
	if err != nil {
		return nil, err
	}
	if err := p.Start(ctx); err != nil {
		return nil, fmt.Errorf("db proxy on %s: %w", listen, err)
	}
	return p, nil
}
