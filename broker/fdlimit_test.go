//go:build unix

package broker

import (
	"net/http"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// A replica started under a low soft limit on open files (a shell's 1024, say) raises it to the
// hard limit, so descriptors don't cap its sessions, and says what that allows.
// Not parallel: it changes the limit of the whole test process.
func TestStartRaisesTheOpenFileLimit(t *testing.T) {
	var orig syscall.Rlimit
	require.NoError(t, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig))
	if orig.Max < 2048 {
		t.Skipf("the hard limit on open files is %d here: too low to lower the soft one below it", orig.Max)
	}
	low := syscall.Rlimit{Cur: 1024, Max: orig.Max}
	require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low))
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig) })

	c := newCluster(t, 1, nil)
	var now syscall.Rlimit
	require.NoError(t, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &now))
	require.Equal(t, orig.Max, now.Cur, "raised to the hard limit at start")

	code, h := getHealth(t, c.nodes[0].Addr())
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, orig.Max, h.OpenFilesMax)
	require.Equal(t, int(orig.Max)-fdReserve, h.Capacity)
	fams, err := c.nodes[0].metrics.Registry.Gather()
	require.NoError(t, err)
	var capacity float64 = -1
	for _, f := range fams {
		if f.GetName() == "claudemesh_session_capacity" {
			capacity = f.GetMetric()[0].GetGauge().GetValue()
		}
	}
	require.Equal(t, float64(h.Capacity), capacity, "claudemesh_session_capacity")
}
