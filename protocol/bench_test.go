package protocol

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
)

// sendFrame returns a send frame whose ciphertext is n base64 characters.
func sendFrame(n int) []byte {
	ct := strings.Repeat("QUJD", n/4)
	return []byte(`{"type":"send","targetSpec":"` + testPubkey + `","priority":"next","nonce":"` +
		base64.StdEncoding.EncodeToString(make([]byte, 24)) + `","ciphertext":"` + ct + `","id":"c-123","_reqId":"r-456"}`)
}

func BenchmarkDecodeSend(b *testing.B) {
	for _, size := range []int{256, 4096, 60000} {
		frame := sendFrame(size)
		b.Run(sizeName(size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(frame)))
			for b.Loop() {
				if _, err := DecodeClient(frame); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkDecodeSendEncodingJSON is the baseline DecodeClient replaced:
// peek the type with encoding/json, then decode the typed struct.
func BenchmarkDecodeSendEncodingJSON(b *testing.B) {
	for _, size := range []int{256, 4096, 60000} {
		frame := sendFrame(size)
		b.Run(sizeName(size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(frame)))
			for b.Loop() {
				var peek struct {
					Type  string `json:"type"`
					ReqID string `json:"_reqId"`
				}
				if err := json.Unmarshal(frame, &peek); err != nil {
					b.Fatal(err)
				}
				var m Send
				if err := json.Unmarshal(frame, &m); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkDecodeHello(b *testing.B) {
	frame := []byte(hello("", `"groups":[{"name":"eng"}],"capabilities":["client_ack","system_events"],"displayName":"alice"`))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeClient(frame); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncodePush(b *testing.B) {
	for _, size := range []int{256, 60000} {
		p := Push{MessageID: "0190a4c2-7d2b-7c4e-9f51-2b8d0e6f1a3c", MeshID: "mesh-1", SenderPubkey: testPubkey,
			Priority: PriorityNow, Nonce: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Ciphertext: strings.Repeat("QUJD", size/4),
			CreatedAt: "2024-01-02T03:04:05.006Z"}
		b.Run(sizeName(size), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Encode(&p); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func sizeName(n int) string {
	switch {
	case n >= 1000:
		return "ct=" + itoa(n/1000) + "k"
	default:
		return "ct=" + itoa(n)
	}
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

func BenchmarkDecodeServerPush(b *testing.B) {
	for _, size := range []int{256, 60000} {
		frame, err := Encode(&Push{MessageID: "0190a4c2-7d2b-7c4e-9f51-2b8d0e6f1a3c", MeshID: "mesh-1", SenderPubkey: testPubkey,
			Priority: PriorityNow, Nonce: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Ciphertext: strings.Repeat("QUJD", size/4),
			CreatedAt: "2024-01-02T03:04:05.006Z"})
		if err != nil {
			b.Fatal(err)
		}
		b.Run(sizeName(size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(frame)))
			for b.Loop() {
				if _, err := DecodeServer(frame); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
