#!/usr/bin/env bash
# Builds the release `shardline` binary with profile-guided optimization:
# target/pgo/release/shardline.
#
#   scripts/pgo-build.sh
#
# A build instrumented to count what runs is driven by the same workload
# as scripts/hot-code.sh (scripts/lib/workload.sh: `shardline demo`'s
# servers, a sharded config with replicas and a one-shard config, pgbench
# in every protocol mode, the console, a metrics scrape); the counts then
# guide the release build: the code a proxy runs is laid out together and
# the code it does not run moved aside, so a transaction's code is fewer
# cache lines (the benchmark section of the README has the figures). The
# binary behaves as `cargo build --release` builds it; only its speed
# differs. Needs what hot-code.sh needs except valgrind, plus an
# `llvm-profdata` that reads the profiles of rustc's LLVM (`rustc -vV`
# names it): Debian bookworm's `llvm-19` package reads those of rustc
# 1.95's LLVM 22. Set LLVM_PROFDATA to choose one. Takes about 15 minutes
# on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

profdata=${LLVM_PROFDATA:-}
if [ -z "$profdata" ]; then
    sysroot_tool=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1 || true)
    for candidate in "$sysroot_tool" llvm-profdata-22 llvm-profdata-21 llvm-profdata-20 llvm-profdata-19 llvm-profdata; do
        if [ -n "$candidate" ] && command -v "$candidate" >/dev/null; then
            profdata=$candidate
            break
        fi
    done
fi
if [ -z "$profdata" ]; then
    echo "no llvm-profdata found: apt-get install llvm-19 (or set LLVM_PROFDATA)" >&2
    exit 1
fi

work=$(mktemp -d /tmp/shardline-pgo.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== instrumented build (target/pgo-generate)"
# Build scripts are instrumented too; their counts go to a directory of
# their own, never merged.
RUSTFLAGS="-Cprofile-generate=$work/build-scripts" \
    cargo build --release --bin shardline --target-dir target/pgo-generate
bin=$root/target/pgo-generate/release/shardline
export LLVM_PROFILE_FILE=$work/counts/shardline-%m.profraw

echo "== workload"
source scripts/lib/workload.sh

# Runs the instrumented proxy on config $1 (its file), then the workload
# function $2 against it; the proxy writes its counts when it stops.
profile() {
    local config=$1 workload=$2 port mport
    port=$(free_port)
    mport=$(free_port)
    sed -i -e "s/@PORT@/$port/" -e "s/@MPORT@/$mport/" "$config"
    "$bin" --config "$config" >"$work/$(basename "$config" .toml).log" 2>&1 &
    local proxy=$!
    wait_port "$port"
    "$workload" "$port" "$mport"
    kill -INT "$proxy"
    wait "$proxy" || true
}

run_workloads
# (The demo, still running, has written no counts: only the two proxies'
# are merged.)
"$profdata" merge -o "$work/shardline.profdata" "$work"/counts/*.profraw

echo "== optimized build (target/pgo)"
mkdir -p target/pgo
cp "$work/shardline.profdata" target/pgo/shardline.profdata
RUSTFLAGS="-Cprofile-use=$root/target/pgo/shardline.profdata" \
    cargo build --release --bin shardline --target-dir target/pgo
echo "built target/pgo/release/shardline"
