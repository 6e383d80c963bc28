// cli-compat.mjs drives the upstream claudemesh CLI's (1.37, commit 213a6b3) own client classes
// against a running 3-replica broker: the daemon's DaemonBrokerClient, a launched session's
// SessionBrokerClient, the cold-path BrokerClient, and the CLI's crypto helpers. It is bundled
// by esbuild together with entry.ts (which points into the upstream checkout); the Go test
// upstreamcli_test.go builds and runs it. Each scenario prints one JSON line
// {"scenario","pass","ms","detail"|"error"}; the exit code is non-zero if any failed.
//
// Input, as JSON on stdin:
//   {"urls": [3 × "ws://host:port/ws"], "meshId", "meshSlug",
//    "members": [{"name","memberId","pubkey","secretKey","admin"}]}  (two members, one admin)
//
// The clients are used as they are. What they don't surface is observed alongside them: close
// codes through their own log hook, and each socket's hello_ack and send acks through a tap on
// the ws library they share (it records ids and flags only: no keys, nonces or ciphertexts).

import { readFileSync } from "node:fs";
import WebSocket from "ws";
import {
  BrokerClient,
  DaemonBrokerClient,
  SessionBrokerClient,
  computeRequestFingerprint,
  decryptDirect,
  encryptDirect,
  generateKeypair,
  signParentAttestation,
} from "./entry.ts";

const cfg = JSON.parse(readFileSync(0, "utf8"));
const [alice, bob] = (cfg.members ?? []).filter((m) => !m.admin);
const admin = (cfg.members ?? []).find((m) => m.admin);
if (cfg.urls?.length !== 3 || !alice || !bob || !admin) {
  console.error("cli-compat: need 3 urls, two members and an admin on stdin");
  process.exit(2);
}

// The whole run has a deadline of its own, so a hang reports where it hung.
const started = Date.now();
setTimeout(() => {
  line({ scenario: "deadline", pass: false, error: `still running after ${cfg.deadlineMs ?? 150000} ms`, events: events.slice(-40) });
  process.exit(3);
}, cfg.deadlineMs ?? 150000).unref();

// ---- observation --------------------------------------------------------------------------

const helloAcks = new WeakMap(); // socket -> {presenceId, resumed}
const sendAcks = []; // {id, messageId, duplicate, error}
const wsEmit = WebSocket.prototype.emit;
WebSocket.prototype.emit = function (event, ...args) {
  if (event === "message") {
    try {
      const m = JSON.parse(String(args[0]));
      if (m.type === "hello_ack") helloAcks.set(this, { presenceId: m.presenceId, resumed: m.resumed === true });
      if (m.type === "ack") sendAcks.push({ id: m.id, messageId: m.messageId, duplicate: m.duplicate === true, error: m.error });
    } catch { /* not JSON: not ours to judge */ }
  }
  return wsEmit.call(this, event, ...args);
};

// events: every client's log lines and status changes, tagged with the client's name.
const events = [];
const logFor = (who) => (level, msg, meta = {}) => {
  const { code, reason, err, message, wait_ms } = meta;
  events.push({ who, msg, code, reason, err, message, wait_ms, t: Date.now() - started });
};
const statusFor = (who) => (s) => events.push({ who, msg: "status", status: s, t: Date.now() - started });
const eventsOf = (who, pred = () => true) => events.filter((e) => e.who === who && pred(e));
const closesOf = (who) => eventsOf(who, (e) => e.msg.endsWith("ws_closed"));

function line(o) {
  process.stdout.write(JSON.stringify(o) + "\n");
}

async function waitFor(what, pred, ms = 10000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function check(cond, what, got) {
  if (!cond) throw new Error(`${what}${got === undefined ? "" : `: got ${JSON.stringify(got)}`}`);
}

const short = (hex) => (hex ? hex.slice(0, 12) : hex);

// ---- the CLI's pieces, wired as its daemon wires them ---------------------------------------

const joined = (m, url) => ({
  meshId: cfg.meshId, memberId: m.memberId, slug: cfg.meshSlug ?? "compat", name: cfg.meshSlug ?? "compat",
  pubkey: m.pubkey, secretKey: m.secretKey, brokerUrl: url, joinedAt: new Date().toISOString(),
});

const presenceOf = (c) => helloAcks.get(c.lifecycle?.ws ?? c.ws);

async function openDaemon(who, member, url) {
  const client = new DaemonBrokerClient(joined(member, url), { log: logFor(who), onStatusChange: statusFor(who) });
  await client.connect();
  return { who, client, member };
}

let pids = 4100;

// openSession is the daemon's per-session socket (daemon/run.ts): session_hello with a parent
// attestation, and every push decrypted with the session key and acked (client_ack), except
// those whose client_message_id is in noAck.
async function openSession(who, member, url, { keys, sessionId, noAck = new Set() } = {}) {
  const kp = keys ?? (await generateKeypair());
  const parentAttestation = await signParentAttestation({
    parentMemberPubkey: member.pubkey, parentSecretKey: member.secretKey, sessionPubkey: kp.publicKey,
  });
  const s = { who, member, kp, url, sessionId: sessionId ?? crypto.randomUUID(), inbox: [], noAck, cwd: `/work/${who}` };
  s.client = new SessionBrokerClient({
    mesh: joined(member, url), sessionPubkey: kp.publicKey, sessionSecretKey: kp.secretKey, parentAttestation,
    sessionId: s.sessionId, displayName: member.name, cwd: s.cwd, pid: ++pids,
    log: logFor(who), onStatusChange: statusFor(who),
    onPush: async (m) => {
      const body = await decryptDirect({ nonce: m.nonce, ciphertext: m.ciphertext }, m.senderPubkey, kp.secretKey);
      s.inbox.push({ messageId: m.messageId, cmid: m.client_message_id, sender: m.senderPubkey, body });
      if (!s.noAck.has(m.client_message_id)) s.client.sendClientAck(m.client_message_id ?? m.messageId, m.messageId);
    },
  });
  await s.client.connect();
  return s;
}

// dm sends text from session `from` to session `to` as the daemon's drain does: encrypted with
// the session key, the client_message_id reused on every retry, the request fingerprint
// computed as in daemon/ipc/handlers/send.ts.
async function dm(from, to, text, cmid) {
  const env = await encryptDirect(text, to.kp.publicKey, from.kp.secretKey);
  const fp = computeRequestFingerprint({
    envelope_version: 1, destination_kind: "dm", destination_ref: to.kp.publicKey, priority: "now",
    body: Buffer.from(text, "utf8"),
  }).toString("hex");
  return from.client.send({
    targetSpec: to.kp.publicKey, priority: "now", nonce: env.nonce, ciphertext: env.ciphertext,
    client_message_id: cmid, request_fingerprint_hex: fp,
  });
}

// received matches on the push's client_message_id: finding a DM here is also the echo check.
const received = (s, cmid) => s.inbox.filter((m) => m.cmid === cmid);

// ---- scenarios ----------------------------------------------------------------------------

const st = {}; // what the scenarios share
const results = [];

async function scenario(name, fn) {
  const t0 = Date.now();
  if (results.some((r) => !r.pass)) {
    line({ scenario: name, pass: false, error: "not run: an earlier scenario failed" });
    results.push({ name, pass: false });
    return;
  }
  try {
    const detail = await fn();
    line({ scenario: name, pass: true, ms: Date.now() - t0, detail });
    results.push({ name, pass: true });
  } catch (e) {
    line({ scenario: name, pass: false, ms: Date.now() - t0, error: String(e?.message ?? e), events: events.slice(-30) });
    results.push({ name, pass: false });
  }
}

await scenario("daemon hello and session_hello", async () => {
  st.dA = await openDaemon("daemonA", alice, cfg.urls[0]);
  st.dB = await openDaemon("daemonB", bob, cfg.urls[1]);
  st.sA = await openSession("sessionA", alice, cfg.urls[1]);
  st.sB = await openSession("sessionB", bob, cfg.urls[2], { noAck: new Set(["redeliver-1"]) });
  const all = [st.dA, st.dB, st.sA, st.sB];
  for (const c of all) check(presenceOf(c.client)?.presenceId, `${c.who}: hello_ack with a presenceId`, presenceOf(c.client));
  return Object.fromEntries(all.map((c) => [c.who, { replica: cfg.urls.indexOf(c.client.lifecycle.ws.url), presence: presenceOf(c.client).presenceId }]));
});

await scenario("session to session DM across replicas", async () => {
  const r = await dm(st.sA, st.sB, "hello from A", "dm-1");
  check(r.ok, "send acked", r);
  const m = await waitFor("B's push", () => received(st.sB, "dm-1")[0]);
  check(m.body === "hello from A", "B decrypts the DM", m.body);
  check(m.messageId === r.messageId, "the push carries the acked messageId", [m.messageId, r.messageId]);
  check(m.sender === st.sA.kp.publicKey, "senderPubkey is A's session key", short(m.sender));
  return { messageId: r.messageId, client_message_id: m.cmid, from: "replica 1", to: "replica 2" };
});

await scenario("list_peers fields", async () => {
  const peers = await st.dA.client.listPeers();
  const row = (pred, what) => {
    const rows = peers.filter(pred);
    check(rows.length === 1, `one row for ${what}`, rows.length);
    return rows[0];
  };
  for (const s of [st.sA, st.sB]) {
    const p = row((p) => p.pubkey === s.kp.publicKey, s.who);
    check(p.memberPubkey === s.member.pubkey, `${s.who}: memberPubkey`, short(p.memberPubkey));
    check(p.peerRole === "session", `${s.who}: peerRole`, p.peerRole);
    check(p.cwd === s.cwd, `${s.who}: cwd`, p.cwd);
    check(p.channel === "claudemesh-session", `${s.who}: channel`, p.channel);
    check(p.sessionId === s.sessionId, `${s.who}: sessionId`, p.sessionId);
    check(p.displayName === s.member.name, `${s.who}: displayName`, p.displayName);
  }
  for (const d of [st.dA, st.dB]) {
    const p = row((p) => p.pubkey === d.member.pubkey, d.who);
    check(p.memberPubkey === d.member.pubkey, `${d.who}: memberPubkey`, short(p.memberPubkey));
    check(p.peerRole === "control-plane", `${d.who}: peerRole`, p.peerRole);
    check(p.channel === "claudemesh-daemon", `${d.who}: channel`, p.channel);
    check(p.cwd === process.cwd(), `${d.who}: cwd`, p.cwd);
    check(p.sessionId === `daemon-${process.pid}`, `${d.who}: sessionId`, p.sessionId);
  }
  check(peers.length === 4, "4 rows (2 daemons, 2 sessions)", peers.length);
  return { rows: peers.map((p) => ({ displayName: p.displayName, peerRole: p.peerRole, channel: p.channel, sessionId: p.sessionId })) };
});

await scenario("retried send delivered once", async () => {
  const first = await dm(st.sA, st.sB, "retried", "retry-1");
  const again = await dm(st.sA, st.sB, "retried", "retry-1");
  check(first.ok && again.ok, "both attempts acked", [first, again]);
  check(again.messageId === first.messageId, "the retry is acked with the first messageId", [first.messageId, again.messageId]);
  // The daemon's retry after a reconnect: a new socket for the same session, on another replica.
  await st.sA.client.close();
  st.sA = await openSession("sessionA-reconnected", alice, cfg.urls[0], { keys: st.sA.kp, sessionId: st.sA.sessionId });
  const third = await dm(st.sA, st.sB, "retried", "retry-1");
  check(third.ok && third.messageId === first.messageId, "the retry after a reconnect is acked with the first messageId", third);
  // Pushes to one recipient follow commit order: once the probe is in, nothing else is coming.
  const probe = await dm(st.sA, st.sB, "probe", "probe-1");
  check(probe.ok, "probe acked", probe);
  await waitFor("the probe at B", () => received(st.sB, "probe-1").length);
  const got = received(st.sB, "retry-1");
  check(got.length === 1, "B got the retried message once", got.length);
  const dups = sendAcks.filter((a) => a.id === "retry-1").map((a) => a.duplicate);
  return { messageId: first.messageId, acks: dups.map((d) => ({ duplicate: d })), deliveries: got.length };
});

await scenario("redelivery after reconnect", async () => {
  const r = await dm(st.sA, st.sB, "ack me later", "redeliver-1");
  check(r.ok, "send acked", r);
  const first = await waitFor("B's first push", () => received(st.sB, "redeliver-1")[0]);
  check(first.messageId === r.messageId, "messageId", first.messageId);
  // Not acked (noAck). The daemon re-registering a session closes its socket and opens a new
  // one with the same session key (daemon/run.ts); here on another replica.
  const old = st.sB;
  await old.client.close();
  st.sB = await openSession("sessionB-reconnected", bob, cfg.urls[1], { keys: old.kp, sessionId: old.sessionId });
  const again = await waitFor("the unacked push again", () => received(st.sB, "redeliver-1")[0]);
  check(again.messageId === first.messageId, "redelivered with the same messageId", [first.messageId, again.messageId]);
  check(again.body === "ack me later", "and it still decrypts", again.body);
  return { messageId: again.messageId, before: "replica 2", after: "replica 1" };
});

await scenario("reattach by session key", async () => {
  const old = st.sB;
  const before = presenceOf(old.client).presenceId;
  // Same key, new sessionId (a relaunch with --resume), while the old socket is still up.
  st.sB = await openSession("sessionB-reattached", bob, cfg.urls[0], { keys: old.kp, sessionId: crypto.randomUUID() });
  const ack = presenceOf(st.sB.client);
  check(ack.presenceId === before, "the same presence", [before, ack.presenceId]);
  const closed = await waitFor("the old socket closed", () => closesOf(old.who)[0]);
  check(closed.code === 1000, "the old socket is closed as replaced (1000)", closed);
  // The 1.37 daemon closes its own replaced client; otherwise both would take the key in turns.
  await old.client.close();
  const peers = await st.dA.client.listPeers();
  const rows = peers.filter((p) => p.pubkey === old.kp.publicKey);
  check(rows.length === 1, "one row for the session key", rows.map((p) => p.sessionId));
  check(rows[0].sessionId === st.sB.sessionId, "with the new sessionId", rows[0].sessionId);
  check(rows[0].peerRole === "session", "peerRole", rows[0].peerRole);
  const r = await dm(st.sA, st.sB, "after reattach", "reattach-1");
  check(r.ok, "send acked", r);
  await waitFor("a DM on the reattached session", () => received(st.sB, "reattach-1").length);
  return { presence: ack.presenceId, resumed: ack.resumed, oldSocketClosed: { code: closed.code, reason: closed.reason } };
});

await scenario("kick and ban", async () => {
  process.env.CLAUDEMESH_SESSION_ID = `cold-cli-${process.pid}`; // the cold client's sessionId
  st.cold = new BrokerClient(joined(admin, cfg.urls[2]), { quiet: true });
  await st.cold.connect();
  const mark = Date.now() - started;
  const after = (who, pred) => eventsOf(who, (e) => e.t >= mark && pred(e));

  // kick by display name: alice's session closes with 4001; her daemon is skipped.
  const kick = await st.cold.sendAndWait({ type: "kick", target: alice.name });
  check(kick.type === "kick_ack", "kick_ack", kick);
  check(kick.kicked?.includes(alice.name), "kicked lists alice", kick.kicked);
  check(kick.skipped_control_plane?.includes(alice.name), "skipped_control_plane lists alice's daemon", kick.skipped_control_plane);
  const kicked = await waitFor("session A closed", () => after(st.sA.who, (e) => e.msg.endsWith("ws_closed"))[0]);
  check(kicked.code === 4001, "kick closes with 4001", kicked);
  // 1.37 sessions reconnect on every close code: the kicked session comes back on its own.
  await waitFor("session A back", () => after(st.sA.who, (e) => e.status === "open" && e.t > kicked.t).length);
  check(after("daemonA", (e) => e.msg.endsWith("ws_closed")).length === 0, "alice's daemon stayed", after("daemonA", () => true));

  // ban: bob's session and daemon close with 4002; his reconnects are refused as revoked.
  const ban = await st.cold.sendAndWait({ type: "ban", target: bob.name });
  check(ban.type === "ban_ack" && ban.banned === bob.name, "ban_ack names bob", ban);
  const banned = await waitFor("session B closed", () => after(st.sB.who, (e) => e.msg.endsWith("ws_closed"))[0]);
  check(banned.code === 4002, "ban closes the session with 4002", banned);
  const dBanned = await waitFor("daemon B closed", () => after("daemonB", (e) => e.msg.endsWith("ws_closed"))[0]);
  check(dBanned.code === 4002, "ban closes the daemon with 4002", dBanned);
  const refused = await waitFor("B's reconnect refused", () => after(st.sB.who, (e) => e.msg.endsWith("broker_error") && e.t > banned.t)[0]);
  check(refused.code === "revoked", "refused as revoked", refused);
  const bans = await st.cold.sendAndWait({ type: "list_bans" });
  check(bans.type === "list_bans_result", "list_bans_result", bans.type);
  const entry = (bans.bans ?? []).find((b) => b.pubkey === bob.pubkey);
  check(entry?.name === bob.name && entry.revokedAt, "list_bans shows bob", bans.bans);

  // unban: a new session of bob's connects, and the refused ones come back on their own.
  const unban = await st.cold.sendAndWait({ type: "unban", target: bob.name });
  check(unban.type === "unban_ack" && unban.unbanned === bob.name, "unban_ack names bob", unban);
  const fresh = await openSession("sessionB-fresh", bob, cfg.urls[2]);
  await fresh.client.close();
  // Both were closed by the ban (seen above) and retry with backoff (1, 2, 4, … s).
  await waitFor("session B back", () => st.sB.client.status === "open", 40000);
  await waitFor("daemon B back", () => st.dB.client.status === "open", 40000);
  const empty = await st.cold.sendAndWait({ type: "list_bans" });
  check((empty.bans ?? []).length === 0, "no bans left", empty.bans);
  const r = await dm(st.sA, st.sB, "welcome back", "unban-1");
  check(r.ok, "a DM to bob's session after the unban", r);
  await waitFor("the DM", () => received(st.sB, "unban-1").length);
  return {
    kick: { kicked: kick.kicked, skipped_control_plane: kick.skipped_control_plane, close: kicked.code, reason: kicked.reason },
    ban: { banned: ban.banned, session: banned.code, daemon: dBanned.code, refusedWith: refused.code },
    list_bans: (bans.bans ?? []).map((b) => b.name), unbanned: unban.unbanned,
  };
});

for (const c of [st.cold, st.sA?.client, st.sB?.client, st.dA?.client, st.dB?.client]) {
  try { await c?.close(); } catch { /* closing anyway */ }
}
const failed = results.filter((r) => !r.pass).map((r) => r.name);
const closes = events.filter((e) => e.msg.endsWith("ws_closed")).map(({ who, code, reason }) => `${who}:${code}:${reason}`);
line({ summary: { scenarios: results.length, failed, closes } });
process.exit(failed.length ? 1 : 0);
