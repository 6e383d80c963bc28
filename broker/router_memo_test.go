package broker

import (
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/pgbus"
)

// BenchmarkMemoFull is the cost of noting one more key or presence in a full memo whose
// entries are all too recent to forget (a burst of writes or hellos): each note must not walk
// the whole memo.
func BenchmarkMemoFull(b *testing.B) {
	cc, err := pgx.ParseConfig("postgres://localhost/x")
	if err != nil {
		b.Fatal(err)
	}
	bus, err := pgbus.New(pgbus.Config{ConnConfig: cc, Exec: &pgx.Conn{}, NodeID: "b"}) // never started
	if err != nil {
		b.Fatal(err)
	}
	r := &router{bus: bus}
	for i := range maxTold {
		r.noteTold(stateKey{"m", fmt.Sprint(i)}, 1<<60)
	}
	for i := range maxSeen {
		r.noteSeen(fmt.Sprint(i), peerSeen{at: 1 << 60})
	}
	b.Run("told", func(b *testing.B) {
		i := 0
		for b.Loop() {
			i++
			r.noteTold(stateKey{"n", fmt.Sprint(i)}, 1<<60)
		}
	})
	b.Run("seen", func(b *testing.B) {
		i := 0
		for b.Loop() {
			i++
			r.noteSeen(fmt.Sprint(-i), peerSeen{at: 1 << 60})
		}
	})
}
