// Package pgproxy owns a TCP proxy that puts a chosen distance between Postgres clients and
// the server and counts the round trips the clients make through it. Tests use it (through
// db/dbtest) to hold every hot operation to one round trip; `broker dev --db-delay` and the
// load generator use it to feel a primary in another region from one machine.
//
// # Delay
//
// Every byte read from either side is forwarded Delay after the proxy read it, in order. Each
// direction of each connection has its own queue and writer, so connections never wait on
// each other, and a burst of writes (a pipeline of 10,000 messages) costs one Delay, not one
// per write. A round trip through the proxy takes 2×Delay longer than a direct one. Only bytes
// are delayed: the TCP handshake between the client and the proxy is local, so a new
// connection pays 2×Delay per flight of its startup exchange, not an extra one for SYN/ACK.
//
// # Flights
//
// A flight is one or more writes from the client before it reads. On each connection a new
// client→server flight starts when client bytes arrive and the previous bytes on that
// connection went server→client (as forwarded to the client), or when they are its first
// client bytes. A client that waits for every answer pays one round trip per flight, so the
// flight count of an operation is the number of round trips it costs across a wide-area link.
//
// Every flight lands in one of three counters ([Flights]):
//
//   - Startup: flights that open or close a session rather than run a statement. That is
//     everything before the server's first ReadyForQuery reaches the client (SSLRequest and
//     GSSENCRequest negotiation, the StartupMessage, authentication), a CancelRequest
//     connection, and a flight that is only a Terminate message. Opening a new pool connection
//     therefore never pollutes an operation's Statement count.
//   - Statement: every other flight of a plaintext Postgres session.
//   - Opaque: flights of a connection the proxy cannot read: TLS after the server accepted an
//     SSLRequest, direct TLS, or a stream that is not Postgres at all (the proxy forwards any
//     TCP stream). Connect with sslmode=disable between client and proxy to count Statements.
//
// The proxy reads the protocol only up to that first ReadyForQuery, then moves bytes without
// parsing them.
//
// # What pgx operations cost (pgx v5, measured in pgx_test.go)
//
//   - The extended protocol writes Parse/Bind/Describe/Execute/Sync in one burst and then
//     reads: one flight.
//   - The default exec mode (QueryExecModeCacheStatement) prepares a SQL text the first time a
//     connection sees it (Parse/Describe/Sync, one flight) and then executes it (one flight):
//     2 flights cold, 1 warm, with or without arguments. The statement cache is per
//     connection, so each new pool connection pays the prepare flight again for each
//     statement; a statement evicted from the cache (512 by default) or invalidated by a
//     schema change costs one more flight to deallocate before the next query.
//   - QueryExecModeExec and QueryExecModeSimpleProtocol always cost 1, DescribeExec always 2.
//     Exec with no arguments uses the simple protocol: 1.
//   - SendBatch pipelines every queued statement up to one Sync: 1 flight warm, plus 1 to
//     prepare the statements it has not seen yet.
//   - BeginFunc sends BEGIN and COMMIT as two more simple-protocol flights: a transaction of k
//     warm statements costs k+2. Hence the design rule: one statement or one pipelined batch
//     without an explicit BEGIN.
//   - pgxpool.Acquire on a new connection adds only Startup flights. On an existing one it
//     adds a Statement flight (a "-- ping") when the connection sat idle for more than a
//     second, pgxpool's default ShouldPing.
//
// A client that keeps writing while it reads the answers to its first writes (pgconn does
// this for a batch too large for the socket buffers) shows more flights than it waits round
// trips, so a count is an upper bound in that case.
//
// # Counting only the operation under test
//
// [Proxy.Flights] sums the counters over all connections and is meant for snapshots:
// before := p.Flights(); op(); n := p.Flights().Sub(before). To keep other traffic out of
// that sum, in order of preference: put only the pool that runs the operation behind its own
// proxy (proxies are cheap; the LISTEN connection and fixture pools connect directly); count
// one connection with [Proxy.ConnFlights], keyed by the client's local address; or take a
// connection out of the sums with [Proxy.Exclude].
package pgproxy
