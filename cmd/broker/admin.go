package main

// The admin verbs: mesh, invite, member and audit. Each works against DATABASE_URL or the
// embedded default, applies pending migrations first (so they work on a fresh database), and
// prints a readable table or, with --json, one JSON document for scripts.

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/cobra"

	"github.com/claudemesh/broker/broker"
	"github.com/claudemesh/broker/broker/audit"
	"github.com/claudemesh/broker/broker/membership"
	"github.com/claudemesh/broker/client"
	"github.com/claudemesh/broker/db"
)

func init() {
	extraCommands = append(extraCommands, newMeshCmd, newInviteCmd, newMemberCmd, newAuditCmd)
}

// admin holds what every admin verb needs once connected.
type admin struct {
	cmd  *cobra.Command
	cfg  broker.Config
	pool *pgxpool.Pool
	svc  *membership.Service
	json bool
}

// runAdmin connects (to the embedded Postgres when DATABASE_URL is unset: the one a running serve
// uses, or its own for the duration of the verb), migrates and runs f.
func runAdmin(cmd *cobra.Command, asJSON bool, f func(ctx context.Context, a *admin) error) error {
	return withDatabase(cmd, attachEmbedded, func(ctx context.Context, url string, cfg broker.Config, logger *slog.Logger) error {
		if err := db.Migrate(ctx, url, nil); err != nil {
			return err
		}
		pool, err := db.NewPool(ctx, url, db.PoolConfig{MaxConns: 4, AppName: "claudemesh-admin"})
		if err != nil {
			return err
		}
		defer pool.Close()
		return f(ctx, &admin{cmd: cmd, cfg: cfg, pool: pool, svc: membership.New(pool, membership.Config{Logger: logger, BusNamespace: cfg.BusNamespace}), json: asJSON})
	})
}

func (a *admin) out() io.Writer { return a.cmd.OutOrStdout() }

func (a *admin) printJSON(v any) error {
	enc := json.NewEncoder(a.out())
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table writes aligned columns; rows are tab-separated.
func (a *admin) table(header string, rows []string) error {
	tw := tabwriter.NewWriter(a.out(), 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, r)
	}
	return tw.Flush()
}

func addJSONFlag(cmd *cobra.Command, v *bool) {
	cmd.Flags().BoolVar(v, "json", false, "print JSON for scripts instead of a table")
}

// defaultOwnerKeyPath is where a mesh's owner key lives when --owner-key is not given.
func defaultOwnerKeyPath(slug string) (string, error) {
	dir, err := os.UserConfigDir()
	if err != nil {
		return "", fmt.Errorf("no --owner-key given and no user config directory: %w", err)
	}
	return filepath.Join(dir, "claudemesh", "owner-keys", slug+".json"), nil
}

func ownerKeyPath(flag, slug string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	return defaultOwnerKeyPath(slug)
}

func shortTime(t time.Time) string { return t.Local().Format("2006-01-02 15:04:05") }

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newMeshCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "mesh", Short: "Create and list meshes"}

	var slug, name, keyFile string
	var maxPeers int
	var createJSON bool
	create := &cobra.Command{
		Use:   "create",
		Short: "Create a mesh; its owner key file is created when absent",
		Long: "Create a mesh owned by the key in --owner-key (created, mode 0600, when the file does not\n" +
			"exist). The file holds the owner's private key and the mesh root key; the database only\n" +
			"ever sees the owner's public key. Keep the file: invites are signed with it.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Checked before anything is written: the slug names the default key file.
			if err := membership.CheckSlug(slug); err != nil {
				return fmt.Errorf("--slug: %w", err)
			}
			path, err := ownerKeyPath(keyFile, slug)
			if err != nil {
				return err
			}
			return runAdmin(cmd, createJSON, func(ctx context.Context, a *admin) error {
				key, created, err := membership.LoadOrCreateOwnerKey(path)
				if err != nil {
					return err
				}
				mesh, owner, err := a.svc.CreateMesh(ctx, membership.CreateMeshParams{Slug: slug, Name: name, OwnerPubkey: key.Pubkey(), MaxPeers: maxPeers})
				if err != nil {
					if created { // a key for a mesh that does not exist would only confuse
						_ = os.Remove(path)
					}
					return err
				}
				if a.json {
					return a.printJSON(map[string]any{"mesh": mesh, "owner": owner, "ownerKeyFile": path, "ownerKeyCreated": created})
				}
				verb := "using existing"
				if created {
					verb = "created"
				}
				fmt.Fprintf(a.out(), "mesh %s created (id %s)\nowner key: %s (%s; keep it, invites are signed with it)\nowner pubkey: %s\nowner member id: %s\n",
					mesh.Slug, mesh.ID, path, verb, mesh.OwnerPubkey, owner.ID)
				return nil
			})
		},
	}
	create.Flags().StringVar(&slug, "slug", "", "mesh slug: 1-63 of a-z, 0-9 and '-' (required)")
	create.Flags().StringVar(&name, "name", "", "display name (default: the slug)")
	create.Flags().StringVar(&keyFile, "owner-key", "", "owner key file (default: <user config dir>/claudemesh/owner-keys/<slug>.json)")
	create.Flags().IntVar(&maxPeers, "max-peers", 0, "live sessions allowed in the mesh (0: MAX_CONNECTIONS_PER_MESH)")
	addJSONFlag(create, &createJSON)
	_ = create.MarkFlagRequired("slug")

	var listJSON bool
	list := &cobra.Command{
		Use:   "list",
		Short: "List meshes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAdmin(cmd, listJSON, func(ctx context.Context, a *admin) error {
				meshes, err := a.svc.Meshes(ctx)
				if err != nil {
					return err
				}
				if a.json {
					return a.printJSON(meshes)
				}
				rows := make([]string, len(meshes))
				for i, m := range meshes {
					peers := "default"
					if m.MaxPeers > 0 {
						peers = strconv.Itoa(m.MaxPeers)
					}
					state := "active"
					if m.ArchivedAt != nil {
						state = "archived"
					}
					rows[i] = strings.Join([]string{m.Slug, m.Name, strconv.Itoa(m.LiveMembers), peers, state, shortTime(m.CreatedAt), m.ID}, "\t")
				}
				return a.table("SLUG\tNAME\tMEMBERS\tMAX PEERS\tSTATE\tCREATED\tID", rows)
			})
		},
	}
	addJSONFlag(list, &listJSON)
	cmd.AddCommand(create, list)
	return cmd
}

func newInviteCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "invite", Short: "Create and revoke invites"}

	var mesh, keyFile, role, brokerURL, expires string
	var uses int
	var createJSON bool
	create := &cobra.Command{
		Use:   "create",
		Short: "Sign an invite with the owner key and print its ic://join/ link",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ttl, err := parseTTL(expires)
			if err != nil {
				return fmt.Errorf("--expires: %w", err)
			}
			// The service reads 0 as its default (one use): said here, 0 meant "no limit".
			if uses < 1 {
				return fmt.Errorf("--uses %d: must be at least 1 (there is no unlimited invite; give a large number)", uses)
			}
			return runAdmin(cmd, createJSON, func(ctx context.Context, a *admin) error {
				m, err := a.svc.Mesh(ctx, mesh)
				if err != nil {
					return err
				}
				path, err := ownerKeyPath(keyFile, m.Slug)
				if err != nil {
					return err
				}
				key, err := membership.LoadOwnerKey(path)
				if err != nil {
					return err
				}
				url := brokerURL
				if url == "" {
					url = fmt.Sprintf("ws://localhost:%d/ws", a.cfg.Port)
				}
				inv, err := a.svc.CreateInvite(ctx, membership.CreateInviteParams{Mesh: m.ID, Key: key, MaxUses: uses, TTL: ttl, Role: role, BrokerURL: url})
				if err != nil {
					return err
				}
				if a.json {
					return a.printJSON(inv)
				}
				fmt.Fprintf(a.out(), "%s\n\ninvite %s for mesh %s: role %s, %d use(s), expires %s, broker %s\n",
					inv.Link, inv.ID, m.Slug, inv.Role, inv.MaxUses, shortTime(inv.ExpiresAt), url)
				fmt.Fprintln(a.out(), "The link carries the mesh root key: share it only with the invitee.")
				return nil
			})
		},
	}
	create.Flags().StringVar(&mesh, "mesh", "", "mesh slug or id (required)")
	create.Flags().StringVar(&keyFile, "owner-key", "", "the mesh's owner key file (default: <user config dir>/claudemesh/owner-keys/<slug>.json)")
	create.Flags().IntVar(&uses, "uses", membership.DefaultInviteUses, "how many peers may join with it")
	create.Flags().StringVar(&expires, "expires", "24h", "validity: a Go duration (90m, 24h) or days (7d)")
	create.Flags().StringVar(&role, "role", "member", "role of those who join: member or admin")
	create.Flags().StringVar(&brokerURL, "broker-url", "", "WebSocket URL peers connect to (default: ws://localhost:$BROKER_PORT/ws)")
	addJSONFlag(create, &createJSON)
	_ = create.MarkFlagRequired("mesh")

	var ref string
	var revokeJSON bool
	revoke := &cobra.Command{
		Use:   "revoke",
		Short: "Revoke an invite (by its token, link or id)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAdmin(cmd, revokeJSON, func(ctx context.Context, a *admin) error {
				inv, err := a.svc.RevokeInvite(ctx, ref)
				if err != nil {
					return err
				}
				if a.json {
					return a.printJSON(inv)
				}
				fmt.Fprintf(a.out(), "invite %s revoked (used %d of %d)\n", inv.ID, inv.UsedCount, inv.MaxUses)
				return nil
			})
		},
	}
	revoke.Flags().StringVar(&ref, "token", "", "the invite's token, ic://join/ link or id (required)")
	addJSONFlag(revoke, &revokeJSON)
	_ = revoke.MarkFlagRequired("token")
	cmd.AddCommand(create, revoke)
	return cmd
}

// parseTTL reads a Go duration or a whole number of days ("7d").
func parseTTL(s string) (time.Duration, error) {
	if d, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(d)
		if err != nil || n < 1 {
			return 0, fmt.Errorf("%q: want a whole number of days like 7d", s)
		}
		// Past it the product wraps: 200000d came out negative, 300000d as about 236 years.
		if int64(n) > math.MaxInt64/int64(24*time.Hour) {
			return 0, fmt.Errorf("%q: at most %dd", s, math.MaxInt64/int64(24*time.Hour))
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("%q: want a duration like 90m or 24h, or days like 7d", s)
	}
	if d < time.Second {
		return 0, fmt.Errorf("%q: must be at least 1s", s)
	}
	return d, nil
}

func newMemberCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "member", Short: "Add, list and revoke members"}

	var mesh, pubkey, name, role string
	var addJSON bool
	add := &cobra.Command{
		Use:   "add",
		Short: "Add a member directly, without an invite (also readmits a revoked key); prints the member id",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAdmin(cmd, addJSON, func(ctx context.Context, a *admin) error {
				m, err := a.svc.AddMember(ctx, membership.AddMemberParams{Mesh: mesh, Pubkey: pubkey, DisplayName: name, Role: role})
				if err != nil {
					return err
				}
				if a.json {
					return a.printJSON(m)
				}
				fmt.Fprintln(a.out(), m.ID)
				return nil
			})
		},
	}
	add.Flags().StringVar(&mesh, "mesh", "", "mesh slug or id (required)")
	add.Flags().StringVar(&pubkey, "pubkey", "", "the member's ed25519 public key, 64 hex characters (required)")
	add.Flags().StringVar(&name, "name", "", "display name (required)")
	add.Flags().StringVar(&role, "role", "member", "member or admin")
	addJSONFlag(add, &addJSON)
	for _, f := range []string{"mesh", "pubkey", "name"} {
		_ = add.MarkFlagRequired(f)
	}

	var listMesh string
	var listJSON bool
	list := &cobra.Command{
		Use:   "list",
		Short: "List a mesh's members, revoked ones included",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAdmin(cmd, listJSON, func(ctx context.Context, a *admin) error {
				members, err := a.svc.Members(ctx, listMesh)
				if err != nil {
					return err
				}
				if a.json {
					return a.printJSON(members)
				}
				rows := make([]string, len(members))
				for i, m := range members {
					state := "live"
					if m.RevokedAt != nil {
						state = "revoked " + shortTime(*m.RevokedAt)
					}
					via := "operator"
					if m.InviteID != "" {
						via = "invite " + m.InviteID
					}
					rows[i] = strings.Join([]string{m.ID, client.Printable(orDash(m.DisplayName), false), m.Role, m.Pubkey, state, shortTime(m.CreatedAt), via}, "\t")
				}
				return a.table("ID\tNAME\tROLE\tPUBKEY\tSTATE\tADDED\tVIA", rows)
			})
		},
	}
	list.Flags().StringVar(&listMesh, "mesh", "", "mesh slug or id (required)")
	addJSONFlag(list, &listJSON)
	_ = list.MarkFlagRequired("mesh")

	var revMesh, revPubkey string
	var revokeJSON bool
	revoke := &cobra.Command{
		Use:   "revoke",
		Short: "Revoke a member; its sessions are closed and later hellos are refused",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAdmin(cmd, revokeJSON, func(ctx context.Context, a *admin) error {
				m, err := a.svc.RevokeMember(ctx, revMesh, revPubkey)
				if err != nil {
					return err
				}
				if a.json {
					return a.printJSON(m)
				}
				fmt.Fprintf(a.out(), "member %s (%s) revoked\n", m.ID, client.Printable(orDash(m.DisplayName), false))
				return nil
			})
		},
	}
	revoke.Flags().StringVar(&revMesh, "mesh", "", "mesh slug or id (required)")
	revoke.Flags().StringVar(&revPubkey, "pubkey", "", "the member's public key (required)")
	addJSONFlag(revoke, &revokeJSON)
	_ = revoke.MarkFlagRequired("mesh")
	_ = revoke.MarkFlagRequired("pubkey")

	cmd.AddCommand(add, list, revoke)
	return cmd
}

// parseAnchor reads an --anchor value, SEQ:HASH as an `audit anchor` log line gives them.
func parseAnchor(meshID, v string) (audit.Anchor, error) {
	seq, hash, ok := strings.Cut(v, ":")
	n, err := strconv.ParseInt(seq, 10, 64)
	_, herr := hex.DecodeString(hash)
	if !ok || err != nil || n < 1 || len(hash) != 64 || herr != nil {
		return audit.Anchor{}, fmt.Errorf("--anchor %q: want SEQ:HASH, a positive entry number and a 64-digit hex hash", v)
	}
	return audit.Anchor{MeshID: meshID, Seq: n, Hash: strings.ToLower(hash)}, nil
}

// verifyResult is `audit verify --json`.
type verifyResult struct {
	MeshID  string `json:"meshId"`
	Slug    string `json:"slug"`
	Intact  bool   `json:"intact"`
	Entries int    `json:"entries"`
	// BrokenSeq and Reason name the first entry that does not verify.
	BrokenSeq *int64 `json:"brokenSeq,omitempty"`
	Reason    string `json:"reason,omitempty"`
}

func newAuditCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Verify and read a mesh's tamper-evident audit log"}

	var verifyMesh string
	var verifyAnchors []string
	var verifyJSON bool
	verify := &cobra.Command{
		Use:   "verify",
		Short: "Walk the mesh's hash chain: exit 0 when intact, 1 naming the first broken entry",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAdmin(cmd, verifyJSON, func(ctx context.Context, a *admin) error {
				m, err := a.svc.Mesh(ctx, verifyMesh)
				if err != nil {
					return err
				}
				anchors := make([]audit.Anchor, len(verifyAnchors))
				for i, v := range verifyAnchors {
					if anchors[i], err = parseAnchor(m.ID, v); err != nil {
						return err
					}
				}
				n, err := audit.VerifyAnchors(ctx, a.pool, m.ID, anchors)
				var broken *audit.BrokenError
				if err != nil && !errors.As(err, &broken) {
					return err
				}
				res := verifyResult{MeshID: m.ID, Slug: m.Slug, Intact: broken == nil, Entries: n}
				if broken != nil {
					res.BrokenSeq, res.Reason = &broken.Seq, broken.Reason
				}
				if a.json {
					if err := a.printJSON(res); err != nil {
						return err
					}
				} else if broken == nil {
					fmt.Fprintf(a.out(), "audit chain of mesh %s intact: %d entries\n", m.Slug, n)
				} else {
					fmt.Fprintf(a.out(), "audit chain of mesh %s BROKEN at entry %d: %s\n(%d entries before it verified)\n", m.Slug, broken.Seq, broken.Reason, n)
				}
				if broken != nil {
					return exitError{code: 1}
				}
				return nil
			})
		},
	}
	verify.Flags().StringVar(&verifyMesh, "mesh", "", "mesh slug or id (required)")
	verify.Flags().StringArrayVar(&verifyAnchors, "anchor", nil, "`SEQ:HASH` from an \"audit anchor\" log line of the mesh: the chain must still hold that entry unchanged (catches a cut or rewritten chain); repeat it for every anchor logged since the last check")
	addJSONFlag(verify, &verifyJSON)
	_ = verify.MarkFlagRequired("mesh")

	var tailMesh string
	var tailN int
	var tailJSON bool
	tail := &cobra.Command{
		Use:   "tail",
		Short: "Print the mesh's newest audit entries, oldest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAdmin(cmd, tailJSON, func(ctx context.Context, a *admin) error {
				m, err := a.svc.Mesh(ctx, tailMesh)
				if err != nil {
					return err
				}
				recs, err := audit.Tail(ctx, a.pool, m.ID, tailN)
				if err != nil {
					return err
				}
				if a.json {
					return a.printJSON(recs)
				}
				rows := make([]string, len(recs))
				// Every cell through client.Printable: data holds text peers chose (state keys,
				// names) and JSON leaves bidi overrides and C1 controls raw; a row may have been
				// edited by whoever the operator is investigating, so no length is assumed either.
				for i, r := range recs {
					actor := r.Actor
					if len(actor) == 64 { // a key: its prefix is enough to recognise it
						actor = actor[:12] + "…"
					}
					hash := r.Hash
					if len(hash) > 12 {
						hash = hash[:12]
					}
					data := r.Data
					if c, err := audit.CanonicalJSON(r.Data); err == nil { // compact, keys sorted
						data = c
					}
					rows[i] = strings.Join([]string{strconv.FormatInt(r.Seq, 10), r.At.Local().Format("2006-01-02 15:04:05.000"),
						client.Printable(r.Type, false), client.Printable(orDash(actor), false),
						client.Printable(string(data), false), client.Printable(hash, false)}, "\t")
				}
				return a.table("SEQ\tTIME\tEVENT\tACTOR\tDATA\tHASH", rows)
			})
		},
	}
	tail.Flags().StringVar(&tailMesh, "mesh", "", "mesh slug or id (required)")
	tail.Flags().IntVarP(&tailN, "lines", "n", 20, "how many entries")
	addJSONFlag(tail, &tailJSON)
	_ = tail.MarkFlagRequired("mesh")

	cmd.AddCommand(verify, tail)
	return cmd
}
