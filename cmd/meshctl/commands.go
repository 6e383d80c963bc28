package main

// The one-shot commands: each opens its own session (one per process), does one thing and
// closes it.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/protocol"
)

func parsePriority(s string) (protocol.Priority, error) {
	p := protocol.Priority(strings.ToLower(strings.TrimSpace(s)))
	if !p.Valid() {
		return "", fmt.Errorf("priority %q: want now, next or low", s)
	}
	return p, nil
}

// resolvedTarget is where a send goes and how it is encrypted.
type resolvedTarget struct {
	spec   string // the wire targetSpec
	direct bool   // box to spec (a public key); else secretbox under the root key
	label  string // what the user typed, for messages
}

// resolveTarget maps what the user typed to a targetSpec: "*" and "@all" (everyone), "@group",
// a 64-hex public key, or a display name looked up among the live peers.
func resolveTarget(ctx context.Context, s *session, target string) (resolvedTarget, error) {
	t := strings.TrimSpace(target)
	switch {
	case t == "":
		return resolvedTarget{}, errors.New("empty target")
	case t == "*" || strings.HasPrefix(t, "@"):
		if len(t) == 1 && t == "@" {
			return resolvedTarget{}, errors.New("target @: name a group, e.g. @backend, or use * for everyone")
		}
		return resolvedTarget{spec: t, label: t}, nil
	}
	if pub, err := protocol.NormalizePubkey(t); err == nil {
		return resolvedTarget{spec: pub, direct: true, label: shortKey(pub)}, nil
	}
	peers, err := s.cl.ListPeers(ctx)
	if err != nil {
		return resolvedTarget{}, fmt.Errorf("list peers: %w", err)
	}
	var keys []string
	for _, exact := range []bool{true, false} {
		for _, p := range peers {
			if p.SessionID == s.sessionID {
				continue
			}
			if (exact && p.DisplayName == t) || (!exact && strings.EqualFold(p.DisplayName, t)) {
				k := strings.ToLower(p.Pubkey)
				if !slices.Contains(keys, k) {
					keys = append(keys, k)
				}
			}
		}
		if len(keys) > 0 {
			break
		}
	}
	switch len(keys) {
	case 0:
		return resolvedTarget{}, fmt.Errorf("no live peer is named %q (see `meshctl peers`); an offline member can be reached by its pubkey", t)
	case 1:
		return resolvedTarget{spec: keys[0], direct: true, label: t}, nil
	}
	return resolvedTarget{}, fmt.Errorf("%d peers are named %q: send to one of their pubkeys instead: %s", len(keys), t, strings.Join(keys, ", "))
}

func newSendCmd(a *app) *cobra.Command {
	var prio string
	cmd := &cobra.Command{
		Use:   "send <target> <text...>",
		Short: "Send an end-to-end encrypted message",
		Long: "Send a message. The target is a peer's display name (looked up among the live peers),\n" +
			"a member or session pubkey (64 hex), * (everyone) or @group. Direct messages are sealed\n" +
			"with NaCl box to the recipient's key, group and broadcast messages with secretbox under\n" +
			"the mesh root key; the broker only stores ciphertext. Text \"-\" reads it from stdin.",
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := parsePriority(prio)
			if err != nil {
				return err
			}
			text := strings.Join(args[1:], " ")
			if text == "-" {
				b, err := readAllLimit(a.stdin, protocol.DefaultMaxMessageBytes)
				if err != nil {
					return fmt.Errorf("read stdin: %w", err)
				}
				text = strings.TrimRight(string(b), "\n")
			}
			return a.oneShot(cmd.Context(), func(ctx context.Context, s *session) error {
				ctx, cancel := context.WithTimeout(ctx, requestTimeout)
				defer cancel()
				tgt, err := resolveTarget(ctx, s, args[0])
				if err != nil {
					return err
				}
				var nonce, ct string
				mode := "group"
				if tgt.direct {
					mode = "direct"
					nonce, ct, err = s.keys.SealDirect(tgt.spec, []byte(text))
				} else {
					nonce, ct, err = s.keys.SealGroup([]byte(text))
				}
				if err != nil {
					return fmt.Errorf("encrypt: %w", err)
				}
				// The client_message_id makes a send repeated after a lost ack stored once.
				cmid := uuid.NewString()
				ack, err := a.sendRetrying(ctx, s, &protocol.Send{TargetSpec: tgt.spec, Priority: p, Nonce: nonce,
					Ciphertext: ct, ID: cmid, ClientMessageID: cmid})
				if err != nil {
					var pe *protocol.Error
					if errors.As(err, &pe) && pe.Code == protocol.CodeNoRecipient {
						return fmt.Errorf("send to %s refused: no such member or session in mesh %s", tgt.label, s.mesh.Slug)
					}
					return fmt.Errorf("send: %w", err)
				}
				if a.asJSON {
					return printJSON(a.stdout, map[string]any{"messageId": ack.MessageID, "targetSpec": tgt.spec, "priority": p, "mode": mode, "queued": ack.Queued})
				}
				fmt.Fprintf(a.stdout, "sent %s to %s (%s, priority %s)\n", field(ack.MessageID), field(tgt.label), mode, p)
				return nil
			})
		},
	}
	cmd.Flags().StringVarP(&prio, "priority", "p", "next", "now (interrupts), next (when idle) or low")
	return cmd
}

// sendAttempts bounds how often send tries one message, all within requestTimeout.
const sendAttempts = 4

// sendRetrying sends m and sends it again when its outcome is unknown or it was not stored
// for a passing reason: the connection ended before the ack (a replica killed or draining,
// a network cut, 1013 send_outcome_unknown), or the broker answered unavailable. A new
// connection resumes the same session. m carries a client_message_id, so an attempt that
// was stored after all is acked again with its message id, and delivered once.
func (a *app) sendRetrying(ctx context.Context, s *session, m *protocol.Send) (protocol.Ack, error) {
	frame, err := protocol.Encode(m)
	if err != nil {
		return protocol.Ack{}, err
	}
	// Beyond the brokers' default frame limit the broker most likely closed for the size
	// (1009), which can come as a reset before its close frame: no point in sending it again.
	oversized := len(frame) > protocol.DefaultMaxMessageBytes
	cl := s.cl
	defer func() {
		if cl != nil && cl != s.cl {
			cl.Close()
		}
	}()
	backoff := client.Backoff{Min: 250 * time.Millisecond, Max: 2 * time.Second}
	var ack protocol.Ack
	var sendErr error // the last send's error
	for attempt := 1; ; attempt++ {
		if cl == nil {
			ns, derr := a.dial(ctx, s.id, s.mesh, s.keys, dialOpts{buffers: 16})
			if derr != nil {
				err = fmt.Errorf("%w; reconnecting: %w", sendErr, derr)
				if !client.DialRetryable(derr) {
					return ack, err
				}
			} else {
				go discardEvents(ns.cl)
				cl = ns.cl
			}
		}
		why := ""
		if cl != nil {
			ack, err = cl.SendMessage(ctx, m)
			sendErr = err
			var again, reconnect bool
			why, again, reconnect = sendRetryable(ctx, cl, err)
			lost := again && reconnect && why != unavailableWhy
			if err != nil && (cl.CloseCode() == protocol.CloseTooLarge || (lost && oversized)) {
				return ack, fmt.Errorf("message too large for the broker: its frame is %d bytes, brokers take %d unless configured otherwise (%w)",
					len(frame), protocol.DefaultMaxMessageBytes, err)
			}
			if !again {
				return ack, err
			}
			if reconnect {
				if cl != s.cl {
					cl.Close()
				}
				cl = nil
			}
		}
		if attempt == sendAttempts {
			return ack, err
		}
		d := backoff.Next()
		if why != "" {
			fmt.Fprintf(a.stderr, "meshctl: %s; sending again in %s (it is stored once either way)\n", why, d.Round(time.Millisecond))
		}
		if !sleepCtx(ctx, d) {
			return ack, err
		}
	}
}

const unavailableWhy = "the broker could not store the message"

// sendRetryable tells whether a send that failed with err may be sent again, why, and
// whether on a new connection.
func sendRetryable(ctx context.Context, cl *client.Client, err error) (why string, again, reconnect bool) {
	var pe *protocol.Error
	switch {
	case err == nil, ctx.Err() != nil:
		return "", false, false
	case errors.As(err, &pe):
		if pe.Code != protocol.CodeUnavailable {
			return "", false, false // refused for good: no_recipient, too_large, ...
		}
		select {
		case <-cl.Done():
			return unavailableWhy, true, true
		default:
			return unavailableWhy, true, false
		}
	}
	// The connection broke before the ack came. A failed write ends it too: wait for the end,
	// whose close code says whether to try again.
	select {
	case <-cl.Done():
	case <-ctx.Done():
		return "", false, false
	}
	if !client.ShouldReconnect(cl.CloseCode(), cl.CloseReason()) {
		return "", false, false // kicked, revoked, replaced: not ours to override
	}
	return fmt.Sprintf("connection lost before the broker acknowledged the message (close %d)", cl.CloseCode()), true, true
}

func newPeersCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "peers",
		Short: "List the live sessions of the mesh",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.oneShot(cmd.Context(), func(ctx context.Context, s *session) error {
				ctx, cancel := context.WithTimeout(ctx, requestTimeout)
				defer cancel()
				all, err := s.cl.ListPeers(ctx)
				if err != nil {
					return err
				}
				// This command's own short-lived session is no peer worth listing.
				peers := slices.DeleteFunc(all, func(p protocol.Peer) bool { return p.SessionID == s.sessionID })
				if a.asJSON {
					if peers == nil {
						peers = []protocol.Peer{}
					}
					return printJSON(a.stdout, peers)
				}
				if len(peers) == 0 {
					fmt.Fprintln(a.stdout, "no other live sessions in mesh", s.mesh.Slug)
					return nil
				}
				tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tSTATUS\tSUMMARY\tGROUPS\tPUBKEY\tCONNECTED")
				for _, p := range peers {
					groups := make([]string, len(p.Groups))
					for i, g := range p.Groups {
						groups[i] = g.Name
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", field(orDash(p.DisplayName)), field(string(p.Status)),
						field(orDash(oneLine(p.Summary, 40))), field(orDash(strings.Join(groups, ","))), field(p.Pubkey), field(p.ConnectedAt))
				}
				return tw.Flush()
			})
		},
	}
}

func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return s
}

// ownPeer reads this session's entry back: the reply also proves that the broker processed
// the fire-and-forget frames sent before it.
func ownPeer(ctx context.Context, s *session) (protocol.Peer, error) {
	peers, err := s.cl.ListPeers(ctx)
	if err != nil {
		return protocol.Peer{}, err
	}
	for _, p := range peers {
		if p.SessionID == s.sessionID {
			return p, nil
		}
	}
	return protocol.Peer{}, errors.New("own session missing from peers_list")
}

const sessionScopeNote = "\n\nStatus and summary belong to a session, and this command's session lasts only as long\n" +
	"as the command. For a lasting status run `meshctl listen --status ...`, and let the Claude\n" +
	"Code hooks (`meshctl hook install`) switch between working and idle."

func newStatusCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "status", Short: "Set this session's status"}
	cmd.AddCommand(&cobra.Command{
		Use:       "set <idle|working|dnd>",
		Short:     "Set the session status (next and low messages wait while working or dnd)",
		Long:      "Set the session status: idle, working or dnd. next and low messages wait while a session\nis working or dnd; now messages always pass." + sessionScopeNote,
		Args:      cobra.ExactArgs(1),
		ValidArgs: []string{"idle", "working", "dnd"},
		RunE: func(cmd *cobra.Command, args []string) error {
			st := protocol.Status(strings.ToLower(args[0]))
			if !st.Valid() {
				return fmt.Errorf("status %q: want idle, working or dnd", args[0])
			}
			return a.oneShot(cmd.Context(), func(ctx context.Context, s *session) error {
				ctx, cancel := context.WithTimeout(ctx, requestTimeout)
				defer cancel()
				if err := s.cl.SetStatus(ctx, st); err != nil {
					return err
				}
				p, err := ownPeer(ctx, s)
				if err != nil {
					return err
				}
				if a.asJSON {
					return printJSON(a.stdout, p)
				}
				fmt.Fprintf(a.stdout, "status %s (session %s)\n", p.Status, s.sessionID)
				return nil
			})
		},
	})
	return cmd
}

func newSummaryCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "summary <text...>",
		Short: "Set this session's summary (what you are working on)",
		Long:  "Set the session summary other peers see in `meshctl peers`; \"\" clears it." + sessionScopeNote,
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			text := strings.Join(args, " ")
			if len(text) > protocol.MaxSummaryLen {
				return fmt.Errorf("summary is %d bytes: at most %d", len(text), protocol.MaxSummaryLen)
			}
			return a.oneShot(cmd.Context(), func(ctx context.Context, s *session) error {
				ctx, cancel := context.WithTimeout(ctx, requestTimeout)
				defer cancel()
				if err := s.cl.SetSummary(ctx, text); err != nil {
					return err
				}
				p, err := ownPeer(ctx, s)
				if err != nil {
					return err
				}
				if a.asJSON {
					return printJSON(a.stdout, p)
				}
				fmt.Fprintf(a.stdout, "summary set (session %s)\n", s.sessionID)
				return nil
			})
		},
	}
}

func newStateCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "state",
		Short: "Read and write the mesh's shared key/value state",
		Long:  "The mesh's shared state: a key/value store every peer of the mesh can read and write\n(not end-to-end encrypted: the broker stores values as given).",
	}
	printEntry := func(key string, value json.RawMessage, by, at string) {
		if len(value) == 0 || string(value) == "null" {
			fmt.Fprintf(a.stdout, "%s is not set\n", field(key))
			return
		}
		fmt.Fprintf(a.stdout, "%s = %s", field(key), sanitize(string(value)))
		if by != "" {
			fmt.Fprintf(a.stdout, "  (by %s at %s)", field(shortKey(by)), field(at))
		}
		fmt.Fprintln(a.stdout)
	}
	get := &cobra.Command{
		Use:   "get <key>",
		Short: "Print one key",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.oneShot(cmd.Context(), func(ctx context.Context, s *session) error {
				ctx, cancel := context.WithTimeout(ctx, requestTimeout)
				defer cancel()
				r, err := s.cl.GetState(ctx, args[0])
				if err != nil {
					return err
				}
				if a.asJSON {
					return printJSON(a.stdout, stateJSON(r.Key, r.Value, r.UpdatedBy, r.UpdatedAt))
				}
				printEntry(r.Key, r.Value, r.UpdatedBy, r.UpdatedAt)
				return nil
			})
		},
	}
	var asString bool
	set := &cobra.Command{
		Use:   "set <key> <value>",
		Short: "Set a key (the value is JSON if it parses as JSON, else a string)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var value json.RawMessage
			if !asString && json.Valid([]byte(args[1])) {
				value = json.RawMessage(args[1])
			} else {
				b, _ := json.Marshal(args[1])
				value = b
			}
			return a.oneShot(cmd.Context(), func(ctx context.Context, s *session) error {
				ctx, cancel := context.WithTimeout(ctx, requestTimeout)
				defer cancel()
				if err := s.cl.SetState(ctx, args[0], value); err != nil {
					return err
				}
				// Read back: the reply also means the broker has processed the set.
				r, err := s.cl.GetState(ctx, args[0])
				if err != nil {
					return err
				}
				if a.asJSON {
					return printJSON(a.stdout, stateJSON(r.Key, r.Value, r.UpdatedBy, r.UpdatedAt))
				}
				printEntry(r.Key, r.Value, r.UpdatedBy, r.UpdatedAt)
				return nil
			})
		},
	}
	set.Flags().BoolVar(&asString, "string", false, "store the value as a string even if it parses as JSON")
	list := &cobra.Command{
		Use:   "list",
		Short: "Print every key",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.oneShot(cmd.Context(), func(ctx context.Context, s *session) error {
				ctx, cancel := context.WithTimeout(ctx, requestTimeout)
				defer cancel()
				entries, err := s.cl.ListState(ctx)
				if err != nil {
					return err
				}
				if a.asJSON {
					out := make([]map[string]any, len(entries))
					for i, e := range entries {
						out[i] = stateJSON(e.Key, e.Value, e.UpdatedBy, e.UpdatedAt)
					}
					return printJSON(a.stdout, out)
				}
				if len(entries) == 0 {
					fmt.Fprintln(a.stdout, "no shared state in mesh", s.mesh.Slug)
				}
				for _, e := range entries {
					printEntry(e.Key, e.Value, e.UpdatedBy, e.UpdatedAt)
				}
				return nil
			})
		},
	}
	cmd.AddCommand(get, set, list)
	return cmd
}

func stateJSON(key string, value json.RawMessage, by, at string) map[string]any {
	if len(value) == 0 {
		value = json.RawMessage("null")
	}
	return map[string]any{"key": key, "value": value, "updatedBy": by, "updatedAt": at}
}

func newMessageStatusCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "message-status <message id>",
		Short: "Show a sent message's delivery state per recipient",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.oneShot(cmd.Context(), func(ctx context.Context, s *session) error {
				ctx, cancel := context.WithTimeout(ctx, requestTimeout)
				defer cancel()
				r, err := s.cl.MessageStatus(ctx, args[0])
				var pe *protocol.Error
				if errors.As(err, &pe) && pe.Code == protocol.CodeNotFound {
					return fmt.Errorf("no message %s in mesh %s", args[0], s.mesh.Slug)
				}
				if err != nil {
					return err
				}
				r.ReqID = ""
				if a.asJSON {
					return printJSON(a.stdout, r)
				}
				state := "not delivered yet"
				if r.Delivered {
					state = "delivered at " + r.DeliveredAt
				}
				fmt.Fprintf(a.stdout, "message %s to %s: %s\n", field(r.MessageID), field(r.TargetSpec), field(state))
				if len(r.Recipients) > 0 {
					tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
					fmt.Fprintln(tw, "RECIPIENT\tSTATUS\tPUBKEY")
					for _, rc := range r.Recipients {
						fmt.Fprintf(tw, "%s\t%s\t%s\n", field(orDash(rc.Name)), field(string(rc.Status)), field(rc.Pubkey))
					}
					return tw.Flush()
				}
				return nil
			})
		},
	}
}
