package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/user"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/claudemesh/broker/client/e2e"
	"github.com/claudemesh/broker/protocol"
)

// joinTimeout bounds POST /join.
const joinTimeout = 15 * time.Second

func newInitCmd(a *app) *cobra.Command {
	var name string
	var force bool
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create your ed25519 identity",
		Long: "Create the ed25519 identity that signs your hellos and encrypts your messages, in\n" +
			"identity.json (mode 0600) in the config directory. An existing identity is kept unless\n" +
			"--force is given: replacing it loses the membership of every mesh joined with it.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if old, err := a.loadIdentity(); err == nil && !force {
				path, _ := a.identityPath()
				return fmt.Errorf("an identity already exists in %s (pubkey %s); use --force to replace it (its mesh memberships are lost)", path, old.Pubkey)
			} else if err != nil && !errors.Is(err, errNoIdentity) && !force {
				return err
			}
			if name == "" {
				name = defaultDisplayName()
			}
			id, err := newIdentity(name)
			if err != nil {
				return err
			}
			path, err := a.saveIdentity(id)
			if err != nil {
				return err
			}
			if a.asJSON {
				return printJSON(a.stdout, map[string]any{"pubkey": id.Pubkey, "displayName": id.DisplayName, "path": path})
			}
			fmt.Fprintf(a.stdout, "identity created: %s\npubkey: %s\nname: %s\n", path, id.Pubkey, id.DisplayName)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "your display name in meshes (default: user@host)")
	cmd.Flags().BoolVar(&force, "force", false, "replace an existing identity")
	return cmd
}

func defaultDisplayName() string {
	name := "peer"
	if u, err := user.Current(); err == nil && u.Username != "" {
		name = u.Username
	}
	if h, err := os.Hostname(); err == nil && h != "" {
		name += "@" + h
	}
	return name
}

func newJoinCmd(a *app) *cobra.Command {
	var name string
	var replace bool
	cmd := &cobra.Command{
		Use:   "join <ic://join/...>",
		Short: "Join a mesh with an invite link",
		Long: "Join a mesh: POST /join to the broker named in the invite (or --broker), then store the\n" +
			"mesh id, your member id, the broker URL and the mesh root key (which encrypts group\n" +
			"messages) in meshes.json. Joining again with the same identity is harmless.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := a.loadIdentity()
			if err != nil {
				return err
			}
			token, p, err := protocol.ParseInviteLink(args[0])
			if err != nil {
				return fmt.Errorf("invite link: %w", err)
			}
			if err := protocol.VerifyInvite(p); err != nil {
				return errors.New("invite link: its signature does not verify (was it altered or truncated?)")
			}
			brokerURL := p.BrokerURL
			if a.brokerURL != "" {
				brokerURL = a.brokerURL
			}
			base, err := httpBaseURL(brokerURL)
			if err != nil {
				return err
			}
			// An invite naming a mesh already joined, at another broker or with another root key,
			// is refused before anything is sent: accepted, it would silently move every later
			// command to that broker, which could then relay this identity's signed hellos to the
			// real one (a hello names no broker) and read what the mesh's root key encrypts.
			// A broker given with --broker is the user's choice, not the invite's, and the same
			// broker spelled another way (http://host for ws://host/ws) is no other broker.
			if prev, err := a.meshByID(p.MeshID); err != nil {
				return err
			} else if otherBroker := a.brokerURL == "" && !sameBroker(prev, brokerURL); prev != nil && !replace &&
				(otherBroker || prev.MeshRootKey != p.MeshRootKey) {
				what := "at " + field(brokerURL)
				if prev.MeshRootKey != p.MeshRootKey {
					what += " with another root key"
				}
				return fmt.Errorf("you are already in mesh %s (%s) at %s; this invite names it %s: not joined "+
					"(an invite reusing a mesh's id can be a lure); pass --replace if the mesh really moved",
					field(prev.Slug), field(prev.MeshID), field(prev.BrokerURL), what)
			}
			if name == "" {
				name = id.DisplayName
			}
			res, err := postJoin(cmd.Context(), base+protocol.PathJoin, protocol.JoinRequest{
				InviteToken: token, InvitePayload: *p, PeerPubkey: id.Pubkey, DisplayName: name,
			})
			if err != nil {
				return err
			}
			if p.MeshRootKey != "" {
				if _, err := e2e.ParseRootKey(p.MeshRootKey); err != nil {
					fmt.Fprintln(a.stderr, "warning: the invite's mesh root key is unusable: group messages cannot be encrypted or read")
				}
			} else {
				fmt.Fprintln(a.stderr, "warning: the invite carries no mesh root key: group messages cannot be encrypted or read")
			}
			entry := MeshEntry{
				MeshID: p.MeshID, Slug: p.MeshSlug, MemberID: res.MemberID, BrokerURL: brokerURL,
				MeshRootKey: p.MeshRootKey, Role: p.Role, DisplayName: name, JoinedAt: time.Now().UTC().Truncate(time.Second),
			}
			if err := a.saveMesh(entry); err != nil {
				return err
			}
			if a.asJSON {
				return printJSON(a.stdout, map[string]any{
					"meshId": entry.MeshID, "slug": entry.Slug, "memberId": entry.MemberID, "brokerUrl": entry.BrokerURL,
					"role": entry.Role, "alreadyMember": res.AlreadyMember,
				})
			}
			note := ""
			if res.AlreadyMember {
				note = " (already a member)"
			}
			fmt.Fprintf(a.stdout, "joined mesh %s as %s%s\nmember id: %s\nbroker: %s\n", entry.Slug, name, note, entry.MemberID, entry.BrokerURL)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "display name in this mesh (default: the identity's)")
	cmd.Flags().BoolVar(&replace, "replace", false, "join even if the invite names a mesh already joined at another broker or with another root key")
	return cmd
}

// sameBroker reports whether a joined mesh's stored broker URL and broker name the same
// WebSocket endpoint (a join stores the URL as given: ws://host/ws or http://host).
func sameBroker(prev *MeshEntry, broker string) bool {
	if prev == nil || prev.BrokerURL == broker {
		return true
	}
	a, errA := wsURL(prev.BrokerURL)
	b, errB := wsURL(broker)
	return errA == nil && errB == nil && a == b
}

// joinHints explain the /join refusals a user can act on.
var joinHints = map[string]string{
	protocol.JoinErrInviteExpired:      "the invite expired: ask for a new one",
	protocol.JoinErrInviteExhausted:    "the invite was used up: ask for a new one",
	protocol.JoinErrInviteRevoked:      "the invite was revoked",
	protocol.JoinErrInviteNotFound:     "the broker does not know this invite: is --broker the mesh's broker?",
	protocol.JoinErrMeshNotFound:       "the broker does not know this mesh: is --broker the mesh's broker?",
	protocol.JoinErrInviteBadSignature: "the invite's signature does not verify",
	protocol.JoinErrMemberRevoked:      "this key was revoked in the mesh: an admin's unban or the operator's `broker member add` readmits it",
}

func postJoin(ctx context.Context, url string, req protocol.JoinRequest) (protocol.JoinResponse, error) {
	var res protocol.JoinResponse
	body, err := json.Marshal(req)
	if err != nil {
		return res, err
	}
	ctx, cancel := context.WithTimeout(ctx, joinTimeout)
	defer cancel()
	// A broker with too many joins in flight answers 503 before running this one (Retry-After):
	// a join is safe to send again, and one turn later it usually goes through.
	for attempt := 1; ; attempt++ {
		res, retryAfter, err := postJoinOnce(ctx, url, body)
		if retryAfter == 0 || attempt == joinAttempts {
			return res, err
		}
		select {
		case <-ctx.Done():
			return res, err
		case <-time.After(retryAfter):
		}
	}
}

// joinAttempts bounds postJoin's tries when the broker answers busy.
const joinAttempts = 4

// postJoinOnce posts one join; retryAfter is set when the broker said to try again later.
func postJoinOnce(ctx context.Context, url string, body []byte) (res protocol.JoinResponse, retryAfter time.Duration, err error) {
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return res, 0, fmt.Errorf("join: %w", err)
	}
	hr.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(hr)
	if err != nil {
		return res, 0, fmt.Errorf("join: %w", err)
	}
	defer resp.Body.Close()
	raw, err := readAllLimit(resp.Body, 1<<20)
	if err != nil {
		return res, 0, fmt.Errorf("join: read answer: %w", err)
	}
	if err := json.Unmarshal(raw, &res); err != nil {
		return res, 0, fmt.Errorf("join: broker answered HTTP %d without a JSON body (is %s a claudemesh broker?)", resp.StatusCode, url)
	}
	if resp.StatusCode != http.StatusOK || !res.OK {
		msg := res.Error
		if hint, ok := joinHints[msg]; ok {
			msg += ": " + hint
		}
		err := fmt.Errorf("join refused (HTTP %d): %s", resp.StatusCode, msg)
		if resp.StatusCode == http.StatusServiceUnavailable {
			retryAfter = time.Second
			if s, perr := strconv.Atoi(resp.Header.Get("Retry-After")); perr == nil && s >= 0 {
				retryAfter = min(max(time.Duration(s)*time.Second, 100*time.Millisecond), 5*time.Second)
			}
		}
		return res, retryAfter, err
	}
	if res.MemberID == "" {
		return res, 0, errors.New("join: broker answered ok without a member id")
	}
	return res, 0, nil
}

func newMeshesCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "meshes",
		Short: "List the meshes you joined",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			meshes, err := a.loadMeshes()
			if err != nil {
				return err
			}
			if a.asJSON {
				out := make([]map[string]any, len(meshes))
				for i, m := range meshes {
					out[i] = map[string]any{
						"meshId": m.MeshID, "slug": m.Slug, "memberId": m.MemberID, "brokerUrl": m.BrokerURL,
						"role": m.Role, "displayName": m.DisplayName, "joinedAt": m.JoinedAt, "hasRootKey": m.MeshRootKey != "",
					}
				}
				return printJSON(a.stdout, out)
			}
			if len(meshes) == 0 {
				fmt.Fprintln(a.stdout, "no meshes yet: run `meshctl join <invite link>`")
				return nil
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SLUG\tNAME\tROLE\tBROKER\tMEMBER ID\tMESH ID")
			for _, m := range meshes {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.Slug, orDash(m.DisplayName), orDash(m.Role), m.BrokerURL, m.MemberID, m.MeshID)
			}
			return tw.Flush()
		},
	}
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

func orDash(s string) string {
	if strings.TrimSpace(s) == "" {
		return "-"
	}
	return s
}

// readAllLimit reads at most n bytes; more is an error.
func readAllLimit(r io.Reader, n int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, n+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > n {
		return nil, fmt.Errorf("more than %d bytes", n)
	}
	return b, nil
}
