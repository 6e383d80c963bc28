package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// roundRobin is a small TCP load balancer for `broker dev`: each new connection goes to the
// next backend that accepts it, with no stickiness, as a cloud load balancer would do.
type roundRobin struct {
	backends []string
	next     atomic.Uint64
	log      *slog.Logger
	wg       sync.WaitGroup
}

func (lb *roundRobin) serve(ctx context.Context, ln net.Listener) {
	go func() { <-ctx.Done(); _ = ln.Close() }()
	delay := 5 * time.Millisecond
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				lb.wg.Wait()
				return
			}
			// Out of file descriptors and the like pass: back off and keep accepting (as
			// net/http does) instead of going deaf for good.
			lb.log.Warn("load balancer accept; retrying", "err", err, "retry_in", delay)
			select {
			case <-time.After(delay):
			case <-ctx.Done():
			}
			delay = min(delay*2, time.Second)
			continue
		}
		delay = 5 * time.Millisecond
		lb.wg.Add(1)
		go func() {
			defer lb.wg.Done()
			lb.proxy(ctx, c)
		}()
	}
}

func (lb *roundRobin) proxy(ctx context.Context, c net.Conn) {
	defer c.Close()
	start := lb.next.Add(1)
	var up net.Conn
	for i := range lb.backends { // skip replicas that are down, like a health-checked LB
		addr := lb.backends[(int(start)+i)%len(lb.backends)]
		d := net.Dialer{Timeout: time.Second}
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			up = conn
			break
		}
	}
	if up == nil {
		return
	}
	defer up.Close()
	sent := make(chan error, 1)
	answered := make(chan struct{})
	go func() { _, err := io.Copy(up, c); sent <- err }()
	go func() { _, _ = io.Copy(c, up); close(answered) }()
	select {
	case err := <-sent:
		// The client half-closed (shutdown SHUT_WR, `nc -N`): pass the end of its request on
		// and keep the answer coming back, as a TCP load balancer does. An error ends both.
		tc, ok := up.(*net.TCPConn)
		if err != nil || !ok || tc.CloseWrite() != nil {
			return
		}
		select {
		case <-answered:
		case <-ctx.Done():
		}
	case <-answered:
	case <-ctx.Done():
	}
}
