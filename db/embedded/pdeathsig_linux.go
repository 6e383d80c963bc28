package embedded

import "syscall"

// setParentDeathSignal asks the kernel to send the postmaster SIGINT (fast shutdown) if this
// process dies without calling Stop (kill -9, a test binary's timeout panic), so no orphaned
// server keeps the data directory and port.
func setParentDeathSignal(attr *syscall.SysProcAttr) {
	attr.Pdeathsig = syscall.SIGINT
}
