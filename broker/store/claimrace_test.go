package store_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/claudemesh/broker/broker/store"
	"github.com/claudemesh/broker/db/dbtest"
)

// A claim for one session of a member never takes a delivery that a change of status assigned
// to another of its sessions while the claim ran. Bob has two sessions: B idle, A at work. B's
// claim reads a pending "next" message X (its snapshot), A goes idle and its release assigns X
// to A (pushed from A's notification), and only then does B's claim lock X. Under READ
// COMMITTED the lock reads X's new version and checked only that it was still open, so B took
// it too: one messageId pushed to both sessions. It now takes a row only if it is still pending,
// or assigned to the session the claim is for (00066).
func TestClaimLeavesWhatAReleaseAssignedToAnotherSession(t *testing.T) {
	r := newClaimRace(t, "idle")
	_, err := r.pool.Exec(r.ctx, `UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL,
		pushed_at = NULL WHERE id = $1`, r.x)
	require.NoError(t, err)

	c := r.b
	c.IncludeHeld = true
	got := r.claimStoppedAtW(c, func() {
		r.idleA() // A's release assigns X to it, to be pushed from its notification
	})
	require.Equal(t, []int64{r.w}, got, "B gets W; X, pushed to A from its notification, is not pushed to B as well")
	require.Equal(t, "assigned "+r.a.PresenceID, r.state(r.x), "still A's")
}

// Nor does a claim give back to pending (for a session at work that may not take it) an
// assigned delivery that went to another session meanwhile. X, "next", assigned to B, could not
// be pushed (B's replica lists it to retake); B is at work. B's claim finds X held (pending again,
// to wait for B's idle), but before it locks X, X is given back to pending (here by hand: the
// replicas' own give-backs leave alone a row whose session is connected there) and A's release
// assigns it to A. The claim then put X back to pending under A's push: pushed again later, a
// duplicate. It now leaves a row assigned to another session alone (00066).
func TestClaimLeavesHeldRowsAssignedToAnotherSession(t *testing.T) {
	r := newClaimRace(t, "working")
	require.Equal(t, "assigned "+r.b.PresenceID, r.state(r.x))

	c := r.b
	c.Retake = []int64{r.x}
	got := r.claimStoppedAtW(c, func() {
		_, err := r.pool.Exec(r.ctx, `UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL,
			pushed_at = NULL WHERE id = $1`, r.x)
		require.NoError(t, err)
		r.idleA()
	})
	require.Equal(t, []int64{r.w}, got, "B, at work, gets W, a now message")
	require.Equal(t, "assigned "+r.a.PresenceID, r.state(r.x), "A's, pushed from its notification, not pending again")
}

// claimRace is bob with two sessions on node "here", B (in the status given) and A (working),
// and two deliveries: W, "now", for B's session only, pending; X, "next", for bob, as the send
// left it (assigned to B when B is idle).
type claimRace struct {
	t    *testing.T
	ctx  context.Context
	url  string
	pool *pgxpool.Pool
	st   *store.Store
	a, b store.ClaimFor
	w, x int64
}

func newClaimRace(t *testing.T, statusB string) *claimRace {
	r := &claimRace{t: t, ctx: dbtest.Context(t), url: dbtest.URL(t)}
	r.pool = dbtest.PoolFor(t, r.url)
	r.st = store.New(r.pool, "t")
	m := newClaimMesh(t, r.pool)
	r.b = m.recipient('b', "idle")
	r.a = r.b
	r.a.SessionID = "s-a"
	require.NoError(t, r.pool.QueryRow(r.ctx, `INSERT INTO claudemesh.presence (mesh_id, member_id, member_pubkey, node_id, session_id, status)
		VALUES ($1, $2, $3, 'here', $4, 'working') RETURNING id, epoch`, m.mesh, r.a.MemberID, claimKey('b'), r.a.SessionID).Scan(&r.a.PresenceID, &r.a.Epoch))
	w, x := m.envelope('b', "now"), m.envelope('b', "next")
	_, _, err := r.st.SendBatch(r.ctx, "here", []store.OutgoingEnvelope{w})
	require.NoError(t, err)
	_, _, err = r.st.SendBatch(r.ctx, "here", []store.OutgoingEnvelope{x})
	require.NoError(t, err)
	require.NoError(t, r.pool.QueryRow(r.ctx, `UPDATE claudemesh.delivery SET state = 'pending', pushed_node = NULL, pushed_presence = NULL,
		pushed_at = NULL, recipient_session_id = $2 WHERE envelope_id = $1 RETURNING id`, w.ID, r.b.SessionID).Scan(&r.w))
	require.NoError(t, r.pool.QueryRow(r.ctx, `SELECT id FROM claudemesh.delivery WHERE envelope_id = $1`, x.ID).Scan(&r.x))
	require.Less(t, r.w, r.x)
	_, err = r.pool.Exec(r.ctx, `UPDATE claudemesh.presence SET status = $2 WHERE id = $1`, r.b.PresenceID, statusB)
	require.NoError(t, err)
	return r
}

// claimStoppedAtW runs c's claim, stops it at its update of W (after its snapshot, before it
// locks X), runs between, lets the claim go on and returns the ids it took.
func (r *claimRace) claimStoppedAtW(c store.ClaimFor, between func()) []int64 {
	t := r.t
	_, err := r.pool.Exec(r.ctx, `CREATE FUNCTION public.stop_at_w() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF NEW.id = `+strconv.FormatInt(r.w, 10)+` AND NEW.state = 'pushed' THEN
				PERFORM pg_advisory_lock(4242);
				PERFORM pg_advisory_unlock(4242);
			END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER stop_at_w BEFORE UPDATE ON claudemesh.delivery FOR EACH ROW EXECUTE FUNCTION public.stop_at_w()`)
	require.NoError(t, err)
	gate := dbtest.ConnFor(t, r.url)
	_, err = gate.Exec(r.ctx, `SELECT pg_advisory_lock(4242)`)
	require.NoError(t, err)
	type result struct {
		rows []store.Claimed
		err  error
	}
	done := make(chan result, 1)
	go func() {
		c.Limit = 10
		rows, _, err := r.st.Claim(r.ctx, "here", []store.ClaimFor{c})
		done <- result{rows, err}
	}()
	require.Eventually(t, func() bool {
		return advisoryWaiters(r.ctx, r.pool) > 0
	}, 10*time.Second, 5*time.Millisecond, "the claim never reached W")
	between()
	_, err = gate.Exec(context.Background(), `SELECT pg_advisory_unlock(4242)`)
	require.NoError(t, err)
	var got result
	select {
	case got = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the claim did not finish")
	}
	require.NoError(t, got.err)
	ids := []int64{}
	for _, row := range got.rows {
		ids = append(ids, row.ID)
	}
	return ids
}

// idleA turns A idle, which releases what it held: X, assigned to it.
func (r *claimRace) idleA() {
	changed, err := r.st.SetStatus(r.ctx, r.a.PresenceID, "idle", "manual", time.Minute)
	require.NoError(r.t, err)
	require.True(r.t, changed)
	require.Equal(r.t, "assigned "+r.a.PresenceID, r.state(r.x), "released to A")
}

// state is a delivery's state and the presence it is assigned or pushed to.
func (r *claimRace) state(id int64) string {
	var s string
	require.NoError(r.t, r.pool.QueryRow(r.ctx, `SELECT state || coalesce(' ' || pushed_presence, '') FROM claudemesh.delivery WHERE id = $1`, id).Scan(&s))
	return s
}

// A send reads where its recipient's session is and assigns the row to it there. Bob's session
// is live on "here" when a send reads it; before the send commits, bob reconnects to "there"
// (his replica was killed, his presence not yet ended) and the hello moves his session. The
// send then left its row assigned to "here", where no one pushed it: it waited for the
// catch-up poll, seconds, and arrived after messages sent after it (the chaos test's order
// check). The hello now waits for such a send, and its release makes the row pending for the
// session's claim, which the hello says to run (00072).
func TestHelloMovingASessionWaitsForASendThatReadItsOldReplica(t *testing.T) {
	ctx, url := dbtest.Context(t), dbtest.URL(t)
	pool := dbtest.PoolFor(t, url)
	st := store.New(pool, "t")
	m := newClaimMesh(t, pool)
	bob := m.recipient('b', "idle")
	_, err := pool.Exec(ctx, `INSERT INTO claudemesh.node (id, heartbeat_at) VALUES ('there', now())`)
	require.NoError(t, err)
	env := m.envelope('b', "now")

	// The send stops at its delivery's insert: after it read bob's session on "here".
	_, err = pool.Exec(ctx, `CREATE FUNCTION public.stop_at_insert() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			PERFORM pg_advisory_lock(4243);
			PERFORM pg_advisory_unlock(4243);
			RETURN NEW;
		END $$;
		CREATE TRIGGER stop_at_insert BEFORE INSERT ON claudemesh.delivery FOR EACH ROW EXECUTE FUNCTION public.stop_at_insert()`)
	require.NoError(t, err)
	gate := dbtest.ConnFor(t, url)
	_, err = gate.Exec(ctx, `SELECT pg_advisory_lock(4243)`)
	require.NoError(t, err)
	sent := make(chan error, 1)
	go func() {
		_, _, err := st.SendBatch(ctx, "here", []store.OutgoingEnvelope{env})
		sent <- err
	}()
	dbtest.WaitFor(t, 10*time.Second, "the send at its insert", func() bool { return advisoryWaiters(ctx, pool) == 1 })

	type helloResult struct {
		res []store.HelloResult
		err error
	}
	helloed := make(chan helloResult, 1)
	go func() {
		res, err := st.Hellos(ctx, "there", 100, []store.HelloParams{{MeshID: m.mesh, MemberID: bob.MemberID,
			MemberPubkey: claimKey('b'), SessionID: bob.SessionID, Role: "control-plane", CWD: "/w",
			Signature: "sig-move", SignatureExpires: time.Now().Add(time.Minute)}})
		helloed <- helloResult{res, err}
	}()
	// Either the hello waits for the send (the fix) or it is done before the send commits.
	var h helloResult
	done := false
	dbtest.WaitFor(t, 10*time.Second, "the hello done or waiting", func() bool {
		select {
		case h = <-helloed:
			done = true
			return true
		default:
			return advisoryWaiters(ctx, pool) == 2
		}
	})
	_, err = gate.Exec(ctx, `SELECT pg_advisory_unlock(4243)`)
	require.NoError(t, err)
	require.NoError(t, <-sent)
	if !done {
		h = <-helloed
	}
	require.NoError(t, h.err)
	require.Len(t, h.res, 1)
	require.NoError(t, h.res[0].Err)
	require.Empty(t, h.res[0].Refusal)
	require.Equal(t, "here", h.res[0].Registration.OldNode, "moved from here")

	var state, node string
	require.NoError(t, pool.QueryRow(ctx, `SELECT state, coalesce(pushed_node, '') FROM claudemesh.delivery WHERE envelope_id = $1`,
		env.ID).Scan(&state, &node))
	require.Equal(t, "pending", state, "not left assigned to the replica the session left (%q)", node)
	require.True(t, h.res[0].Waiting, "the hello says to claim: the send's row waits for the session")
}

// advisoryWaiters counts the advisory-lock requests waiting in the test's own database (the
// cluster is shared with other tests' waits); -1 when it can't tell.
func advisoryWaiters(ctx context.Context, pool *pgxpool.Pool) int {
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
		AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&n); err != nil {
		return -1
	}
	return n
}
