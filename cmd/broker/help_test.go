package main

import (
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// TestFlagHelpNamesNoBogusArgument: pflag shows the first `backquoted` word of a flag's usage as
// the name of its argument, so a command quoted that way turned "--no-migrate" into
// "--no-migrate broker migrate up" in --help, as if the flag took three words. A bool flag
// takes no argument, and any other's argument name is one word.
func TestFlagHelpNamesNoBogusArgument(t *testing.T) {
	checkFlagHelp(t, newRootCmd())
}

func checkFlagHelp(t *testing.T, cmd *cobra.Command) {
	t.Helper()
	cmd.LocalFlags().VisitAll(func(f *pflag.Flag) {
		name, _ := pflag.UnquoteUsage(f)
		if f.Value.Type() == "bool" && name != "" || strings.ContainsAny(name, " \t") {
			t.Errorf("%s --%s: --help shows it taking %q (a `quoted` phrase in its usage); use plain quotes", cmd.CommandPath(), f.Name, name)
		}
	})
	for _, sub := range cmd.Commands() {
		checkFlagHelp(t, sub)
	}
}
