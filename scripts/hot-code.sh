#!/usr/bin/env bash
# Writes proxy/hot-code.txt: the functions a proxy runs, hottest first, which
# the release link places together at the start of the code (proxy/build.rs).
#
#   scripts/hot-code.sh
#
# Runs `shardline demo` for its servers, then a release build of the proxy
# under callgrind on two configs over them (the demo's two shards with
# replicas, sharding, the result cache and metrics; one shard without
# sharding), each driven by pgbench (simple, extended, prepared; reads,
# writes, keyless and merged reads, two-phase commits), the admin console
# and a metrics scrape; then maps the executed instructions to functions
# (scripts/hot-code.py). Run it again when the list has gone stale:
# `shardline-bench` prints how many of the listed functions the binary
# still has. Needs valgrind, pgbench, psql and python3
# (scripts/setup-debian.sh installs them). Takes about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

cargo build --release --bin shardline
bin=$root/target/release/shardline
source scripts/lib/workload.sh

# The proxy under callgrind, its counts in the work directory by config.
launch() {
    exec valgrind --tool=callgrind --dump-instr=yes \
        --callgrind-out-file="$work/callgrind.$(basename "$1" .toml)" \
        "$bin" --config "$1"
}

run_workloads
python3 scripts/hot-code.py "$bin" proxy/hot-code.txt "$work/callgrind.single" "$work/callgrind.sharded"
