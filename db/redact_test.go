package db_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/db"
)

// Every form a DATABASE_URL takes, well formed or not, prints without its password.
func TestRedact(t *testing.T) {
	cases := []struct{ name, in, want string }{
		{"url", "postgres://admin:TopSecret9@db.example.com/broker", "postgres://admin:xxxxx@db.example.com/broker"},
		{"mistyped scheme", "postgress://admin:TopSecret9@db.example.com/broker", "postgress://admin:xxxxx@db.example.com/broker"},
		{"no password", "postgres://u@h/db?sslmode=disable", "postgres://u@h/db?sslmode=disable"},
		{"query password", "postgres://u@h/db?sslmode=require&password=TopSecret9", "postgres://u@h/db?sslmode=require&password=xxxxx"},
		{"encoded query key", "postgres://h/db?pass%77ord=TopSecret9", "postgres://h/db?pass%77ord=xxxxx"},
		{"sslpassword", "postgresql://h/db?sslpassword=TopSecret9&sslkey=/k", "postgresql://h/db?sslpassword=xxxxx&sslkey=/k"},
		{"ipv6", "postgresql://u:TopSecret9@[::1]:5432/db", "postgresql://u:xxxxx@[::1]:5432/db"},
		{"multi-host", "postgres://u:TopSecret9@h1:5432,h2:5433/db?target_session_attrs=read-write&password=TopSecret9",
			"postgres://u:xxxxx@h1:5432,h2:5433/db?target_session_attrs=read-write&password=xxxxx"},
		{"unescaped @ and /", "postgres://u:Top/Sec@ret9@h/db", "postgres://u:xxxxx@h/db"},
		{"digits and /", "postgres://u:12/34TopSecret9@h/db", "postgres://u:xxxxx@h/db"},
		{"unescaped ?", "postgres://u:Top?Secret9@h/db?password=TopSecret9", "postgres://u:xxxxx@h/db?password=xxxxx"},
		{"bad escape", "postgres://u:Top%zzSecret9@h/db", "postgres://u:xxxxx@h/db"},
		{"no scheme", "admin:TopSecret9@db.example.com/broker", "admin:xxxxx@db.example.com/broker"},
		{"key=value", "host=db.example.com user=admin password=TopSecret9 dbname=broker",
			"host=db.example.com user=admin password=xxxxx dbname=broker"},
		{"quoted", "host=h password='Top Secret9' dbname=broker", "host=h password=xxxxx dbname=broker"},
		{"quoted with escapes", `host=h password='it\'s TopSecret9 \\' port=5432`, "host=h password=xxxxx port=5432"},
		{"spaces around =", "host=h  password = TopSecret9\tport=5432", "host=h  password = xxxxx\tport=5432"},
		{"bare with escape", `password=Top\ Secret9 host=h`, "password=xxxxx host=h"},
		{"sslpassword setting", "sslpassword=TopSecret9 host=h", "sslpassword=xxxxx host=h"},
		{"unterminated quote", "host=h password='TopSecret9", "host=h password=xxxxx"},
		{"unquoted space", "host=h password=Top Secret9 port=5432", "host=h password=xxxxx"},
		{"url as a value", "dbname=postgres://u:TopSecret9@h/db host=h", "dbname=postgres://u:xxxxx@h/db host=h"},
		{"@ in a query password", "postgres://u@h/db?password=Top@Secret9", "postgres://u@h/db?password=xxxxx"},
		{"@ in both", "postgres://u:Pw1Secret@h/db?password=Top@Secret9", "postgres://u:xxxxx@h/db?password=xxxxx"},
		{"@ in a query password, pool setting", "postgres://u@h/db?password=Top@Secret9&pool_max_conns=abc",
			"postgres://u@h/db?password=xxxxx&pool_max_conns=abc"},
		{"one slash", "postgres:/admin:TopSecret9@db/broker?sslmode=require", "postgres:xxxxx@db/broker?sslmode=require"},
		{"jdbc", "jdbc:postgresql://h/db?user=u&password=TopSecret9", "jdbc:postgresql://h/db?user=u&password=xxxxx"},
		{"env file quotes", `"postgres://admin:TopSecret9@db/broker?sslmode=require"`, `"postgres://admin:xxxxx@db/broker?sslmode=require"`},
		{"url as a value, then junk", "dbname=postgres://u:TopSecret9@h/db host=h junk", "dbname=postgres:xxxxx@h/db host=h junk"},
		{"nothing secret", "localhost:5432", "localhost:5432"},
		{"empty", "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := db.Redact(tc.in)
			require.Equal(t, tc.want, got)
			require.NotContains(t, got, "Secret")
		})
	}
}

// A connection string pgx refuses is quoted in the error without its password, even where
// pgx's own masking misses part of it.
func TestParseErrorsHidePassword(t *testing.T) {
	for in, want := range map[string]string{
		`host=h port=abc password='it\'s TopSecret9'`: "invalid port",
		"host=h password=Top Secret9 c=d":             "keyword/value",
		"postgres://u:Top%zzSecret9@h/db":             "password",
	} {
		_, err := db.NewPool(context.Background(), in, db.PoolConfig{})
		require.ErrorContains(t, err, want, in)
		require.NotContains(t, err.Error(), "Secret", in)
		_, err = db.NewMigrator(in, nil)
		require.ErrorContains(t, err, want, in)
		require.NotContains(t, err.Error(), "Secret", in)
	}
}
