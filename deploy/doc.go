// Package deploy holds the broker's deployment files (the container image's Dockerfile, the
// local three-replica compose stack with its HAProxy config, and the Fly.io app config) and the
// tests that validate them: they parse each file and check that the files agree with each other
// and with the broker's own configuration, without needing a Docker engine or a Fly account.
package deploy
