package pgbus

import (
	"strings"
	"testing"
)

func BenchmarkDecodePushFrames(b *testing.B) {
	frame := `{"type":"push","messageId":"0b8f5c0e-6a47-4a59-9d3e-1f2c3b4a5d6e","meshId":"7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f","senderPubkey":"` + strings.Repeat("ab", 32) + `","priority":"now","nonce":"` + strings.Repeat("n", 32) + `","ciphertext":"` + strings.Repeat("c", 344) + `","createdAt":"2026-12-01T14:06:36.123Z","subtype":null}`
	line := `{"k":"w","p":"5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9","i":123456789,"y":"now","x":` + frame + `}`
	payload := strings.Repeat(line+"\n", 8)
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	for b.Loop() {
		msgs, err := Decode(payload)
		if err != nil || len(msgs) != 8 {
			b.Fatal(err)
		}
	}
}
