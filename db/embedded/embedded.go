// Package embedded runs a private PostgreSQL cluster from the machine's binaries, for use when
// no DATABASE_URL is configured (local development, the test harness).
//
// The cluster is a plain initdb data directory started as a child postmaster: it listens only on
// 127.0.0.1 (no Unix socket) and uses trust authentication for the superuser "postgres". It is
// not a replacement for a managed database: anyone who can open a TCP connection to 127.0.0.1 on
// its port is superuser.
//
// # Ownership
//
// A data directory has at most one owner: the process that started its postmaster, and the one
// that stops it (the single exception, the leftover of a dead owner, is described below). The
// owner holds an exclusive flock(2) on the data directory from before initdb until its
// postmaster has been reaped. The kernel drops the lock when the owner exits, however it exits,
// and a lock names no pid that could be recycled, so "the lock is free" reliably means "no live
// owner". The owner also writes its pid to owner.pid in the directory; that file only names the
// owner in messages and decides nothing.
//
// Start on a directory whose lock is held does not touch the running cluster. With
// Config.Attach it waits until that postmaster accepts connections, checks that it serves this
// directory, creates Config.Database if missing and returns a Cluster whose Stop leaves the
// postmaster running. Without Attach it fails with an *InUseError naming the owner. The broker
// attaches its short-lived commands (admin verbs, migrate) and refuses a second serve or dev: a
// long-running replica attached to another process's cluster would lose its database whenever
// that process exits, so sharing is left to an explicit DATABASE_URL.
//
// Start on a directory whose lock is free becomes the owner. A postmaster still running there is
// a leftover of an owner that died without Stop (on Linux the postmaster gets SIGINT when its
// owner dies, so it is normally on its way out already) and is stopped before the new one
// starts. As a second check, a postmaster whose parent is alive and in the same session is never
// treated as a leftover even with the lock free: it was started by a live process that does not
// take the lock (an older broker binary, a hand-run postgres). An orphan is reparented to init or
// a subreaper, which run in sessions of their own; the owner shares the postmaster's session,
// since the postmaster gets its own process group but not its own session.
//
// Binaries are found by FindBinDir, or, for a data directory that already holds a cluster, are
// those of its PostgreSQL major version; nothing is downloaded. When the process runs as root, the
// cluster runs as the unprivileged "postgres" user (or "nobody" if that does not exist), because
// initdb and postgres refuse to run as root; see Start for what that changes on disk.
package embedded

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Config configures Start.
type Config struct {
	// DataDir is the cluster's data directory (PGDATA). Required. It is created if missing and
	// reused if it already holds a cluster (a PG_VERSION file).
	DataDir string
	// Port is the TCP port on 127.0.0.1. 0 picks a free port at each start.
	Port int
	// Logger receives lifecycle events. nil discards them.
	Logger *slog.Logger
	// Database is created if missing and named in URL. Default "claudemesh".
	Database string
	// Attach lets Start use a cluster that another live process already runs in DataDir: the
	// returned Cluster connects to it and its Stop leaves it running. Without Attach, Start
	// fails with an *InUseError in that case. See the package doc for why the broker attaches
	// only its short-lived commands.
	Attach bool
}

// InUseError is Start's error when another live process runs the cluster in DataDir and
// Config.Attach is false.
type InUseError struct {
	DataDir string
	// OwnerPID is the process that started the running postmaster; 0 when not known (the owner
	// is still initializing the directory).
	OwnerPID int
	// URL is the running cluster's URL for Config.Database; "" while it does not accept
	// connections yet.
	URL string
}

func (e *InUseError) Error() string {
	s := fmt.Sprintf("embedded postgres in %s is already run by %s", e.DataDir, ownerName(e.OwnerPID))
	if e.URL != "" {
		s += " at " + e.URL
	}
	return s
}

// UnexpectedExitError is Cluster.Err's error: the postmaster a Cluster started exited while
// Stop had not been called.
type UnexpectedExitError struct {
	DataDir string
	PID     int
	// How is how it ended: "killed by signal 9 (killed)", "exit status 1".
	How string
	// LogFile is the postmaster's log, which says why when postgres ended itself.
	LogFile string
	// LogTail is the end of what this postmaster wrote to LogFile; "" when unreadable.
	LogTail string
}

func (e *UnexpectedExitError) Error() string {
	s := fmt.Sprintf("embedded postgres in %s (pid %d) exited unexpectedly: %s; its log is %s", e.DataDir, e.PID, e.How, e.LogFile)
	if e.LogTail != "" {
		s += ", ending:\n" + e.LogTail
	}
	return s
}

func ownerName(pid int) string {
	if pid <= 0 {
		return "another process"
	}
	return "process " + strconv.Itoa(pid)
}

// DefaultDatabase is the database Start ensures when Config.Database is empty.
const DefaultDatabase = "claudemesh"

// superuser is the bootstrap role initdb creates and URL connects as. It is fixed (not the OS
// user) so the URL does not depend on who started the cluster.
const superuser = "postgres"

// ErrNoBinaries reports that no PostgreSQL server binaries were found on this machine.
var ErrNoBinaries = errors.New("no PostgreSQL server binaries (initdb, postgres) found on PATH, " +
	"via `pg_config --bindir` or in /usr/lib/postgresql/*/bin; install them with " +
	"`sudo apt-get install postgresql` (Debian/Ubuntu) or `make ensure-postgres`, " +
	"or set DATABASE_URL to use an existing server")

// debianBinGlob is where Debian/Ubuntu install server binaries: they are not on PATH there,
// because several major versions may be installed side by side. A variable for tests.
var debianBinGlob = "/usr/lib/postgresql/*/bin"

// FindBinDir returns the directory holding the PostgreSQL server binaries initdb and postgres.
// It looks, in order, at initdb on PATH (with postgres in the same directory), at the output of
// `pg_config --bindir`, and at the newest /usr/lib/postgresql/*/bin. The error wraps
// ErrNoBinaries when nothing is found.
func FindBinDir() (string, error) {
	if p, err := exec.LookPath("initdb"); err == nil {
		// Prefer the real directory behind a symlink (e.g. /usr/local/bin/initdb ->
		// /usr/lib/postgresql/15/bin/initdb): that is where initdb itself looks for postgres.
		if real, err := filepath.EvalSymlinks(p); err == nil && hasServerBinaries(filepath.Dir(real)) {
			return absDir(filepath.Dir(real)), nil
		}
		if hasServerBinaries(filepath.Dir(p)) {
			return absDir(filepath.Dir(p)), nil
		}
	}
	if pgConfig, err := exec.LookPath("pg_config"); err == nil {
		// pg_config may come from a client-only package (libpq-dev), so its bindir is only a
		// candidate until we see the server binaries there.
		if out, err := exec.Command(pgConfig, "--bindir").Output(); err == nil {
			if dir := strings.TrimSpace(string(out)); dir != "" && hasServerBinaries(dir) {
				return absDir(dir), nil
			}
		}
	}
	if dir := newestDebianBinDir(); dir != "" {
		return dir, nil
	}
	return "", fmt.Errorf("find postgres binaries: %w", ErrNoBinaries)
}

// binDirFor returns the directory of the server binaries for the cluster in dataDir: when it
// already holds one, those of its PostgreSQL major version (PG_VERSION), because postgres runs
// a data directory only with binaries of the version that created it. They are FindBinDir's
// choice if that matches, else /usr/lib/postgresql/<version>/bin (after an upgrade, Debian
// keeps the older version installed next to the new one). Without a PG_VERSION it is
// FindBinDir's choice. When the matching binaries are not installed, the error says which
// version the data directory needs and what to do.
func binDirFor(dataDir string) (string, error) {
	want := dataDirVersion(dataDir)
	found, err := FindBinDir()
	if want == "" {
		return found, err
	}
	have := ""
	if err == nil {
		if have = binVersion(found); have == want {
			return found, nil
		}
	}
	if dir := debianBinDir(want); dir != "" {
		return dir, nil
	}
	if err != nil {
		return "", fmt.Errorf("find postgres binaries for %s, which needs PostgreSQL %s: %w", dataDir, want, err)
	}
	if have == "" {
		return found, nil // version unknown: postgres itself judges
	}
	return "", fmt.Errorf("data directory %s was created by PostgreSQL %s, but the server binaries installed are "+
		"PostgreSQL %s (%s), and postgres runs a data directory only with binaries of its own major version:\n"+
		"  install PostgreSQL %s's server binaries (Debian/Ubuntu: `sudo apt-get install postgresql-%s`), or\n"+
		"  move %s away to start with a fresh, empty one (it holds the broker's data: keep it while you need "+
		"that data, or upgrade it with pg_upgrade)", dataDir, want, have, found, want, want, dataDir)
}

// dataDirVersion returns the PostgreSQL major version in dataDir's PG_VERSION ("15", "9.6"), or
// "" when there is none.
func dataDirVersion(dataDir string) string {
	b, err := os.ReadFile(filepath.Join(dataDir, "PG_VERSION"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// pgVersionRE finds the version in `postgres --version` output, e.g.
// "postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)" or "postgres (PostgreSQL) 17beta1".
var pgVersionRE = regexp.MustCompile(`\(PostgreSQL\) (\d+)(\.\d+)?`)

// binVersion returns the major version of the postgres binary in binDir in PG_VERSION's form
// ("15", or "9.6" before PostgreSQL 10), or "" when it cannot be told.
func binVersion(binDir string) string {
	out, err := exec.Command(filepath.Join(binDir, "postgres"), "--version").Output()
	if err != nil {
		return ""
	}
	m := pgVersionRE.FindStringSubmatch(string(out))
	if m == nil {
		return ""
	}
	if major, _ := strconv.Atoi(m[1]); major < 10 {
		return m[1] + m[2]
	}
	return m[1]
}

// debianBinDir returns /usr/lib/postgresql/<version>/bin if it holds the server binaries, or "".
func debianBinDir(version string) string {
	dirs, _ := filepath.Glob(debianBinGlob)
	for _, d := range dirs {
		if filepath.Base(filepath.Dir(d)) == version && hasServerBinaries(d) {
			return d
		}
	}
	return ""
}

// newestDebianBinDir returns the highest-versioned /usr/lib/postgresql/*/bin holding the
// server binaries, or "".
func newestDebianBinDir() string {
	dirs, _ := filepath.Glob(debianBinGlob)
	// Sort numerically: a lexical sort would rank "9.6" above "15".
	sort.SliceStable(dirs, func(i, j int) bool {
		return versionOf(dirs[i]) > versionOf(dirs[j])
	})
	for _, d := range dirs {
		if hasServerBinaries(d) {
			return d
		}
	}
	return ""
}

// versionOf turns /usr/lib/postgresql/<v>/bin into a sortable number: "15" -> 15000,
// "9.6" -> 9006. Unparsable versions sort last.
func versionOf(binDir string) int {
	v := filepath.Base(filepath.Dir(binDir))
	major, minor, _ := strings.Cut(v, ".")
	ma, err := strconv.Atoi(major)
	if err != nil {
		return -1
	}
	mi, _ := strconv.Atoi(minor)
	return ma*1000 + mi
}

func hasServerBinaries(dir string) bool {
	return isExecutable(filepath.Join(dir, "initdb")) && isExecutable(filepath.Join(dir, "postgres"))
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}

func absDir(dir string) string {
	if a, err := filepath.Abs(dir); err == nil {
		return a
	}
	return dir
}

// discardLogger is used when Config.Logger is nil.
func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
