// Package broker owns everything node-local: WebSocket sessions, protocol handling, routing
// decisions, the status model, HTTP routes, sweepers and the graceful drain. It reaches
// Postgres only through package store and other replicas only through package pgbus.
//
// Words, one idea each: a delivery is one recipient's copy of a message; the pusher claims
// pending deliveries for a session and pushes them to its socket; a push request (requestPush)
// asks the pusher to run for a session; drain is only the graceful shutdown (close sessions
// with 1012); kick is only an admin closing a member's sessions (4001). The socket queue is a
// session's outgoing frames; the commit queue is the sends waiting for the committer.
//
// The parts, each with Start/Stop, started in this order by server.go and stopped in reverse:
// the node heartbeat (pgbus), the bus listener (pgbus), the recorder (finished deliveries),
// the ender (closed sessions), the pusher, the committer (group commit of sends), the router
// (bus messages and catch-up), the sweeper, liveness (dead-node takeover) and the guard
// (hello deadlines, stalled sockets). peers serves the WebSocket protocol, hooks the hook
// endpoint; the hub indexes this replica's sessions and fans frames out to them.
package broker

// Version is the broker's version, set at build time with -ldflags "-X ...broker.Version=v".
var Version = "dev"
