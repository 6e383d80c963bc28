//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package db

import "net"

// inputWaiting: no non-blocking peek here; dead connections are found by use, as before.
func inputWaiting(net.Conn) bool { return false }
