package broker

import (
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db/dbtest"
	"github.com/claudemesh/broker/protocol"
)

// Today's claudemesh CLI (1.37): its daemon connects with a plain hello (control-plane), each
// launched session with session_hello; neither announces capabilities. These tests run both
// hello kinds across 3 replicas.

// helloKind dials a session with a session key in one of the two ways.
type helloKind struct {
	name string
	with func(key ed25519.PrivateKey) func(*client.Options)
}

var helloKinds = []helloKind{
	{"hello", func(key ed25519.PrivateKey) func(*client.Options) {
		return func(o *client.Options) { o.SessionKey = key.Public().(ed25519.PublicKey) }
	}},
	{"session_hello", asSession},
}

// asSession dials as today's CLI's launched session: session_hello with key, no capabilities.
func asSession(key ed25519.PrivateKey) func(*client.Options) {
	return func(o *client.Options) {
		o.Session = &client.SessionOptions{Key: key}
		o.Capabilities = nil
		o.Channel, o.PeerType, o.Hostname = protocol.ChannelSession, "ai", "laptop"
	}
}

// asDaemon dials as today's CLI's daemon: a plain hello without session key or capabilities.
func asDaemon(o *client.Options) {
	o.Capabilities = nil
	o.SessionID = "daemon-4242"
	o.Channel, o.PeerType, o.Hostname = protocol.ChannelDaemon, "ai", "laptop"
}

func newKey(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, k, err := generateKey()
	require.NoError(t, err)
	return k
}

func keyHex(k ed25519.PrivateKey) string { return protocol.PubkeyHex(k.Public().(ed25519.PublicKey)) }

func TestSessionHelloChecksInUpstreamOrder(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	alice, bob, gone := m.member("alice"), m.member("bob"), m.member("gone")
	_, err := c.pool.Exec(ctxT(t), `UPDATE claudemesh.member SET revoked_at = now() WHERE id = $1`, gone.id)
	require.NoError(t, err)
	stranger := &testMember{id: "x", name: "stranger", key: newKey(t)}
	stranger.pub = keyHex(stranger.key)
	upper := func(h *protocol.SessionHello) { h.SessionPubkey = strings.ToUpper(h.SessionPubkey) }

	cases := []struct {
		name      string
		member    *testMember
		key       ed25519.PrivateKey
		opt       func(*client.Options)
		code      string
		closeCode int
	}{
		{"uppercase session key", alice, nil, prep(upper), protocol.CodeBadSessionPubkey, protocol.CloseHelloRefused},
		{"short parent key", alice, nil, prep(func(h *protocol.SessionHello) { h.ParentMemberPubkey = "abc" }),
			protocol.CodeBadParentPubkey, protocol.CloseHelloRefused},
		{"attestation for another key", alice, nil, prep(func(h *protocol.SessionHello) {
			h.ParentAttestation.SessionPubkey = keyHex(newKey(t))
		}), protocol.CodeAttestationMismatch, protocol.CloseHelloRefused},
		{"no attestation", alice, nil, prep(func(h *protocol.SessionHello) { h.ParentAttestation = protocol.Attestation{} }),
			protocol.CodeAttestationMismatch, protocol.CloseHelloRefused},
		{"attestation without expiry", alice, nil, prep(func(h *protocol.SessionHello) { h.ParentAttestation.ExpiresAt = 0 }),
			protocol.CodeMalformed, protocol.CloseHelloRefused},
		{"expired attestation", alice, nil, attExpires(alice, time.Now().Add(-time.Minute)), protocol.CodeExpired, protocol.CloseHelloRefused},
		{"attestation over 24 h", alice, nil, attTTL(25 * time.Hour), protocol.CodeTTLTooLong, protocol.CloseHelloRefused},
		{"attestation signature not hex", alice, nil, prep(func(h *protocol.SessionHello) { h.ParentAttestation.Signature = "zz" }),
			protocol.CodeMalformed, protocol.CloseHelloRefused},
		{"attestation signed by someone else", alice, nil, prep(func(h *protocol.SessionHello) {
			h.ParentAttestation.Signature = protocol.SignAttestation(bob.key, h.SessionPubkey, time.Now().Add(time.Hour)).Signature
		}), protocol.CodeBadSignature, protocol.CloseHelloRefused},
		// The attestation is checked before the hello's clock: an expired one wins over skew.
		{"expired and skewed", alice, nil, func(o *client.Options) {
			attExpires(alice, time.Now().Add(-time.Minute))(o)
			o.Now = func() time.Time { return time.Now().Add(-2 * time.Minute) }
		}, protocol.CodeExpired, protocol.CloseHelloRefused},
		{"skewed", alice, nil, func(o *client.Options) { o.Now = func() time.Time { return time.Now().Add(2 * time.Minute) } },
			protocol.CodeTimestampSkew, protocol.CloseHelloRefused},
		{"hello signature not hex", alice, nil, prep(func(h *protocol.SessionHello) { h.Signature = "abcd" }),
			protocol.CodeMalformed, protocol.CloseHelloRefused},
		{"hello signed by the member, not the session", alice, nil, prep(func(h *protocol.SessionHello) {
			h.Signature = protocol.SignHex(alice.key, protocol.SessionHelloSigningString(h.MeshID, h.ParentMemberPubkey, h.SessionPubkey, h.Timestamp))
		}), protocol.CodeBadSignature, protocol.CloseHelloRefused},
		{"parent not a member", stranger, nil, nil, protocol.CodeUnauthorized, protocol.CloseHelloRefused},
		{"parent revoked", gone, nil, nil, protocol.CodeRevoked, protocol.CloseRevoked},
		{"parentMemberId of another member", alice, nil, func(o *client.Options) { o.MemberID = bob.id },
			protocol.CodeParentMemberIDMismatch, protocol.CloseHelloRefused},
		{"session key that is another member's key", alice, bob.key, nil, protocol.CodeSessionKeyTaken, protocol.CloseHelloRefused},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			key := tc.key
			if key == nil {
				key = newKey(t)
			}
			opts := []func(*client.Options){asSession(key)}
			if tc.opt != nil {
				opts = append(opts, tc.opt)
			}
			_, err := m.tryDial(0, tc.member, opts...)
			he := helloErr(t, err)
			require.Equal(t, tc.code, he.Code, "message: %s", he.Message)
			require.Equal(t, tc.closeCode, he.CloseCode)
		})
	}

	t.Run("a captured session_hello replayed", func(t *testing.T) {
		key, at := newKey(t), time.Now()
		fixed := func(o *client.Options) { o.Now = func() time.Time { return at } }
		first := m.dial(0, alice, asSession(key), fixed)
		require.NoError(t, first.Close())
		_, err := m.tryDial(0, alice, asSession(key), fixed)
		require.Equal(t, protocol.CodeHelloReplayed, helloErr(t, err).Code)
	})
	t.Run("a stored attestation is accepted on every reconnect until it expires", func(t *testing.T) {
		key := newKey(t)
		att := protocol.SignAttestation(alice.key, keyHex(key), time.Now().Add(time.Hour))
		for range 2 {
			cl := m.dial(0, alice, asSession(key), func(o *client.Options) { o.Session.Attestation = &att; o.MemberKey = nil })
			require.NoError(t, cl.Close())
		}
	})
}

func prep(f func(*protocol.SessionHello)) func(*client.Options) {
	return func(o *client.Options) { o.Session.PrepareHello = f }
}

func attTTL(d time.Duration) func(*client.Options) {
	return func(o *client.Options) { o.Session.AttestationTTL = d }
}

// attExpires gives the session an attestation by mem that expires at at.
func attExpires(mem *testMember, at time.Time) func(*client.Options) {
	return func(o *client.Options) {
		prev := o.Session.PrepareHello
		o.Session.PrepareHello = func(h *protocol.SessionHello) {
			h.ParentAttestation = protocol.SignAttestation(mem.key, h.SessionPubkey, at)
			if prev != nil {
				prev(h)
			}
		}
	}
}

// A launched session reaches another member's launched session on another replica; list_peers
// tells the CLI which rows are sessions and which its daemons.
func TestSessionToSessionAcrossReplicas(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	aliceDaemon := m.dial(0, alice, asDaemon)
	aKey, bKey := newKey(t), newKey(t)
	a := m.dial(1, alice, asSession(aKey), func(o *client.Options) { o.SessionID = "claude-a"; o.Model = "opus" })
	bobDaemon := m.dial(0, bob, asDaemon)
	b := m.dial(2, bob, asSession(bKey), func(o *client.Options) { o.SessionID = "claude-b"; o.CWD = "/repo/b" })

	ack, err := a.SendMessage(ctxT(t), &protocol.Send{TargetSpec: keyHex(bKey), Priority: protocol.PriorityNow, Nonce: "n",
		Ciphertext: "hi bob", ID: "cm-1", ClientMessageID: "cm-1", RequestFingerprint: strings.Repeat("f", 64)})
	require.NoError(t, err)
	require.Equal(t, "cm-1", ack.ID)
	p := nextPush(t, b, 5*time.Second)
	require.Equal(t, ack.MessageID, p.MessageID)
	require.Equal(t, "hi bob", p.Ciphertext)
	require.Equal(t, keyHex(aKey), p.SenderPubkey, "the sender's session key: the CLI decrypts with it")
	require.Equal(t, "cm-1", p.ClientMessageID)
	require.Equal(t, strings.Repeat("f", 64), p.RequestFingerprint)
	require.Equal(t, "alice", p.SenderName)
	require.Equal(t, alice.id, p.SenderMemberID)
	require.NoError(t, b.AckPush(ctxT(t), p))
	probe(t, a, keyHex(bKey), b) // once

	peers, err := aliceDaemon.ListPeers(ctxT(t))
	require.NoError(t, err)
	rows := map[string]protocol.Peer{}
	for _, pr := range peers {
		rows[pr.SessionID] = pr
	}
	require.Len(t, peers, 4)
	delete(rows, "daemon-4242")
	for _, pr := range peers {
		if pr.SessionID == "daemon-4242" && pr.DisplayName == "alice" {
			rows["daemon-4242"] = pr
		}
	}
	require.Equal(t, protocol.Peer{Pubkey: keyHex(bKey), DisplayName: "bob", Status: protocol.StatusIdle, Groups: []protocol.Group{},
		SessionID: "claude-b", ConnectedAt: rows["claude-b"].ConnectedAt, MemberPubkey: bob.pub, PeerRole: protocol.RoleSession,
		CWD: "/repo/b", Hostname: "laptop", PeerType: "ai", Channel: protocol.ChannelSession}, rows["claude-b"])
	require.Equal(t, "opus", rows["claude-a"].Model)
	require.Equal(t, protocol.RoleControlPlane, rows["daemon-4242"].PeerRole)
	require.Equal(t, protocol.ChannelDaemon, rows["daemon-4242"].Channel)
	require.Equal(t, alice.pub, rows["daemon-4242"].Pubkey, "a daemon is listed by its member key")
	_ = bobDaemon
}

// A send retried with the same client_message_id (after an ack timeout, on whichever replica the
// retry lands) is acked with the first messageId and delivered once.
func TestRetriedSendIsDeliveredOnce(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	for _, kind := range helloKinds {
		t.Run(kind.name, func(t *testing.T) {
			m := c.mesh(0)
			alice, bob := m.member("alice"), m.member("bob")
			aKey, bKey := newKey(t), newKey(t)
			b := m.dial(2, bob, kind.with(bKey))
			send := func(cl *client.Client, cmid, fp, text string) protocol.Ack {
				t.Helper()
				// A refusal comes back as the ack and an error: the ack says which.
				ack, _ := cl.SendMessage(ctxT(t), &protocol.Send{TargetSpec: keyHex(bKey), Priority: protocol.PriorityNow,
					Nonce: "n", Ciphertext: text, ID: cmid, ClientMessageID: cmid, RequestFingerprint: fp})
				return ack
			}
			a0 := m.dial(0, alice, kind.with(aKey))
			first := send(a0, "cm-1", "fp-1", "once")
			require.True(t, first.Queued)
			require.False(t, first.Duplicate)
			require.NoError(t, a0.Close())
			// The CLI reconnects (another replica) and retries.
			a1 := m.dial(1, alice, kind.with(aKey))
			again := send(a1, "cm-1", "fp-1", "once")
			require.True(t, again.Queued)
			require.True(t, again.Duplicate)
			require.Equal(t, first.MessageID, again.MessageID)
			require.Equal(t, "cm-1", again.ID)
			// The same id for another request: refused, not folded into the first.
			other := send(a1, "cm-1", "fp-2", "different")
			require.False(t, other.Queued)
			require.Equal(t, protocol.CodeClientMessageIDConflict, other.Error)
			// Pipelined repeats in one batch, and a race from two replicas at once.
			for range 3 {
				require.NoError(t, a1.SendRaw(ctxT(t), []byte(fmt.Sprintf(
					`{"type":"send","targetSpec":%q,"priority":"now","nonce":"n","ciphertext":"burst","client_message_id":"cm-2"}`, keyHex(bKey)))))
			}
			a2 := m.dial(2, alice, kind.with(newKey(t)), func(o *client.Options) { o.SessionID = "second" })
			var wg sync.WaitGroup
			ids := make([]string, 2)
			for i, cl := range []*client.Client{a1, a2} {
				wg.Go(func() { ids[i] = send(cl, "cm-3", "", "raced").MessageID })
			}
			wg.Wait()
			require.Equal(t, ids[0], ids[1], "both attempts acked with one message id")

			// "once" was acked before the rest was sent; the burst (pipelined on a1, unacked) and
			// the race (its first commit may be a2's, another sender on another replica) have no
			// order between them.
			require.Equal(t, "once", nextPush(t, b, 5*time.Second).Ciphertext)
			got := map[string]int{}
			for range 2 {
				got[nextPush(t, b, 5*time.Second).Ciphertext]++
			}
			require.Equal(t, map[string]int{"burst": 1, "raced": 1}, got, "each once")
			probe(t, a1, keyHex(bKey), b)
			var stored int
			require.NoError(t, c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.envelope WHERE mesh_id = $1`, m.id).Scan(&stored))
			require.Equal(t, 4, stored, "once, burst, raced and the probe: each stored once")
		})
	}
}

// A connection that acks gets its unacked pushes again at its next connection, at once: today's
// CLI's sockets ack without announcing it.
func TestUnackedPushesComeBackAtOnceForClientsThatAck(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, func(cfg *Config) { cfg.quiet = true }) // "at once": the catch-up poll is an hour
	for _, kind := range helloKinds {
		t.Run(kind.name, func(t *testing.T) {
			m := c.mesh(0)
			alice, bob := m.member("alice"), m.member("bob")
			bKey := newKey(t)
			a := m.dial(0, alice)
			noCaps := func(o *client.Options) { o.Capabilities = nil }
			b := m.dial(1, bob, kind.with(bKey), noCaps)
			first, err := a.Send(ctxT(t), keyHex(bKey), protocol.PriorityNow, "n", "acked", "")
			require.NoError(t, err)
			p := nextPush(t, b, 5*time.Second)
			require.Equal(t, first.MessageID, p.MessageID)
			require.NoError(t, b.AckPush(ctxT(t), p)) // no capability: acking makes it an acking connection
			second, err := a.Send(ctxT(t), keyHex(bKey), protocol.PriorityNow, "n", "not acked", "")
			require.NoError(t, err)
			require.Equal(t, second.MessageID, nextPush(t, b, 5*time.Second).MessageID)
			// The ack is recorded in the old replica's next statement: a reattach on another replica
			// before that may be sent the acked push again, as at-least-once allows
			// (docs/protocol.md); one after it, never. Seen under load as the acked push coming
			// first on the new socket.
			dbtest.WaitFor(t, 10*time.Second, "the ack recorded", func() bool {
				var acked bool
				_ = c.pool.QueryRow(ctxT(t), `SELECT state = 'acked' FROM claudemesh.delivery d
					JOIN claudemesh.envelope e ON e.id = d.envelope_id WHERE e.id = $1`, first.MessageID).Scan(&acked)
				return acked
			})

			// Reattach on another replica while the old socket is still open (a half-open
			// connection): the unacked push comes at once on the new one, the acked one never.
			b2 := m.dial(2, bob, kind.with(bKey), noCaps)
			p = nextPush(t, b2, 10*time.Second)
			require.Equal(t, second.MessageID, p.MessageID)
			<-b.Done()
			// Then on that replica itself (the same presence, a new registration): the new
			// socket acks that one and not the next, and is replaced there.
			require.NoError(t, b2.AckPush(ctxT(t), p))
			third, err := a.Send(ctxT(t), keyHex(bKey), protocol.PriorityNow, "n", "not acked either", "")
			require.NoError(t, err)
			require.Equal(t, third.MessageID, nextPush(t, b2, 5*time.Second).MessageID)
			dbtest.WaitFor(t, 10*time.Second, "the second's ack recorded", func() bool {
				var acked bool
				_ = c.pool.QueryRow(ctxT(t), `SELECT state = 'acked' FROM claudemesh.delivery WHERE envelope_id = $1`, second.MessageID).Scan(&acked)
				return acked
			})
			b3 := m.dial(2, bob, kind.with(bKey), noCaps)
			require.Equal(t, third.MessageID, nextPush(t, b3, 10*time.Second).MessageID, "on the same replica")
			probe(t, a, keyHex(bKey), b3)
			<-b2.Done()
		})
	}
}

// A reconnect with the same session key and a new sessionId (the April client after a close
// without a code; today's CLI's cold path) takes its presence over, on any replica: one row, no
// left/joined, the queue kept, the old socket closed as replaced.
func TestReattachBySessionKey(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	for _, kind := range helloKinds {
		t.Run(kind.name, func(t *testing.T) {
			m := c.mesh(0)
			alice, bob := m.member("alice"), m.member("bob")
			bKey := newKey(t)
			watcher := m.dial(0, alice)
			b := m.dial(1, bob, kind.with(bKey), func(o *client.Options) { o.SessionID = "run-1"; o.Groups = []protocol.Group{{Name: "eng"}} })
			joined := nextEvent(t, watcher, protocol.EventPeerJoined, 5*time.Second)
			presence := b.HelloAck().PresenceID
			require.Equal(t, keyHex(bKey), eventPubkey(t, joined))
			// The socket drops (no close frame): the presence waits in its grace. Something waits
			// for the session meanwhile: a group message (addressed to its sessionId) and a DM.
			b.Abort()
			dbtest.WaitFor(t, 10*time.Second, "bob's presence in its grace", func() bool {
				var inGrace bool
				_ = c.pool.QueryRow(ctxT(t), `SELECT grace_until IS NOT NULL FROM claudemesh.presence WHERE id = $1`, presence).Scan(&inGrace)
				return inGrace
			})
			_, err := watcher.Send(ctxT(t), "@eng", protocol.PriorityNow, "n", "to the group", "")
			require.NoError(t, err)
			_, err = watcher.Send(ctxT(t), keyHex(bKey), protocol.PriorityNow, "n", "to bob", "")
			require.NoError(t, err)

			eng := []protocol.Group{{Name: "eng"}}
			b2 := m.dial(2, bob, kind.with(bKey), func(o *client.Options) { o.SessionID = "run-2"; o.Groups = eng })
			require.Equal(t, presence, b2.HelloAck().PresenceID, "the same presence")
			require.True(t, b2.HelloAck().Resumed)
			var got []string
			for range 2 {
				p := nextPush(t, b2, 5*time.Second)
				got = append(got, p.Ciphertext)
				require.NoError(t, b2.AckPush(ctxT(t), p))
				dbtest.WaitFor(t, 5*time.Second, "ack recorded", func() bool { return deliveryState(t, c, p.MessageID) == "acked" })
			}
			require.ElementsMatch(t, []string{"to the group", "to bob"}, got, "the queue was kept")

			// Live on replica 2, taken over from replica 0 with yet another sessionId while a
			// group message pushed to it is not acked yet: it comes again on the new socket.
			unacked, err := watcher.Send(ctxT(t), "@eng", protocol.PriorityNow, "n", "not acked", "")
			require.NoError(t, err)
			require.Equal(t, unacked.MessageID, nextPush(t, b2, 5*time.Second).MessageID)
			b3 := m.dial(0, bob, kind.with(bKey), func(o *client.Options) { o.SessionID = "run-3"; o.Groups = eng })
			require.Equal(t, presence, b3.HelloAck().PresenceID)
			<-b2.Done()
			require.Equal(t, protocol.CloseSessionReplaced, b2.CloseCode())
			require.Equal(t, unacked.MessageID, nextPush(t, b3, 5*time.Second).MessageID, "the unacked group message again")
			peers, err := watcher.ListPeers(ctxT(t))
			require.NoError(t, err)
			var rows []string
			for _, p := range peers {
				if p.Pubkey == keyHex(bKey) {
					rows = append(rows, p.SessionID)
				}
			}
			require.Equal(t, []string{"run-3"}, rows, "one row for the session, with its latest sessionId")
			// The watcher saw bob join once and never leave or join again.
			ack, err := b3.Send(ctxT(t), alice.pub, protocol.PriorityNow, "n", "probe", "")
			require.NoError(t, err)
			for _, e := range eventsUntil(t, watcher, ack.MessageID) {
				require.NotEqual(t, keyHex(bKey), eventPubkey(t, e), "no %s for the reattached session", e.Event)
			}
		})
	}
}

// kick, disconnect, ban, unban and list_bans from an admin's plain-hello connection, across
// replicas; refused for other members; each audited.
func TestKickAndBan(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	m := c.mesh(0)
	admin, alice, bob := m.member("admin"), m.member("alice"), m.member("bob")
	_, err := c.pool.Exec(ctxT(t), `UPDATE claudemesh.member SET role = 'admin' WHERE id = $1`, admin.id)
	require.NoError(t, err)
	ad := m.dial(0, admin, asDaemon, func(o *client.Options) { o.SessionID = "cold-cli" })
	aliceDaemon := m.dial(1, alice, asDaemon)
	aliceSession := m.dial(2, alice, asSession(newKey(t)), func(o *client.Options) { o.SessionID = "claude-a" })
	bobSession := m.dial(1, bob, asSession(newKey(t)), func(o *client.Options) { o.SessionID = "claude-b" })

	// Not an admin: forbidden, with the request's _reqId (the CLI matches replies by it).
	_, err = aliceDaemon.Kick(ctxT(t), protocol.Kick{Target: "bob"})
	requireCode(t, err, protocol.CodeForbidden)
	_, err = aliceDaemon.Ban(ctxT(t), "bob")
	requireCode(t, err, protocol.CodeForbidden)
	_, err = aliceDaemon.ListBans(ctxT(t))
	requireCode(t, err, protocol.CodeForbidden)

	// kick alice: her session closes with 4001 on replica 2; her daemon (control-plane) stays.
	res, err := ad.Kick(ctxT(t), protocol.Kick{Target: "alice"})
	require.NoError(t, err)
	require.Equal(t, []string{"alice"}, res.Kicked)
	require.Equal(t, res.Kicked, res.Affected)
	require.Equal(t, []string{"alice"}, res.SkippedControlPlane)
	<-aliceSession.Done()
	require.Equal(t, protocol.CloseKicked, aliceSession.CloseCode())
	_, err = aliceDaemon.ListPeers(ctxT(t))
	require.NoError(t, err, "the daemon was left alone")

	// disconnect skips nothing: the daemon closes with 1000.
	res, err = ad.Kick(ctxT(t), protocol.Kick{Target: alice.pub[:12], Disconnect: true})
	require.NoError(t, err)
	require.Equal(t, []string{"alice"}, res.Kicked)
	<-aliceDaemon.Done()
	require.Equal(t, protocol.CloseSessionReplaced, aliceDaemon.CloseCode())

	// ban bob: his session closes with 4002, his next hello is refused, list_bans shows him.
	name, err := ad.Ban(ctxT(t), "bob")
	require.NoError(t, err)
	require.Equal(t, "bob", name)
	<-bobSession.Done()
	require.Equal(t, protocol.CloseRevoked, bobSession.CloseCode())
	_, err = m.tryDial(0, bob, asSession(newKey(t)))
	require.Equal(t, protocol.CodeRevoked, helloErr(t, err).Code)
	bans, err := ad.ListBans(ctxT(t))
	require.NoError(t, err)
	require.Len(t, bans, 1)
	require.Equal(t, protocol.BannedMember{Name: "bob", Pubkey: bob.pub, RevokedAt: bans[0].RevokedAt}, bans[0])
	_, err = ad.Ban(ctxT(t), "admin")
	requireCode(t, err, protocol.CodeInvalid)
	_, err = ad.Ban(ctxT(t), "nobody")
	requireCode(t, err, protocol.CodeNotFound)
	// A name two members share names neither: nobody is banned by guess.
	m.member("twin")
	m.member("twin")
	_, err = ad.Ban(ctxT(t), "twin")
	requireCode(t, err, protocol.CodeInvalid)
	// An admin can't ban the owner, nor another admin; the owner can ban an admin.
	owner, other := m.member("owner"), m.member("other-admin")
	_, err = c.pool.Exec(ctxT(t), `UPDATE claudemesh.member SET role = 'admin' WHERE id = $1`, other.id)
	require.NoError(t, err)
	_, err = c.pool.Exec(ctxT(t), `UPDATE claudemesh.mesh SET owner_pubkey = $1 WHERE id = $2`, owner.pub, m.id)
	require.NoError(t, err)
	for _, target := range []string{owner.pub, "other-admin"} {
		_, err = ad.Ban(ctxT(t), target)
		requireCode(t, err, protocol.CodeForbidden)
	}
	ownerCl := m.dial(1, owner, asSession(newKey(t)))
	name, err = ownerCl.Ban(ctxT(t), "other-admin")
	require.NoError(t, err)
	require.Equal(t, "other-admin", name)
	// Nor can an admin kick the owner's sessions: they are not matched.
	res, err = ad.Kick(ctxT(t), protocol.Kick{Target: owner.pub})
	require.NoError(t, err)
	require.Empty(t, res.Kicked)
	res, err = ad.Kick(ctxT(t), protocol.Kick{All: true})
	require.NoError(t, err)
	require.NotContains(t, res.Kicked, "owner")
	_, err = ownerCl.ListPeers(ctxT(t))
	require.NoError(t, err, "the owner's session is still open")
	// An admin undoes only what an admin did: not the owner's ban of an admin, and nobody but
	// the operator lifts the operator's revocation (`broker member revoke`, a compromised key).
	_, err = ad.Unban(ctxT(t), "other-admin")
	requireCode(t, err, protocol.CodeForbidden)
	carol := m.member("carol")
	_, err = c.pool.Exec(ctxT(t), `UPDATE claudemesh.member SET revoked_at = now(), revoked_by = 'operator' WHERE id = $1`, carol.id)
	require.NoError(t, err) // as membership.RevokeMember writes it
	for _, cl := range []*client.Client{ad, ownerCl} {
		_, err = cl.Unban(ctxT(t), "carol")
		requireCode(t, err, protocol.CodeForbidden)
	}

	// unban: bob is back.
	name, err = ad.Unban(ctxT(t), bob.pub)
	require.NoError(t, err)
	require.Equal(t, "bob", name)
	m.dial(2, bob, asSession(newKey(t)))
	bans, err = ad.ListBans(ctxT(t))
	require.NoError(t, err)
	require.Len(t, bans, 2)
	require.ElementsMatch(t, []string{"other-admin", "carol"}, []string{bans[0].Name, bans[1].Name}, "bob is no longer listed")
	// The owner lifts its own ban.
	name, err = ownerCl.Unban(ctxT(t), "other-admin")
	require.NoError(t, err)
	require.Equal(t, "other-admin", name)

	// Audited, and the chain still verifies.
	var events []string
	_, err = audit.Seal(ctxT(t), c.pool, true)
	require.NoError(t, err)
	rows, err := c.pool.Query(ctxT(t), `SELECT event_type FROM claudemesh.audit WHERE mesh_id = $1
		AND event_type IN ('peer_kicked', 'member_banned', 'member_unbanned') ORDER BY seq`, m.id)
	require.NoError(t, err)
	for rows.Next() {
		var e string
		require.NoError(t, rows.Scan(&e))
		events = append(events, e)
	}
	require.NoError(t, rows.Err())
	require.Equal(t, []string{"peer_kicked", "peer_kicked", "member_banned", "member_banned", "member_unbanned", "member_unbanned"}, events)
	_, err = audit.Verify(ctxT(t), c.pool, m.id)
	require.NoError(t, err)
}

// unban by a display name that two banned members share lifts neither: before, it lifted the
// one banned last, which need not be the one the admin meant (a member who joined under
// another's name and was banned for it came back). A key names its member.
func TestUnbanBySharedNameIsRefused(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	admin, bob, impostor := m.member("admin"), m.member("bob"), m.member("bob")
	_, err := c.pool.Exec(ctxT(t), `UPDATE claudemesh.member SET role = 'admin' WHERE id = $1`, admin.id)
	require.NoError(t, err)
	ad := m.dial(0, admin)
	for _, target := range []*testMember{bob, impostor} {
		_, err := ad.Ban(ctxT(t), target.pub)
		require.NoError(t, err)
	}
	revoked := func(mem *testMember) bool {
		var r bool
		require.NoError(t, c.pool.QueryRow(ctxT(t), `SELECT revoked_at IS NOT NULL FROM claudemesh.member WHERE id = $1`,
			mem.id).Scan(&r))
		return r
	}

	_, err = ad.Unban(ctxT(t), "bob")
	requireCode(t, err, protocol.CodeInvalid)
	require.True(t, revoked(bob))
	require.True(t, revoked(impostor))

	name, err := ad.Unban(ctxT(t), strings.ToUpper(bob.pub))
	require.NoError(t, err)
	require.Equal(t, "bob", name)
	require.False(t, revoked(bob))
	require.True(t, revoked(impostor))
	// Now one banned member has the name: it names that one.
	_, err = ad.Unban(ctxT(t), "bob")
	require.NoError(t, err)
	require.False(t, revoked(impostor))
}

// unban by name can't reach past a key's latest revocation: a key an admin banned as "carol",
// added again by the operator under another name and revoked by the operator (a compromised
// key) is listed by list_bans under its latest name, and an admin's "unban carol" lifted the
// old ban row instead, letting the operator's revoked key back in.
func TestUnbanByAnOldNameCannotLiftAnOperatorsRevocation(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	m := c.mesh(0)
	admin, carol := m.member("admin"), m.member("carol")
	_, err := c.pool.Exec(ctxT(t), `UPDATE claudemesh.member SET role = 'admin' WHERE id = $1`, admin.id)
	require.NoError(t, err)
	ad := m.dial(0, admin)
	_, err = ad.Ban(ctxT(t), carol.pub)
	require.NoError(t, err)
	members := c.nodes[0].Members()
	_, err = members.AddMember(ctxT(t), membership.AddMemberParams{Mesh: m.id, Pubkey: carol.pub, DisplayName: "carol-laptop"})
	require.NoError(t, err)
	_, err = members.RevokeMember(ctxT(t), m.id, carol.pub)
	require.NoError(t, err)
	bans, err := ad.ListBans(ctxT(t))
	require.NoError(t, err)
	require.Len(t, bans, 1)
	require.Equal(t, "carol-laptop", bans[0].Name, "listed under its latest name")

	_, err = ad.Unban(ctxT(t), "carol")
	requireCode(t, err, protocol.CodeNotFound)
	var live int
	require.NoError(t, c.pool.QueryRow(ctxT(t), `SELECT count(*) FROM claudemesh.member WHERE mesh_id = $1 AND pubkey = $2
		AND revoked_at IS NULL`, m.id, carol.pub).Scan(&live))
	require.Zero(t, live, "the key is live again")
	_, err = m.tryDial(0, carol)
	require.Equal(t, protocol.CodeRevoked, helloErr(t, err).Code)
	// Nor by its key, nor by its latest name.
	for _, target := range []string{carol.pub, "carol-laptop"} {
		_, err = ad.Unban(ctxT(t), target)
		requireCode(t, err, protocol.CodeForbidden)
	}
}

func TestSendLimits(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.SendRatePerMember, cfg.SendBurstPerMember, cfg.MaxEnvelopeBytes = 1, 2, 1000 })
	m := c.mesh(0)
	alice, bob := m.member("alice"), m.member("bob")
	a := m.dial(0, alice)
	// A second session of the member shares its budget.
	a2 := m.dial(0, alice, func(o *client.Options) { o.SessionID = "other" })
	_, err := a.Send(ctxT(t), bob.pub, protocol.PriorityNow, "n", strings.Repeat("x", 1000), "")
	requireCode(t, err, protocol.CodeTooLarge)
	for _, cl := range []*client.Client{a, a2} {
		_, err = cl.Send(ctxT(t), bob.pub, protocol.PriorityNow, "n", "ok", "")
		require.NoError(t, err)
	}
	_, err = a2.Send(ctxT(t), bob.pub, protocol.PriorityNow, "n", "one too many", "")
	requireCode(t, err, protocol.CodeRateLimited)
	// Another member has a budget of its own.
	_, err = m.dial(0, bob).Send(ctxT(t), alice.pub, protocol.PriorityNow, "n", "ok", "")
	require.NoError(t, err)
}

// What waits for one member is bounded (MAX_PENDING_PER_MEMBER). Once a sweep on any replica
// finds a member at the bound, sends that would wait for it are refused recipient_full on every
// replica and nothing of them is stored; sends to others go on. Once the member has read what
// waited, the next sweep lets sends to it wait again.
func TestWaitingMessagesAreBoundedPerRecipient(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 2, func(cfg *Config) { cfg.MaxPendingPerMember, cfg.quiet = 3, true })
	m := c.mesh(0)
	alice, bob, carol := m.member("alice"), m.member("bob"), m.member("carol")
	a, cr := m.dial(0, alice), m.dial(1, carol)
	ctx := ctxT(t)
	var waited []string
	for i := range 3 {
		ack, err := a.Send(ctx, bob.pub, protocol.PriorityNow, "n", fmt.Sprint(i), "")
		require.NoError(t, err, "bob is away: his messages wait")
		waited = append(waited, ack.MessageID)
	}
	sweepBacklog(t, c.nodes[1])
	_, err := a.Send(ctx, bob.pub, protocol.PriorityNow, "n", "one too many", "")
	requireCode(t, err, protocol.CodeRecipientFull)
	_, err = cr.Send(ctx, bob.pub, protocol.PriorityLow, "n", "from the other replica", "")
	requireCode(t, err, protocol.CodeRecipientFull)
	require.Equal(t, 1.0, testutilCounter(c.nodes[0].metrics.BacklogSkips))
	toCarol, err := a.Send(ctx, carol.pub, protocol.PriorityNow, "n", "to carol", "")
	require.NoError(t, err, "other recipients are not refused")
	require.Equal(t, toCarol.MessageID, nextPush(t, cr, 10*time.Second).MessageID)

	b := m.dial(1, bob)
	for _, id := range waited {
		p := nextPush(t, b, 10*time.Second)
		require.Equal(t, id, p.MessageID)
		require.NoError(t, b.AckPush(ctx, p))
	}
	dbtest.WaitFor(t, 10*time.Second, "bob's acks recorded", func() bool {
		var open int
		return c.pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.delivery WHERE recipient_member_id = $1 AND state <> 'acked'`,
			bob.id).Scan(&open) == nil && open == 0
	})
	sweepBacklog(t, c.nodes[0])
	require.NoError(t, b.Close())
	dbtest.WaitFor(t, 10*time.Second, "bob away again", func() bool {
		var live int
		return c.pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.presence WHERE member_id = $1 AND ended_at IS NULL AND grace_until IS NULL`,
			bob.id).Scan(&live) == nil && live == 0
	})
	later, err := cr.Send(ctx, bob.pub, protocol.PriorityNow, "n", "after he read", "")
	require.NoError(t, err, "waits for bob again")
	require.Equal(t, later.MessageID, nextPush(t, m.dial(0, bob), 10*time.Second).MessageID,
		"the refused sends were never stored: the next push is the one sent after")
}

// sweepBacklog runs a backlog sweep on node, waiting out one that another replica (or the
// node's own sweeper) runs or just ran.
func sweepBacklog(t *testing.T, node *Server) {
	t.Helper()
	dbtest.WaitFor(t, 10*time.Second, "a backlog sweep ran", func() bool {
		ran, err := node.sweeper.sweepBacklogNow(ctxT(t))
		require.NoError(t, err)
		return ran
	})
}

// eventsUntil returns the system events cl receives before the push with messageID.
func eventsUntil(t *testing.T, cl *client.Client, messageID string) []protocol.Push {
	t.Helper()
	var out []protocol.Push
	deadline := time.After(5 * time.Second)
	for {
		select {
		case p := <-cl.Pushes():
			if p.MessageID == messageID {
				return out
			}
			if p.IsSystem() {
				out = append(out, p)
			}
		case <-deadline:
			t.Fatalf("push %s did not arrive", messageID)
		}
	}
}

func eventPubkey(t *testing.T, p protocol.Push) string {
	t.Helper()
	var d struct {
		Pubkey string `json:"pubkey"`
	}
	require.NoError(t, json.Unmarshal(p.EventData, &d))
	return d.Pubkey
}

func requireCode(t *testing.T, err error, code string) {
	t.Helper()
	var pe *protocol.Error
	require.ErrorAs(t, err, &pe)
	require.Equal(t, code, pe.Code, "message: %s", pe.Message)
}

// kick {stale} matches the sessions in their grace for longer than stale milliseconds. A stale
// beyond what a time.Duration holds (292 years) wrapped around: 18,446,744,073,711,000 ms became
// one second, and a kick meant to match nobody ended every session a second into its grace.
func TestKickStaleBeyondADurationMatchesNobody(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, func(cfg *Config) { cfg.SessionGrace = time.Hour })
	m := c.mesh(0)
	admin, bob := m.member("admin"), m.member("bob")
	ctx := ctxT(t)
	_, err := c.pool.Exec(ctx, `UPDATE claudemesh.member SET role = 'admin' WHERE id = $1`, admin.id)
	require.NoError(t, err)
	ad := m.dial(0, admin, asDaemon, func(o *client.Options) { o.SessionID = "cold-cli" })
	b := m.dial(0, bob, asSession(newKey(t)), func(o *client.Options) { o.SessionID = "claude-b" })
	b.Abort() // no close frame: bob's session waits in its grace
	dbtest.WaitFor(t, 10*time.Second, "bob in his grace", func() bool {
		var n int
		err := c.pool.QueryRow(ctx, `SELECT count(*) FROM claudemesh.presence WHERE member_id = $1
			AND ended_at IS NULL AND grace_until IS NOT NULL`, bob.id).Scan(&n)
		return err == nil && n == 1
	})
	// In his grace for an hour, as far as the kick can tell.
	_, err = c.pool.Exec(ctx, `UPDATE claudemesh.presence SET last_seen_at = now() - interval '1 hour'
		WHERE member_id = $1 AND ended_at IS NULL`, bob.id)
	require.NoError(t, err)

	res, err := ad.Kick(ctx, protocol.Kick{Stale: (1<<64)/1_000_000 + 1 + 1000})
	require.NoError(t, err)
	require.Empty(t, res.Kicked, "nobody has been in grace for 584 years")
	res, err = ad.Kick(ctx, protocol.Kick{Stale: int64(time.Minute / time.Millisecond)})
	require.NoError(t, err)
	require.Equal(t, []string{"bob"}, res.Kicked, "in grace for longer than a minute")
}
