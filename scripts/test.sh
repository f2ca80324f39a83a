#!/usr/bin/env bash
# Runs every test on a fresh Debian machine, installing what they need first
# (scripts/setup-debian.sh --with-docker: Postgres, the drivers, a Docker
# engine):
#
#   1. the process tier: `cargo nextest run --workspace --features
#      shardline-tests/containers` (unit tests, and the integration tests
#      against local Postgres processes; each test in a process of its own,
#      .config/nextest.toml);
#   2. the container tier: `cargo test` of the same features with `--test
#      containers -- --ignored` (the project's images, built here, the
#      compose cluster, faults only containers can make). Its tests are
#      built by step 1, with the same features (one build for both tiers),
#      and listed there as skipped (ignored).
#
# SHARDLINE_CONTAINERS=0 skips the container tier (e.g. where no Docker
# engine can run); it is reported as skipped, never as passed.
set -euo pipefail
cd "$(dirname "$0")/.."

containers="${SHARDLINE_CONTAINERS:-1}"
if [ "$containers" = 0 ]; then
  scripts/setup-debian.sh
else
  scripts/setup-debian.sh --with-docker
fi
echo "== $(cargo --version); postgres binaries: $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1)"

# A one-off build (CI's clean clone) gains nothing from incremental state,
# which is a large part of the build's disk use.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
fi
# Both tiers build with the container tier's feature, so they share one
# build (it changes tokio's features, and so every crate's build).
features=(--features shardline-tests/containers)
start=$SECONDS
cargo nextest run --workspace "${features[@]}"
echo "== process tier passed in $((SECONDS - start)) s; the build uses $(du -sh target 2>/dev/null | cut -f1) of disk"

if [ "$containers" = 0 ]; then
  echo "== container tier SKIPPED (SHARDLINE_CONTAINERS=0)"
  exit 0
fi
start=$SECONDS
cargo test --workspace "${features[@]}" --test containers -- --ignored --nocapture
echo "== container tier passed in $((SECONDS - start)) s"
