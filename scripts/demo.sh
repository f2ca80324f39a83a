#!/usr/bin/env bash
# Runs `shardline demo` on a fresh Debian machine: installs the Postgres
# binaries if they are missing (scripts/setup-debian.sh --demo), builds
# Shardline, and starts two local shards, each a primary and two streaming
# replicas, with the proxy in front (arguments go to `shardline demo`, e.g.
# --port 6543). Ctrl-C stops and removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh --demo
exec cargo run --release --bin shardline -- demo "$@"
