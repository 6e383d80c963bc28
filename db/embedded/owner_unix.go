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

	"github.com/jackc/pgx/v5"
)

const (
	// ownerFileName holds the owning process's pid, for messages; the lock decides ownership.
	ownerFileName = "owner.pid"
	// pidFileName is the lock file postgres itself writes into its data directory.
	pidFileName = "postmaster.pid"
	// attachTimeout bounds one attempt to connect to another process's postmaster.
	attachTimeout = 5 * time.Second
)

// dirLock is a flock(2) on the data directory itself. A directory, not a file in it, because
// initdb demands an empty directory and the lock must already be held while it runs.
type dirLock struct{ f *os.File }

func openDirLock(dir string) (*dirLock, error) {
	// os.Open sets O_CLOEXEC, so postgres never inherits the descriptor (and with it the lock,
	// which would then outlive us).
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("lock data dir: %w", err)
	}
	return &dirLock{f: f}, nil
}

// tryLock takes the lock without waiting; false means another open file description (another
// process, or another Cluster in this one) holds it.
func (l *dirLock) tryLock() (bool, error) {
	err := syscall.Flock(int(l.f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, syscall.EWOULDBLOCK):
		return false, nil
	default:
		return false, fmt.Errorf("lock data dir: %w", err)
	}
}

func (l *dirLock) unlock() { _ = syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN) }

// close releases the lock, if held, with the descriptor. The explicit unlock matters: a child
// that another goroutine is forking at this moment holds a copy of the descriptor until it
// execs (O_CLOEXEC only closes it then), and a lock is only released by closing once every
// copy is closed. The next Start on this directory, at once, found it still held.
func (l *dirLock) close() {
	l.unlock()
	_ = l.f.Close()
}

// writeOwnerFile records our pid for the messages of processes that find the directory in use.
func (c *Cluster) writeOwnerFile() error {
	path := filepath.Join(c.dataDir, ownerFileName)
	if err := os.WriteFile(path, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", ownerFileName, err)
	}
	if c.acct != nil {
		// Keep the whole data directory owned by the user postgres runs as.
		if err := os.Chown(path, int(c.acct.uid), int(c.acct.gid)); err != nil {
			return fmt.Errorf("write %s: %w", ownerFileName, err)
		}
	}
	return nil
}

func (c *Cluster) removeOwnerFile() {
	if err := os.Remove(filepath.Join(c.dataDir, ownerFileName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		c.log.Warn("could not remove "+ownerFileName, "err", err)
	}
}

// readOwnerFile returns the pid in owner.pid, or 0 when there is none (the owner is still in
// initdb, which needs the directory empty).
func readOwnerFile(dataDir string) int {
	b, err := os.ReadFile(filepath.Join(dataDir, ownerFileName))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}

// pidFile is what postgres writes to postmaster.pid: the pid on line 1, the port on line 4 and,
// since PostgreSQL 10, the status on line 8. Postgres fills it in stages while it starts, so
// later fields may be missing.
type pidFile struct {
	pid    int
	port   int
	status string // "starting", "ready", "stopping", "standby", or "" when not written yet
}

// ready reports whether the file says the postmaster accepts connections; without a status line
// (an older PostgreSQL, or a file still being written) only a connection attempt can tell.
func (f pidFile) ready() bool {
	return f.port > 0 && f.status != "starting" && f.status != "stopping"
}

// readPIDFile parses postmaster.pid; the error is non-nil when it names no pid.
func readPIDFile(path string) (pidFile, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return pidFile{}, err
	}
	lines := strings.Split(string(b), "\n")
	var f pidFile
	f.pid, err = strconv.Atoi(strings.TrimSpace(lines[0]))
	if err != nil || f.pid <= 0 {
		return pidFile{}, fmt.Errorf("no pid in %s: %q", path, lines[0])
	}
	if len(lines) > 3 {
		f.port, _ = strconv.Atoi(strings.TrimSpace(lines[3]))
	}
	if len(lines) > 7 {
		f.status = strings.TrimSpace(lines[7])
	}
	return f, nil
}

// attach makes c a client of the postmaster another process runs in c.dataDir, described by pf:
// it must be alive, accept connections and serve this very directory (a port read from a stale
// file may belong to another server by now). It creates c.database if missing.
func (c *Cluster) attach(ctx context.Context, ownerPID int, pf pidFile) error {
	switch {
	case pf.pid == 0 || !alive(pf.pid):
		return errors.New("no postmaster running yet")
	case !pf.ready():
		return fmt.Errorf("postmaster %d is not ready (status %q)", pf.pid, pf.status)
	}
	ctx, cancel := context.WithTimeout(ctx, attachTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, connURL(pf.port, "postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var dir string
	if err := conn.QueryRow(ctx, "SELECT current_setting('data_directory')").Scan(&dir); err != nil {
		return fmt.Errorf("ask postmaster %d for its data directory: %w", pf.pid, err)
	}
	if real, err := filepath.EvalSymlinks(dir); err != nil || real != c.dataDir {
		return fmt.Errorf("port %d is served by a postgres of another data directory (%s)", pf.port, dir)
	}
	c.port = pf.port
	if err := c.ensureDatabase(ctx, conn); err != nil {
		return err
	}
	c.ownerPID, c.attachedPID = ownerPID, pf.pid
	c.log.Info("attached to embedded postgres run by another process; it stays running after we stop",
		"owner_pid", ownerPID, "pid", pf.pid, "port", pf.port, "database", c.database)
	return nil
}
