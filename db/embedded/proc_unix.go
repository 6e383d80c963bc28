//go:build unix

package embedded

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clearLeftover makes sure no postmaster from an earlier run holds the data directory. The
// caller holds the data directory's lock, so no owner that takes the lock is alive.
//
// postmaster.pid names the last postmaster. If that process is gone, postgres recognises the
// file as stale by itself (and still checks, through the shared-memory key in the file, that no
// orphaned backend is attached), so the file stays. If it has exited but its parent has not
// reaped it (a zombie), postgres still counts it as running; see clearUnreaped. If a postmaster
// of this directory is still running, its parent decides: a live parent in the postmaster's
// session started it without the lock (an older broker binary, a hand-run postgres), so the
// server is not ours to stop and an *InUseError naming that parent is returned; otherwise its
// owner died without Stop and it is stopped. If the pid now belongs to an unrelated process,
// postgres would refuse to start, so the file is removed, but only when no postgres process is
// seen working in the directory.
//
// Identification needs /proc (Linux). Elsewhere a live pid is left for postgres to judge, which
// fails the start with its "lock file already exists" message rather than signalling a process
// we cannot identify.
func (c *Cluster) clearLeftover(ctx context.Context) error {
	pidPath := filepath.Join(c.dataDir, pidFileName)
	pf, err := readPIDFile(pidPath)
	pid := pf.pid
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		// An empty or torn file (crash while it was being written) makes postgres refuse to
		// start until someone removes it.
		c.log.Warn("removing unreadable postmaster.pid left by an earlier run", "err", err)
		if err := os.Remove(pidPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove stale postmaster.pid: %w", err)
		}
		return nil
	}
	if !alive(pid) {
		if exists(pid) {
			return c.clearUnreaped(ctx, pidPath, pid)
		}
		c.log.Info("found stale postmaster.pid from an earlier run; its process is gone", "stale_pid", pid)
		return nil
	}
	owns, known := ownsDataDir(pid, c.dataDir)
	switch {
	case known && owns:
		if starter, ok := liveStarter(pid); ok {
			// Not ours to stop. If it is already shutting down on its own, waiting is enough.
			if pf.status == "stopping" && waitUntil(ctx, fastShutdownTimeout, func() bool { return !alive(pid) }) {
				c.log.Info("postgres of a live process finished shutting down", "pid", pid, "owner_pid", starter)
				return nil
			}
			c.log.Info("postgres in the data dir was started by a live process that holds no lock; leaving it running",
				"pid", pid, "owner_pid", starter)
			return &InUseError{DataDir: c.dataDir, OwnerPID: starter}
		}
		c.log.Warn("stopping postgres left running by an earlier run whose owner is gone", "pid", pid)
		began := time.Now()
		err := c.endPostmaster(ctx, pid,
			func(sig syscall.Signal) { _ = syscall.Kill(pid, sig) },
			func(ctx context.Context, d time.Duration) bool {
				return waitUntil(ctx, d, func() bool { return !alive(pid) })
			})
		if err != nil {
			return fmt.Errorf("stop earlier postgres: %w", err)
		}
		c.log.Info("stopped postgres left running by an earlier run", "pid", pid,
			"elapsed", time.Since(began).Round(time.Millisecond))
		if exists(pid) {
			// Not our child: its parent reaps it, if ever. Killed, it left postmaster.pid behind.
			return c.clearUnreaped(ctx, pidPath, pid)
		}
		return nil
	case known:
		procs, reliable := postgresProcsIn(c.dataDir)
		if !reliable || len(procs) > 0 {
			c.log.Warn("postmaster.pid names an unrelated live process, but postgres processes may still use the data dir; leaving it to postgres",
				"stale_pid", pid, "postgres_pids", procs)
			return nil
		}
		c.log.Warn("removing stale postmaster.pid whose pid now belongs to an unrelated process", "stale_pid", pid)
		if err := os.Remove(pidPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove stale postmaster.pid: %w", err)
		}
		return nil
	default:
		c.log.Warn("postmaster.pid names a live process that cannot be identified; leaving it to postgres", "pid", pid)
		return nil
	}
}

// unreapedTimeout bounds how long clearUnreaped waits for the processes of a dead postmaster.
const unreapedTimeout = 10 * time.Second

// clearUnreaped handles a postmaster.pid naming pid, a process that has exited but that its
// parent has not reaped (a zombie): postgres's own check (kill(pid, 0)) counts it as running and
// refuses to start ("lock file already exists"), for as long as the parent does not reap it,
// which may be forever (some container inits never do). So once the pid is gone, or no postgres
// process works in the directory any more (orphaned backends of a dead postmaster leave within
// moments), the file is stale. It is removed only in the second case, because postgres's own
// check that no orphaned backend is attached goes with it.
func (c *Cluster) clearUnreaped(ctx context.Context, pidPath string, pid int) error {
	if pf, err := readPIDFile(pidPath); err != nil || pf.pid != pid {
		return nil // a clean shutdown removed it
	}
	var procs []int
	reliable := false
	waitUntil(ctx, unreapedTimeout, func() bool {
		if !exists(pid) {
			return true
		}
		procs, reliable = postgresProcsIn(c.dataDir)
		return reliable && len(procs) == 0
	})
	if !exists(pid) {
		c.log.Info("found stale postmaster.pid from an earlier run; its process is gone", "stale_pid", pid)
		return nil
	}
	parent := 0
	if st, ok := readProcStat(pid); ok {
		parent = st.ppid
	}
	if !reliable || len(procs) > 0 {
		return fmt.Errorf("postmaster.pid in %s names process %d, which has exited but was not reaped by its parent (pid %d), "+
			"and postgres processes %v may still work in the directory; postgres refuses to start until they are gone",
			c.dataDir, pid, parent, procs)
	}
	c.log.Warn("removing postmaster.pid of a postgres that has exited but was not reaped by its parent; postgres would count it as running",
		"stale_pid", pid, "parent_pid", parent)
	if err := os.Remove(pidPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale postmaster.pid: %w", err)
	}
	return nil
}

// liveStarter returns the parent of postmaster pid if that parent is alive and is the process
// that started it. An orphan is reparented to init or a subreaper, which run in sessions of
// their own, while the starter shares the postmaster's session (the postmaster gets its own
// process group, not its own session). The parent pid cannot be a recycled one: while the
// postmaster lives, its ppid always names its current parent.
func liveStarter(pid int) (int, bool) {
	st, ok := readProcStat(pid)
	if !ok || st.ppid <= 0 {
		return 0, false
	}
	parent, ok := readProcStat(st.ppid)
	if !ok || parent.state == 'Z' {
		return 0, false
	}
	return st.ppid, parent.session == st.session
}

// alive reports whether pid names a running process. A zombie has exited and only waits for
// its parent, so it does not count (but see exists).
func alive(pid int) bool {
	if !exists(pid) {
		return false
	}
	if st, ok := readProcStat(pid); ok && (st.state == 'Z' || st.state == 'X') {
		return false
	}
	return true
}

// exists reports whether pid names a process, a zombie included: what postgres's check of
// postmaster.pid sees. EPERM means it exists but belongs to someone else.
func exists(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

type procStat struct {
	state   byte
	ppid    int
	session int
}

// readProcStat parses /proc/<pid>/stat, which is world-readable (unlike cwd or exe).
func readProcStat(pid int) (procStat, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, false
	}
	// "pid (comm) state ppid ...": comm may contain spaces and parentheses, so split after the
	// last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return procStat{}, false
	}
	// After it: state, ppid, pgrp, session, ...
	fields := strings.Fields(s[i+1:])
	if len(fields) < 4 || len(fields[0]) != 1 {
		return procStat{}, false
	}
	ppid, err1 := strconv.Atoi(fields[1])
	session, err2 := strconv.Atoi(fields[3])
	if err1 != nil || err2 != nil {
		return procStat{}, false
	}
	return procStat{state: fields[0][0], ppid: ppid, session: session}, true
}

// pids lists the numeric entries of /proc; nil without procfs.
func pids() []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, pid)
		}
	}
	return out
}

// childPIDs returns the live children of ppid (Linux; nil elsewhere).
func childPIDs(ppid int) []int {
	var out []int
	for _, pid := range pids() {
		if st, ok := readProcStat(pid); ok && st.ppid == ppid && st.state != 'Z' {
			out = append(out, pid)
		}
	}
	return out
}

// ownsDataDir reports whether pid is a postgres process working in dataDir; known is false
// when that cannot be determined. Every postgres process chdirs to its data directory, so the
// cwd is the best evidence; it needs ptrace-level access, so the command line ("-D dir") is the
// fallback.
func ownsDataDir(pid int, dataDir string) (owns, known bool) {
	proc := "/proc/" + strconv.Itoa(pid)
	if cwd, err := os.Readlink(proc + "/cwd"); err == nil {
		return cwd == dataDir, true
	}
	b, err := os.ReadFile(proc + "/cmdline")
	if err != nil || len(b) == 0 {
		return false, false
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	if name := filepath.Base(args[0]); name != "postgres" && name != "postmaster" {
		return false, true
	}
	for i, a := range args {
		var d string
		switch {
		case a == "-D" && i+1 < len(args):
			d = args[i+1]
		case strings.HasPrefix(a, "-D") && len(a) > 2:
			d = a[2:]
		default:
			continue
		}
		if real, err := filepath.EvalSymlinks(d); err == nil && real == dataDir {
			return true, true
		}
	}
	// A postgres whose data directory we cannot see (relative -D, PGDATA): undecidable.
	return false, false
}

// postgresProcsIn lists postgres processes whose cwd is dataDir. reliable is false when procfs
// is missing or some postgres process's cwd could not be read.
func postgresProcsIn(dataDir string) (found []int, reliable bool) {
	all := pids()
	if all == nil {
		return nil, false
	}
	reliable = true
	for _, pid := range all {
		proc := "/proc/" + strconv.Itoa(pid)
		comm, err := os.ReadFile(proc + "/comm")
		if err != nil {
			continue // exited meanwhile
		}
		if name := strings.TrimSpace(string(comm)); name != "postgres" && name != "postmaster" {
			continue
		}
		cwd, err := os.Readlink(proc + "/cwd")
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			reliable = false
		case cwd == dataDir:
			found = append(found, pid)
		}
	}
	return found, reliable
}
