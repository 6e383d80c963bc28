// Package upstreamcli holds the upstream claudemesh CLI compatibility test: it drives the CLI's
// own client code (commit 213a6b3, CLI 1.37) under Node against three replicas of this broker.
// The upstream code is never copied here: the test takes the checkout's path from
// CLAUDEMESH_UPSTREAM_DIR and skips when it is unset. See README.md.
package upstreamcli
