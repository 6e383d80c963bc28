//go:build !unix

package embedded

import (
	"context"
	"errors"
	"fmt"
	"runtime"
)

// Cluster is a running private PostgreSQL cluster. It is only supported on Unix systems.
type Cluster struct{}

// Start is not supported on this operating system.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	return nil, fmt.Errorf("embedded postgres on %s: %w; set DATABASE_URL", runtime.GOOS, errors.ErrUnsupported)
}

// URL returns "".
func (c *Cluster) URL() string { return "" }

// Stop does nothing.
func (c *Cluster) Stop(ctx context.Context) error { return nil }

// Died returns nil: there is never a postmaster to watch.
func (c *Cluster) Died() <-chan struct{} { return nil }

// Err returns nil.
func (c *Cluster) Err() error { return nil }
