//go:build unix

package embedded

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
)

// account is the unprivileged user initdb and postgres run as when we are root.
type account struct {
	name     string
	uid, gid uint32
}

// runAsCandidates are tried in order: Debian's postgresql package creates "postgres"; "nobody"
// exists nearly everywhere else.
var runAsCandidates = []string{"postgres", "nobody"}

// unprivilegedAccount returns the account to run postgres as, or nil when we are not root.
// initdb and postgres refuse to run as root, so root (containers, CI) must switch user.
func unprivilegedAccount() (*account, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	for _, name := range runAsCandidates {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
		gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
		if err1 != nil || err2 != nil || uid == 0 {
			continue
		}
		return &account{name: name, uid: uint32(uid), gid: uint32(gid)}, nil
	}
	return nil, errors.New("running as root, but neither a postgres nor a nobody user exists to run postgres as " +
		"(postgres refuses to run as root); create a postgres user or run as a normal user")
}

// makeReachable lets acct traverse every parent directory of dir. Temporary directories are
// often private to root (Go's t.TempDir is 0700), and postgres must chdir into its data
// directory. Only the search bit for others (o+x) is added, and only where missing: it lets a
// process follow a known path through the directory but not list it.
func makeReachable(dir string, acct *account, log *slog.Logger) error {
	for p := filepath.Dir(dir); ; p = filepath.Dir(p) {
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil {
			return &fs.PathError{Op: "stat", Path: p, Err: err}
		}
		mode := uint32(st.Mode) & 0o7777
		if !canSearch(mode, st.Uid, st.Gid, acct) {
			if err := syscall.Chmod(p, mode|0o001); err != nil {
				return fmt.Errorf("chmod o+x %s: %w", p, err)
			}
			// A warning: it opens a directory the user may have meant to keep closed (/root).
			log.Warn("added search permission for others (o+x) to a parent of the data directory so the postgres user can reach it",
				"path", p, "run_as", acct.name, "old_mode", fmt.Sprintf("%04o", mode), "new_mode", fmt.Sprintf("%04o", mode|0o001))
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

// canSearch applies the Unix permission rules for execute (search) on a directory: the owner
// class if acct owns it, else the group class if its primary group matches (postgres runs
// without supplementary groups), else others. ACLs are not considered.
func canSearch(mode, fileUID, fileGID uint32, acct *account) bool {
	switch {
	case fileUID == acct.uid:
		return mode&0o100 != 0
	case fileGID == acct.gid:
		return mode&0o010 != 0
	default:
		return mode&0o001 != 0
	}
}

// chownTree gives dir and everything below it to acct, touching only entries that differ.
func chownTree(dir string, acct *account) error {
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed meanwhile
			}
			return err
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok && st.Uid == acct.uid && st.Gid == acct.gid {
			return nil
		}
		if err := os.Lchown(path, int(acct.uid), int(acct.gid)); err != nil {
			return fmt.Errorf("chown %s: %w", path, err)
		}
		return nil
	})
}
