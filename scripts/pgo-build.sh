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
# An older one (Debian's default `llvm-profdata` is LLVM 14) cannot read
# the profiles of rustc's LLVM: said now, not after the instrumented build.
major=$("$profdata" merge --version 2>/dev/null | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p' | head -1)
if [ -n "$major" ] && [ "$major" -lt 19 ]; then
    echo "$profdata is LLVM $major, too old for rustc's profiles: apt-get install llvm-19 (or set LLVM_PROFDATA)" >&2
    exit 1
fi

echo "== instrumented build (target/pgo-generate)"
# Build scripts are instrumented too; their counts go to a directory of
# their own, never merged. (A path that does not change between runs: the
# flags are part of what cargo compares to decide what to rebuild.)
RUSTFLAGS="-Cprofile-generate=$root/target/pgo-generate/build-scripts" \
    cargo build --release --bin shardline --target-dir target/pgo-generate
bin=$root/target/pgo-generate/release/shardline

echo "== workload"
source scripts/lib/workload.sh
# The proxies' counts (the demo's, started meanwhile, go with the build
# scripts').
export LLVM_PROFILE_FILE=$work/counts/shardline-%m.profraw

# The instrumented proxy: it writes its counts when it stops.
launch() {
    exec "$bin" --config "$1"
}

run_workloads
# (The demo, still running, has written no counts: only the two proxies'
# are merged.)
"$profdata" merge -o "$work/shardline.profdata" "$work"/counts/*.profraw

echo "== optimized build (target/pgo)"
# Named by its content: cargo rebuilds when the flags change, not when a
# file they name does, so a new profile gets a new name.
mkdir -p target/pgo
profile_file=$root/target/pgo/shardline-$(sha256sum "$work/shardline.profdata" | cut -c1-16).profdata
cp "$work/shardline.profdata" "$profile_file"
RUSTFLAGS="-Cprofile-use=$profile_file" \
    cargo build --release --bin shardline --target-dir target/pgo
echo "built target/pgo/release/shardline"
