package broker

import (
	"net"

	"golang.org/x/sys/unix"
)

// unsentBytes reports the bytes c's kernel still holds for the peer (sent and not yet
// acknowledged, or not sent), or -1 when it can't tell.
func unsentBytes(c *net.TCPConn) int {
	raw, err := c.SyscallConn()
	if err != nil {
		return -1
	}
	n := -1
	if err := raw.Control(func(fd uintptr) {
		if v, err := unix.IoctlGetInt(int(fd), unix.SIOCOUTQ); err == nil {
			n = v
		}
	}); err != nil {
		return -1
	}
	return n
}
