package broker

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestLoadConfigDefaults(t *testing.T) {
	c, err := LoadConfig(env(nil))
	require.NoError(t, err)
	require.Equal(t, 7900, c.Port)
	require.Equal(t, 60*time.Second, c.StatusTTL)
	require.Equal(t, 30*time.Second, c.HookFreshWindow)
	require.Equal(t, 100, c.MaxConnsPerMesh)
	require.Equal(t, 65536, c.MaxMessageBytes)
	require.Equal(t, 30, c.HookRatePerMin)
	require.Equal(t, 90*time.Second, c.Grace())
	require.Equal(t, ".broker-data", c.DataDir)
	require.Equal(t, "text", c.LogFormat)
	require.Empty(t, c.DatabaseURL)
	require.False(t, c.NotifyAfterCommit)
	require.False(t, c.PushBeforeFlush)
	require.Equal(t, [4]int{20, 200, 20, 100}, [4]int{c.WriteRatePerMember, c.WriteBurstPerMember, c.ReadRatePerMember, c.ReadBurstPerMember})
	require.Equal(t, 60, c.JoinRatePerSourceMin)
	require.Equal(t, 60, c.HelloRatePerSessionMin)
}

func TestLoadConfigValues(t *testing.T) {
	c, err := LoadConfig(env(map[string]string{
		"BROKER_PORT": "8000", "DATABASE_URL": "postgres://u@h/db", "STATUS_TTL_SECONDS": "5",
		"SESSION_GRACE_SECONDS": "0", "LOG_LEVEL": "debug", "LOG_FORMAT": "json", "FLY_REGION": "ams",
		"NOTIFY_AFTER_COMMIT": "true", "WRITE_RATE_PER_MEMBER": "2", "WRITE_BURST_PER_MEMBER": "3", "READ_RATE_PER_MEMBER": "4",
		"READ_BURST_PER_MEMBER": "5",
	}))
	require.NoError(t, err)
	require.Equal(t, 8000, c.Port)
	require.Equal(t, "postgres://u@h/db", c.DatabaseURL)
	require.Equal(t, 5*time.Second, c.StatusTTL)
	require.Equal(t, time.Duration(0), c.Grace(), "an explicit 0 means no grace, not the default")
	require.Equal(t, "json", c.LogFormat)
	require.Equal(t, "ams", c.Region)
	require.True(t, c.NotifyAfterCommit)
	require.Equal(t, [4]int{2, 3, 4, 5}, [4]int{c.WriteRatePerMember, c.WriteBurstPerMember, c.ReadRatePerMember, c.ReadBurstPerMember})
}

func TestLoadConfigErrorsNameVariableAndFix(t *testing.T) {
	cases := map[string]struct{ name, value, want string }{
		"port text":     {"BROKER_PORT", "abc", "set it to a TCP port"},
		"port range":    {"BROKER_PORT", "70000", "out of range"},
		"ttl negative":  {"STATUS_TTL_SECONDS", "-3", "whole number of seconds"},
		"fresh zero":    {"HOOK_FRESH_WINDOW_SECONDS", "0", "out of range"},
		"max conns":     {"MAX_CONNECTIONS_PER_MESH", "0", "whole number >= 1"},
		"msg bytes":     {"MAX_MESSAGE_BYTES", "10", "between 1024 and 16777216"},
		"hook rate":     {"HOOK_RATE_LIMIT_PER_MIN", "x", "not a whole number"},
		"grace":         {"SESSION_GRACE_SECONDS", "1.5", "not a whole number"},
		"log level":     {"LOG_LEVEL", "loud", "one of debug, info, warn, error"},
		"log format":    {"LOG_FORMAT", "xml", "text or json"},
		"notify after":  {"NOTIFY_AFTER_COMMIT", "yes", "true or false"},
		"database url":  {"DATABASE_URL", "mysql://x", "unset it to use the embedded Postgres"},
		"dead after":    {"NODE_DEAD_AFTER_SECONDS", "3", "set it to a whole number of seconds >= 4"},
		"node id chars": {"BROKER_NODE_ID", "a b", "letters, digits"},
		"write rate":    {"WRITE_RATE_PER_MEMBER", "0", "requests per second >= 1"},
		"read burst":    {"READ_BURST_PER_MEMBER", "-1", "requests >= 1"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := LoadConfig(env(map[string]string{tc.name: tc.value}))
			require.Error(t, err)
			require.Contains(t, err.Error(), tc.name)
			require.Contains(t, err.Error(), tc.want)
		})
	}
	// Two answers to one problem: a clear error, naming both.
	_, err := LoadConfig(env(map[string]string{"PUSH_BEFORE_FLUSH": "true", "NOTIFY_AFTER_COMMIT": "true"}))
	require.ErrorContains(t, err, "PUSH_BEFORE_FLUSH and NOTIFY_AFTER_COMMIT")
	c, err := LoadConfig(env(map[string]string{"PUSH_BEFORE_FLUSH": "true"}))
	require.NoError(t, err)
	require.True(t, c.PushBeforeFlush)
	// All errors at once, not just the first.
	_, err = LoadConfig(env(map[string]string{"BROKER_PORT": "x", "LOG_FORMAT": "y"}))
	require.ErrorContains(t, err, "BROKER_PORT")
	require.ErrorContains(t, err, "LOG_FORMAT")
}

// A mistyped DATABASE_URL is named in the error, its password is not.
func TestLoadConfigHidesDatabasePassword(t *testing.T) {
	for _, v := range []string{
		"postgress://admin:S3cretPW@db.example.com/broker",
		"admin:S3cretPW@db.example.com/broker",
	} {
		_, err := LoadConfig(env(map[string]string{"DATABASE_URL": v}))
		require.ErrorContains(t, err, "DATABASE_URL")
		require.ErrorContains(t, err, "db.example.com/broker", "the user still sees which URL is wrong")
		require.NotContains(t, err.Error(), "S3cretPW")
	}
}

// Every message says something the user can do: the fix it proposes is one the check accepts.
func TestLoadConfigHelpAgreesWithChecks(t *testing.T) {
	_, err := LoadConfig(env(map[string]string{"NODE_DEAD_AFTER_SECONDS": "3"}))
	require.ErrorContains(t, err, ">= 4")
	c, err := LoadConfig(env(map[string]string{"NODE_DEAD_AFTER_SECONDS": "4"}))
	require.NoError(t, err, "the minimum the help names is accepted")
	require.Equal(t, 4*time.Second, c.NodeDeadAfter)

	_, err = LoadConfig(env(map[string]string{"DATABASE_URL": "mysql://x"}))
	require.NotContains(t, err.Error(), "unset it for the default", "said once, in words that fit DATABASE_URL")
	require.Equal(t, 1, strings.Count(err.Error(), "unset"), err.Error())
}

// A bad value and a bad relation between values are reported together.
func TestLoadConfigReportsEveryProblemAtOnce(t *testing.T) {
	_, err := LoadConfig(env(map[string]string{"BROKER_PORT": "abc", "BROKER_NODE_ID": "bad id!", "MAX_ENVELOPE_BYTES": "70000"}))
	require.ErrorContains(t, err, "BROKER_PORT")
	require.ErrorContains(t, err, "BROKER_NODE_ID")
	require.ErrorContains(t, err, "MAX_ENVELOPE_BYTES")
}

// An envelope limit above the frame limit could never be reached: refused, with both values
// and the way out.
func TestEnvelopeLimitWithinFrameLimit(t *testing.T) {
	_, err := LoadConfig(env(map[string]string{"MAX_MESSAGE_BYTES": "4096", "MAX_ENVELOPE_BYTES": "8192"}))
	require.ErrorContains(t, err, "MAX_ENVELOPE_BYTES=8192 is more than MAX_MESSAGE_BYTES=4096")
	require.ErrorContains(t, err, "at least 9216")
	for _, ok := range []map[string]string{
		{"MAX_MESSAGE_BYTES": "4096", "MAX_ENVELOPE_BYTES": "3072"},
		{"MAX_MESSAGE_BYTES": "4096", "MAX_ENVELOPE_BYTES": "4096"},
		{"MAX_MESSAGE_BYTES": "4096"},
		{"MAX_ENVELOPE_BYTES": "1000"},
	} {
		c, err := LoadConfig(env(ok))
		require.NoError(t, err, ok)
		require.LessOrEqual(t, c.MaxEnvelopeBytes, c.MaxMessageBytes)
	}
}
