// Package broker owns everything node-local: WebSocket sessions, protocol handling, routing
// decisions, the status model, HTTP routes, sweepers and graceful drain. It reaches Postgres
// only through the sqlc queries in package db and other replicas only through package pgbus.
package broker

// Version is the broker's version, set at build time with -ldflags "-X ...broker.Version=v".
var Version = "dev"
