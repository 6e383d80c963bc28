//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package db

import (
	"crypto/tls"
	"errors"
	"net"
	"syscall"
)

// inputWaiting reports whether an idle connection's socket has something to read (the server
// closed it, or wrote to it unasked: a FATAL before closing), found by one non-blocking peek
// that leaves the bytes for pgx. False when nothing waits or the socket can't be inspected.
func inputWaiting(c net.Conn) bool {
	if t, ok := c.(*tls.Conn); ok {
		c = t.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	waiting := false
	_ = raw.Control(func(fd uintptr) {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EWOULDBLOCK) || errors.Is(err, syscall.EINTR):
		case err != nil: // reset: dead
			waiting = true
		default: // n == 0 is the server's close
			waiting = n >= 0
		}
	})
	return waiting
}
