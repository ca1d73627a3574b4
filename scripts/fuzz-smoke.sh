#!/usr/bin/env bash
# Builds every fuzz target (fuzz/, a crate of its own) and runs each for a few seconds, so that
# the targets cannot rot unnoticed (DESIGN §7.1). scripts/test.sh runs this after the tests; a
# longer campaign is described in fuzz/README.md.
#
# Needs cargo-fuzz (scripts/install-deps.sh installs it) and a C++ compiler (libfuzzer-sys
# compiles libFuzzer). Builds with AddressSanitizer, cargo-fuzz's default, which stable rustc
# accepts only with RUSTC_BOOTSTRAP=1 (fuzz/README.md), in the dev profile (`--dev`): on the
# 2-core machine a cold build takes about 5 minutes instead of 11 for the optimized one, a
# rebuild after a change to the agent about 10 s instead of 70, and a few seconds of fuzzing
# need no speed. The instrumented build lives in fuzz/target/; each run starts from the seeds
# with a throw-away corpus, and a crash leaves its input in fuzz/artifacts/<target>/ and fails
# the script.
#
# FUZZ_SECONDS (default 5) sets the time per target.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-5}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: cargo-fuzz is missing; run scripts/install-deps.sh" >&2
  exit 1
fi
export RUSTC_BOOTSTRAP=1

corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT

# The seed directory of each target (read only; occtl_json reads the recorded occtl outputs).
seeds_of() {
  case "$1" in
    occtl_json) echo ../tests/fixtures/occtl ;;
    *) echo "seeds/$1" ;;
  esac
}

started=$SECONDS
cargo fuzz build --dev
echo "fuzz-smoke: built in $((SECONDS - started)) s" >&2
for target in $(cargo fuzz list); do
  mkdir -p "$corpus/$target"
  echo "fuzz-smoke: $target for ${seconds} s" >&2
  log="$corpus/$target.log"
  if ! cargo fuzz run --dev "$target" "$corpus/$target" "$(seeds_of "$target")" -- \
    -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz-smoke: $target failed; its input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  # libFuzzer's summary lines only.
  grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|Done [0-9]+ runs)' "$log" >&2 || true
done
echo "fuzz-smoke: all targets built and ran, $((SECONDS - started)) s in all" >&2
