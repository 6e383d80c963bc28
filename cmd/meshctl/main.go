// Command meshctl is a claudemesh peer: it holds an ed25519 identity, joins meshes by invite,
// sends and receives end-to-end encrypted messages, reports Claude Code's working/idle status
// through hooks, and load-tests brokers (bench).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/claudemesh/broker/client"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := newRootCmd(os.Getenv).ExecuteContext(ctx)
	stop()
	if err != nil {
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		printError(os.Stderr, err)
		os.Exit(1)
	}
}

// exitError ends the process with a specific code after the command printed its own output.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }

// app is what every command shares: the global flags and the process environment. Tests build
// one per run, so nothing here is global.
type app struct {
	getenv func(string) string

	home      string // --home, else $MESHCTL_HOME, else <user config dir>/meshctl
	meshRef   string // --mesh: slug or id
	brokerURL string // --broker: overrides the stored broker URL
	sessionID string // --session-id, else random per process
	asJSON    bool
	verbose   bool

	stdin          io.Reader
	stdout, stderr io.Writer
	log            *slog.Logger
}

func newRootCmd(getenv func(string) string) *cobra.Command {
	a := &app{getenv: getenv}
	root := &cobra.Command{
		Use:   "meshctl",
		Short: "A claudemesh peer: identity, invites, end-to-end encrypted messages, Claude Code hooks, load tests",
		Long: "meshctl is a claudemesh peer. It keeps an ed25519 identity and the meshes you joined in\n" +
			"its config directory ($MESHCTL_HOME, default <user config dir>/meshctl), encrypts every\n" +
			"message end to end (the broker only ever sees ciphertext), and reports Claude Code's\n" +
			"working/idle status to the broker through hooks.",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			a.stdin, a.stdout, a.stderr = cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr()
			level := slog.LevelWarn
			if a.verbose {
				level = slog.LevelDebug
			}
			a.log = slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: level}))
			if a.home == "" {
				a.home = a.getenv("MESHCTL_HOME")
			}
			return nil
		},
	}
	pf := root.PersistentFlags()
	pf.StringVar(&a.home, "home", "", "config directory (default $MESHCTL_HOME, else <user config dir>/meshctl)")
	pf.StringVar(&a.meshRef, "mesh", "", "mesh slug or id (needed when you joined several)")
	pf.StringVar(&a.brokerURL, "broker", "", "broker URL (ws://, wss://, http:// or https://), overriding the stored one")
	pf.StringVar(&a.sessionID, "session-id", "", "session id for the hello (default: random per process; a second process with the same id replaces the first)")
	pf.BoolVar(&a.asJSON, "json", false, "print JSON for scripts")
	pf.BoolVarP(&a.verbose, "verbose", "v", false, "log connection details to stderr")

	root.AddCommand(
		newInitCmd(a), newJoinCmd(a), newMeshesCmd(a),
		newSendCmd(a), newListenCmd(a), newPeersCmd(a), newStatusCmd(a), newSummaryCmd(a),
		newStateCmd(a), newMessageStatusCmd(a),
		newHookCmd(a), newBenchCmd(a),
	)
	return root
}

// printError writes a command's failure for the terminal. Errors carry text from the broker
// (refusal messages, close reasons), escaped like a peer's: a hostile broker must not drive
// the terminal.
func printError(w io.Writer, err error) {
	fmt.Fprintln(w, "meshctl:", client.Printable(err.Error(), true))
}
