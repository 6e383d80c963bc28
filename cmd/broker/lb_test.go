package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The dev load balancer spreads connections round-robin and skips a backend that is down.
func TestRoundRobinSkipsDownBackends(t *testing.T) {
	var addrs []string
	for i := range 2 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		t.Cleanup(func() { ln.Close() })
		addrs = append(addrs, ln.Addr().String())
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				_, _ = c.Write([]byte{byte('a' + i)})
				c.Close()
			}
		}()
	}
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addrs = append(addrs, dead.Addr().String())
	dead.Close() // a backend that refuses connections

	front, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	lb := &roundRobin{backends: addrs, log: slog.New(slog.DiscardHandler)}
	done := make(chan struct{})
	go func() { lb.serve(ctx, front); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	seen := map[byte]int{}
	for range 6 {
		c, err := net.DialTimeout("tcp", front.Addr().String(), time.Second)
		require.NoError(t, err)
		require.NoError(t, c.SetDeadline(time.Now().Add(5*time.Second)))
		b, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Len(t, b, 1)
		seen[b[0]]++
		c.Close()
	}
	// The dead backend's turns fall through to the next live one.
	require.Len(t, seen, 2, "both live backends get connections")
	require.Equal(t, 6, seen['a']+seen['b'], "every connection reached a live backend")
}

// A client that half-closes after its request (shutdown(SHUT_WR), as `nc -N` and some probes
// do) still gets the whole answer: the backend sees the end of the request and its answer
// comes back through the balancer.
func TestRoundRobinAnswersAfterClientHalfCloses(t *testing.T) {
	back, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { back.Close() })
	go func() {
		for {
			c, err := back.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				req, err := io.ReadAll(c) // answers only once the request has ended
				if err == nil {
					_, _ = c.Write(append([]byte("answer to "), req...))
				}
			}()
		}
	}()

	front, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	lb := &roundRobin{backends: []string{back.Addr().String()}, log: slog.New(slog.DiscardHandler)}
	done := make(chan struct{})
	go func() { lb.serve(ctx, front); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	c, err := net.DialTimeout("tcp", front.Addr().String(), time.Second)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(5*time.Second)))
	_, err = io.WriteString(c, "ping")
	require.NoError(t, err)
	require.NoError(t, c.(*net.TCPConn).CloseWrite())
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	require.Equal(t, "answer to ping", string(got))
}
