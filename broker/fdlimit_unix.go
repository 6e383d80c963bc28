//go:build unix

package broker

import "syscall"

// raiseFileLimit raises the process's soft limit on open files to its hard limit and returns
// the result: every session holds a descriptor, so the soft limit (often 1024) and not memory
// would otherwise cap a replica. (Go's runtime raises it once at start; a limit lowered since,
// or a runtime that stops doing so, is covered here, and the broker learns the number.)
func raiseFileLimit() (before, after uint64, err error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, 0, err
	}
	before = l.Cur
	if l.Cur < l.Max {
		l.Cur = l.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
			return before, before, err
		}
	}
	return before, l.Cur, nil
}
