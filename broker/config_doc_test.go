package broker

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// literalDefault is a default cell that is a value to set, not a description ("unset", a
// variable's name, "all interfaces").
var literalDefault = regexp.MustCompile("^`([a-z0-9./_-]+)`$")

// TestREADMEConfigurationTable compares the table of README.md's "Configuration" section with
// the variables LoadConfig reads: every variable is documented, every documented one is read,
// and each documented default that is a plain value is the default (setting the variable to
// it changes nothing).
func TestREADMEConfigurationTable(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("../README.md")
	require.NoError(t, err)
	_, section, ok := strings.Cut(string(b), "\n## Configuration\n")
	require.True(t, ok, "README.md has no Configuration section")
	section, _, _ = strings.Cut(section, "\n## ")

	read := map[string]bool{}
	for _, ev := range envVars {
		read[ev.name] = true
	}
	base, err := LoadConfig(func(string) string { return "" })
	require.NoError(t, err)
	documented := map[string]bool{}
	for _, line := range strings.Split(section, "\n") {
		if !strings.HasPrefix(line, "| `") {
			continue
		}
		cells := strings.Split(line, "|")
		require.GreaterOrEqual(t, len(cells), 5, "README.md: row %q needs variable | default | meaning", line)
		names := strings.Split(strings.TrimSpace(cells[1]), " / ")
		defaults := strings.Split(strings.TrimSpace(cells[2]), " / ")
		for i, n := range names {
			name := strings.Trim(n, "`")
			require.NotContains(t, documented, name, "README.md documents %s twice", name)
			documented[name] = true
			if !read[name] {
				t.Errorf("README.md documents %s, which the broker does not read (misspelled or removed?)", name)
				continue
			}
			if len(defaults) != len(names) {
				continue // one default for several variables: a description
			}
			m := literalDefault.FindStringSubmatch(strings.TrimSpace(defaults[i]))
			if m == nil {
				continue
			}
			c, err := LoadConfig(func(k string) string {
				if k == name {
					return m[1]
				}
				return ""
			})
			if err != nil {
				t.Errorf("README.md says %s defaults to %s, which the broker refuses: %v", name, m[1], err)
				continue
			}
			c.DataDir, base.DataDir = filepath.Clean(c.DataDir), filepath.Clean(base.DataDir)
			if !reflect.DeepEqual(c, base) {
				t.Errorf("README.md says %s defaults to %s, but setting it to that changes the configuration", name, m[1])
			}
		}
	}
	for name := range read {
		if !documented[name] {
			t.Errorf("%s is read by the broker but not documented in README.md's Configuration table", name)
		}
	}
}
