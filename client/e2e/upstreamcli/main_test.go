package upstreamcli

import (
	"testing"

	"github.com/claudemesh/broker/db/dbtest"
)

// No goroutine may outlive the package's tests; the throwaway Postgres, if one was started, is
// stopped.
func TestMain(m *testing.M) { dbtest.Main(m) }
