// The upstream claudemesh CLI's own client code, re-exported for cli-compat.mjs. Nothing of
// upstream's lives in this repository: "~/" resolves to <upstream>/apps/cli/src through the
// tsconfig the Go test writes at run time (its baseUrl is $CLAUDEMESH_UPSTREAM_DIR/apps/cli).
export { DaemonBrokerClient } from "~/daemon/broker.js";
export { SessionBrokerClient } from "~/daemon/session-broker.js";
export { computeRequestFingerprint } from "~/daemon/fingerprint.js";
export { BrokerClient } from "~/services/broker/ws-client.js";
export { signParentAttestation } from "~/services/broker/session-hello-sig.js";
export { generateKeypair, encryptDirect, decryptDirect } from "~/services/crypto/facade.js";
