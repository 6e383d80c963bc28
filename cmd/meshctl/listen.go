package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/client/e2e"
	"github.com/claudemesh/broker/protocol"
)

const (
	// seenIDs bounds the set of message ids listen remembers to drop redeliveries (the broker
	// pushes unacknowledged messages again after a reconnect).
	seenIDs = 4096
	// stableAfter: a connection that lasted this long resets the reconnect backoff.
	stableAfter = 30 * time.Second
	// namesRefreshEvery bounds peer-list lookups for unknown senders.
	namesRefreshEvery = 3 * time.Second
)

type listenOpts struct {
	pid     int
	cwd     string
	status  string
	summary string
	groups  []string
	events  bool
}

func newListenCmd(a *app) *cobra.Command {
	var o listenOpts
	cmd := &cobra.Command{
		Use:   "listen",
		Short: "Print messages as they arrive, decrypted, and acknowledge them",
		Long: "Stay connected and print every message as it arrives, decrypted, with its sender's name;\n" +
			"each is acknowledged (client_ack) once printed, so a message is never lost between a\n" +
			"push and a crash: unacknowledged messages come again on the next connection and are\n" +
			"printed once. The connection is re-established with jittered backoff when it drops or\n" +
			"the broker drains, and not after a refused hello, a kick, a revocation, a newer\n" +
			"session with the same --session-id, or an upgrade refused with an HTTP status no retry\n" +
			"mends (404: not a broker's URL). With --json, one JSON object per line.\n\n" +
			"For Claude Code's hooks to find this session, run it from the project directory (or pass\n" +
			"--cwd); --pid defaults to the parent process, which is Claude Code when it starts listen.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if o.status != "" && !protocol.Status(o.status).Valid() {
				return fmt.Errorf("--status %q: want idle, working or dnd", o.status)
			}
			return a.listen(cmd.Context(), o)
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.pid, "pid", os.Getppid(), "pid reported in the hello (hooks match sessions by pid + cwd)")
	f.StringVar(&o.cwd, "cwd", "", "working directory reported in the hello (default: the current one)")
	f.StringVar(&o.status, "status", "", "status to set after each connect: idle, working or dnd")
	f.StringVar(&o.summary, "summary", "", "summary to set after each connect")
	f.StringArrayVar(&o.groups, "group", nil, "join a group: name or name:role (repeatable)")
	f.BoolVar(&o.events, "events", false, "also print peer joins, leaves and status changes, and shared-state changes")
	return cmd
}

// listenPrinter writes messages and events, as text or JSON lines.
type listenPrinter struct {
	mu     sync.Mutex
	w      io.Writer
	asJSON bool
}

func (p *listenPrinter) json(v any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	b, _ := json.Marshal(v)
	_, _ = p.w.Write(append(b, '\n'))
}

func (p *listenPrinter) text(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, format, args...)
}

// listenState lives across reconnects.
type listenState struct {
	names    *peerNames
	seen     map[string]struct{}
	seenRing []string
	ringPos  int
}

func (st *listenState) markSeen(id string) bool {
	if _, ok := st.seen[id]; ok {
		return false
	}
	if len(st.seenRing) < seenIDs {
		st.seenRing = append(st.seenRing, id)
	} else {
		delete(st.seen, st.seenRing[st.ringPos])
		st.seenRing[st.ringPos] = id
		st.ringPos = (st.ringPos + 1) % seenIDs
	}
	st.seen[id] = struct{}{}
	return true
}

func (a *app) listen(ctx context.Context, o listenOpts) error {
	id, mesh, keys, err := a.peerSetup()
	if err != nil {
		return err
	}
	groups, err := parseGroups(o.groups)
	if err != nil {
		return err
	}
	// A URL that can't work never will: said once, not retried below as if the broker were away.
	if _, err := a.meshWSURL(mesh); err != nil {
		return err
	}
	pr := &listenPrinter{w: a.stdout, asJSON: a.asJSON}
	st := &listenState{names: newPeerNames(), seen: make(map[string]struct{})}
	backoff := client.Backoff{Min: 250 * time.Millisecond, Max: 30 * time.Second}
	for attempt := 0; ; attempt++ {
		s, err := a.dial(ctx, id, mesh, keys, dialOpts{pid: o.pid, cwd: o.cwd, groups: groups, events: true})
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if !client.DialRetryable(err) {
				return fmt.Errorf("connect to %s: %w", mesh.Slug, err)
			}
			d := backoff.Next()
			fmt.Fprintf(a.stderr, "meshctl: connect failed (%s); retrying in %s\n", field(err.Error()), d.Round(time.Millisecond))
			if !sleepCtx(ctx, d) {
				return nil
			}
			continue
		}
		fmt.Fprintf(a.stderr, "meshctl: listening in mesh %s as %s (session %s, %s)\n", field(mesh.Slug), field(s.cl.HelloAck().MemberDisplayName),
			field(s.sessionID), s.url)
		started := time.Now()
		code, reason := a.listenSession(ctx, s, o, pr, st)
		if ctx.Err() != nil {
			return nil
		}
		if !client.ShouldReconnect(code, reason) {
			return closeExplanation(code, reason)
		}
		if time.Since(started) > stableAfter {
			backoff.Reset()
		}
		d := backoff.Next()
		if code == protocol.CloseDraining {
			d = min(d, 250*time.Millisecond) // "reconnect at once (any replica)"; jittered
		}
		fmt.Fprintf(a.stderr, "meshctl: disconnected (close %d %s); reconnecting in %s\n", code, field(reason), d.Round(time.Millisecond))
		if !sleepCtx(ctx, d) {
			return nil
		}
	}
}

func closeExplanation(code int, reason string) error {
	switch code {
	case protocol.CloseKicked:
		return errors.New("kicked from the mesh by an admin (close 4001)")
	case protocol.CloseRevoked:
		return errors.New("your membership was revoked (close 4002)")
	case protocol.CloseHelloRefused:
		return fmt.Errorf("hello refused (close 1008 %s)", field(reason))
	case protocol.CloseSessionReplaced:
		return errors.New("a newer process took over this session (same --session-id); not reconnecting")
	}
	return fmt.Errorf("connection closed (%d %s)", code, field(reason))
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func parseGroups(specs []string) ([]protocol.Group, error) {
	var out []protocol.Group
	for _, s := range specs {
		name, role, _ := strings.Cut(strings.TrimPrefix(s, "@"), ":")
		if name == "" || strings.ContainsAny(name, " \t\n") {
			return nil, fmt.Errorf("--group %q: want name or name:role", s)
		}
		out = append(out, protocol.Group{Name: name, Role: role})
	}
	return out, nil
}

// listenSession runs one connection until it ends; it returns the close code and reason.
func (a *app) listenSession(ctx context.Context, s *session, o listenOpts, pr *listenPrinter, st *listenState) (int, string) {
	cl := s.cl
	defer cl.Close()
	if o.status != "" {
		if err := cl.SetStatus(ctx, protocol.Status(o.status)); err != nil {
			a.log.Warn("set status", "err", err)
		}
	}
	if o.summary != "" {
		if err := cl.SetSummary(ctx, o.summary); err != nil {
			a.log.Warn("set summary", "err", err)
		}
	}
	// The names come in the background: a reply can wait behind a burst of pushes that only
	// this goroutine consumes.
	go func() {
		rctx, cancel := context.WithTimeout(ctx, requestTimeout)
		defer cancel()
		if peers, err := cl.ListPeers(rctx); err == nil {
			st.names.setPeers(peers)
		}
	}()
	var lastRefresh time.Time
	pushes, changes, errs := cl.Pushes(), cl.StateChanges(), cl.Errors()
	for {
		select {
		case <-ctx.Done():
			return 0, ""
		case p, ok := <-pushes:
			if !ok {
				pushes = nil
				continue
			}
			if p.IsSystem() {
				a.onEvent(p, o, pr, st)
				continue
			}
			if _, known := st.names.lookup(p.SenderPubkey, p.SenderMemberPubkey); !known && time.Since(lastRefresh) > namesRefreshEvery {
				lastRefresh = time.Now()
				rctx, cancel := context.WithTimeout(ctx, time.Second)
				if peers, err := cl.ListPeers(rctx); err == nil {
					st.names.setPeers(peers)
				}
				cancel()
			}
			if st.markSeen(p.MessageID) {
				a.printMessage(p, s.keys, pr, st)
			}
			// Acknowledged after printing, redeliveries included (their first ack may be lost).
			if err := cl.AckMessages(ctx, p.MessageID); err != nil {
				a.log.Debug("ack", "err", err)
			}
		case c, ok := <-changes:
			if !ok {
				changes = nil
				continue
			}
			if o.events {
				if pr.asJSON {
					pr.json(map[string]any{"type": "state_change", "key": c.Key, "value": rawOrNull(c.Value), "updatedBy": c.UpdatedBy})
				} else {
					pr.text("%s  state %s = %s\n", time.Now().Format(time.TimeOnly), field(c.Key), sanitize(string(rawOrNull(c.Value))))
				}
			}
		case e, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			a.log.Warn("broker error", "code", e.Code, "message", e.Message)
		case <-cl.Done():
			return cl.CloseCode(), cl.CloseReason()
		}
	}
}

func rawOrNull(v json.RawMessage) json.RawMessage {
	if len(v) == 0 {
		return json.RawMessage("null")
	}
	return v
}

// listenMessage is the --json form of a received message.
type listenMessage struct {
	Type         string `json:"type"` // "message"
	MessageID    string `json:"messageId"`
	From         string `json:"from"`
	SenderPubkey string `json:"senderPubkey"`
	SenderMember string `json:"senderMemberPubkey,omitempty"`
	Priority     string `json:"priority"`
	Mode         string `json:"mode,omitempty"` // direct, group or plain
	Encrypted    bool   `json:"encrypted"`
	Text         string `json:"text"`
	Error        string `json:"error,omitempty"`
	CreatedAt    string `json:"createdAt"`
	ReceivedAt   string `json:"receivedAt"`
}

func (a *app) printMessage(p protocol.Push, keys *e2e.Keyring, pr *listenPrinter, st *listenState) {
	from, ok := st.names.lookup(p.SenderPubkey, p.SenderMemberPubkey)
	if !ok {
		from = shortKey(p.SenderPubkey)
	}
	m := listenMessage{
		Type: "message", MessageID: p.MessageID, From: from, SenderPubkey: p.SenderPubkey, SenderMember: p.SenderMemberPubkey,
		Priority: string(p.Priority), CreatedAt: p.CreatedAt, ReceivedAt: protocol.FormatTime(time.Now()),
	}
	opened, err := keys.Open(p.Nonce, p.Ciphertext, p.SenderPubkey, p.SenderMemberPubkey)
	if err != nil {
		m.Error = "undecryptable"
		a.log.Debug("message does not decrypt", "message_id", p.MessageID, "err", err)
	} else {
		m.Mode, m.Encrypted, m.Text = string(opened.Mode), opened.Mode.Encrypted(), string(opened.Plaintext)
	}
	if pr.asJSON {
		pr.json(m)
		return
	}
	at := time.Now().Format(time.TimeOnly)
	switch {
	case m.Error != "":
		pr.text("%s  %s: [message %s could not be decrypted]\n", at, field(from), field(p.MessageID))
	case opened.Mode == e2e.ModePlain:
		pr.text("%s  %s (UNENCRYPTED, %s): %s\n", at, field(from), p.Priority, sanitize(m.Text))
	default:
		pr.text("%s  %s (%s, %s): %s\n", at, field(from), opened.Mode, p.Priority, sanitize(m.Text))
	}
}

// peerEvent is the eventData of peer_joined, peer_left and peer_status.
type peerEvent struct {
	Pubkey      string `json:"pubkey"`
	DisplayName string `json:"displayName"`
	Status      string `json:"status"`
}

func (a *app) onEvent(p protocol.Push, o listenOpts, pr *listenPrinter, st *listenState) {
	var ev peerEvent
	_ = json.Unmarshal(p.EventData, &ev)
	st.names.set(ev.Pubkey, ev.DisplayName)
	if !o.events {
		return
	}
	if pr.asJSON {
		pr.json(map[string]any{"type": "event", "event": p.Event, "data": rawOrNull(p.EventData)})
		return
	}
	name := field(orDash(ev.DisplayName))
	at := time.Now().Format(time.TimeOnly)
	switch p.Event {
	case protocol.EventPeerJoined:
		pr.text("%s  * %s joined\n", at, name)
	case protocol.EventPeerLeft:
		pr.text("%s  * %s left\n", at, name)
	case protocol.EventPeerStatus:
		pr.text("%s  * %s is %s\n", at, name, field(ev.Status))
	default:
		pr.text("%s  * %s\n", at, field(p.Event))
	}
}
