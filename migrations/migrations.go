// Package migrations holds the goose SQL migrations of the broker's schema. They are embedded
// so every binary carries its own schema, and sqlc reads the same files to type the queries.
package migrations

import "embed"

// FS holds the zero-padded goose migrations (NNNNN_name.sql).
//
//go:embed *.sql
var FS embed.FS
