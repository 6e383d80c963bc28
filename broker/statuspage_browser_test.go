//go:build unix

package broker

import (
	"bytes"
	"context"
	"errors"
	"image/png"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/protocol"
)

// chromiumBinary finds a Chromium to drive: $CHROMIUM, else Debian's /usr/bin/chromium, else
// chromium or chromium-browser on PATH. It returns "" and why when there is none.
func chromiumBinary() (path, why string) {
	if p := os.Getenv("CHROMIUM"); p != "" {
		if found, err := exec.LookPath(p); err == nil {
			return found, ""
		}
		return "", "CHROMIUM=" + p + " is not an executable file"
	}
	if _, err := exec.LookPath("/usr/bin/chromium"); err == nil {
		return "/usr/bin/chromium", ""
	}
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p, ""
		}
	}
	return "", "no /usr/bin/chromium, no chromium on PATH and CHROMIUM unset"
}

// runChromium runs one headless Chromium with its own throwaway profile and returns stdout.
// Chromium forks helpers (zygote, renderer), so it runs in its own process group and a
// timeout kills the whole group.
func runChromium(t *testing.T, bin string, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + t.TempDir()}
	cmd := exec.CommandContext(ctx, bin, append(base, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil || ctx.Err() != nil {
		t.Fatalf("chromium %s: %v (timeout: %v)\nstderr (tail):\n%s", strings.Join(args, " "), err,
			errors.Is(ctx.Err(), context.DeadlineExceeded), tail(stderr.String(), 2000))
	}
	return stdout.Bytes()
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// artifactsDir is where the screenshot goes: $ARTIFACTS_DIR (kept, CI uploads it), else the
// test's temporary directory.
func artifactsDir(t *testing.T) string {
	t.Helper()
	if d := os.Getenv("ARTIFACTS_DIR"); d != "" {
		require.NoError(t, os.MkdirAll(d, 0o755))
		return d
	}
	return t.TempDir()
}

// TestStatusPageInChromium loads /status from a running 2-replica cluster in headless
// Chromium, checks the rendered DOM and saves a screenshot.
func TestStatusPageInChromium(t *testing.T) {
	bin, why := chromiumBinary()
	if bin == "" {
		if os.Getenv("CI") != "" { // CI installs Chromium: a skip there would hide a broken page
			t.Fatalf("no Chromium in CI: %s", why)
		}
		t.Skipf("skipping the headless-browser test of /status: %s (install Debian's chromium package, or set CHROMIUM to a Chromium binary)", why)
	}
	// Not parallel: Chromium takes both cores of a small CI machine for a few seconds, which
	// would starve the timing-sensitive cluster tests running beside it. Sequential tests run
	// while the parallel ones wait.

	c := newCluster(t, 2, func(cfg *Config) { cfg.AdminToken = testAdminToken })
	team, ops := c.mesh(0), c.mesh(0)
	teamSlug, opsSlug := statusPageMeshSlug(t, c, team.id), statusPageMeshSlug(t, c, ops.id)
	alice := team.dial(0, team.member("alice"))
	team.dial(1, team.member("bob"), func(o *client.Options) { o.SessionID = "s-bob-1" })
	ops.dial(1, ops.member("carol"))
	ctx := ctxT(t)
	// One message for an offline member, so the deliveries card shows something.
	_, err := alice.Send(ctx, team.member("dave").pub, protocol.PriorityNext, "n", "c", "")
	require.NoError(t, err)

	pageURL := "http://" + c.nodes[0].Addr() + "/status?token=" + url.QueryEscape(testAdminToken)
	start := time.Now()
	dom := string(runChromium(t, bin, "--dump-dom", pageURL))
	t.Logf("chromium rendered the page in %s (%d bytes of DOM)", time.Since(start).Round(time.Millisecond), len(dom))

	require.Contains(t, dom, "claudemesh cluster status", "the page rendered (not a 401 or an error page)")
	require.Equal(t, "n0", pageField(dom, "self-node"))
	require.Equal(t, "up", pageField(dom, "listener"))
	for node, sessions := range map[string]string{"n0": "1", "n1": "2"} {
		row := pageRow(dom, "node-"+node)
		require.NotEmpty(t, row, "node %s listed", node)
		require.Equal(t, "live", pageField(row, "state"), node)
		require.Equal(t, sessions, pageField(row, "sessions"), "sessions on %s", node)
	}
	require.Equal(t, "2", pageField(dom, "live-nodes"))
	require.Equal(t, "3", pageField(dom, "live-sessions"), "three peers connected")
	require.Equal(t, "2", pageField(dom, "mesh-total"))
	require.Equal(t, "1", pageField(dom, "deliveries-pending"))

	teamRow := pageRow(dom, "mesh-"+teamSlug)
	require.NotEmpty(t, teamRow, "mesh %s listed", teamSlug)
	require.Equal(t, "2", pageField(teamRow, "live"), "two peers in %s", teamSlug)
	require.Equal(t, "2 / 3", pageField(teamRow, "members"))
	require.Contains(t, teamRow, "alice")
	require.Contains(t, teamRow, "bob")
	opsRow := pageRow(dom, "mesh-"+opsSlug)
	require.Equal(t, "1", pageField(opsRow, "live"), "one peer in %s", opsSlug)
	require.Contains(t, opsRow, "carol")
	// The refresh keeps the token, so the page keeps working after it reloads.
	require.Contains(t, dom, `content="5; url=?token=`+testAdminToken+`"`)

	shot := filepath.Join(artifactsDir(t), "status-page.png")
	_ = os.Remove(shot) // a stale file from an earlier run must not pass for this one
	start = time.Now()
	runChromium(t, bin, "--screenshot="+shot, "--window-size=1280,900", "--hide-scrollbars", pageURL)
	f, err := os.Open(shot)
	require.NoError(t, err, "chromium wrote no screenshot")
	defer f.Close()
	img, err := png.Decode(f)
	require.NoError(t, err, "screenshot is not a PNG")
	require.Equal(t, 1280, img.Bounds().Dx())
	require.Equal(t, 900, img.Bounds().Dy())
	t.Logf("screenshot of /status saved to %s (%s)", shot, time.Since(start).Round(time.Millisecond))
}
