#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this): formatting, lints, every
# test (unit, property, real-ocserv integration, chaos) under cargo-nextest, then every fuzz
# target built and run for a few seconds (scripts/fuzz-smoke.sh). Run as root: the integration
# tests create network namespaces and run a real ocserv with openconnect clients.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo nextest run --locked --profile ci
scripts/fuzz-smoke.sh
