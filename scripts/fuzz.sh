#!/usr/bin/env bash
# Coverage-guided fuzzing of what clients control (protocol messages, the
# startup packet and SCRAM/md5 answers, SQL text through the router) with
# libFuzzer, on the stable toolchain: coverage instrumentation comes from
# rustc's stable codegen options (LLVM's sancov pass), not from -Z flags.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each target (default: all three) for SECONDS (default 60), starting
# from the committed seeds in fuzz/corpus/<target> (real driver traffic and
# statements); new inputs go to fuzz/target/work/<target>, anything that
# crashes to fuzz/target/crash-<target>-*. Exits non-zero on a crash.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(client_messages login route)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks --cfg fuzzing"
# With an explicit --target, RUSTFLAGS reach the fuzzed code but not build
# scripts and proc macros (which would not link against libFuzzer).
triple="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --release --bins --target "$triple"
for t in "${targets[@]}"; do
  mkdir -p "target/work/$t"
  echo "== fuzzing $t for ${seconds}s"
  "target/$triple/release/$t" -max_total_time="$seconds" -max_len=65536 -timeout=10 \
    -artifact_prefix="target/crash-$t-" "target/work/$t" "corpus/$t"
done
