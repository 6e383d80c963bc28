//go:build unix && !linux

package embedded

import "syscall"

// setParentDeathSignal is a no-op where the kernel has no parent-death signal; a postmaster
// orphaned by a crash is stopped by the next Start on the same data directory instead.
func setParentDeathSignal(*syscall.SysProcAttr) {}
