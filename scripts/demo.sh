#!/usr/bin/env bash
# The quick-start demo: installs what is missing, builds, and runs a throwaway ocserv with
# openconnect clients in network namespaces beside the agent. ocserv's connect-script is the
# shipped hook and the agent decides from a local policy file: one user admitted with the
# policy's routes and DNS, one refused. Then lists sessions through the agent, kicks one, shows
# metrics, shows what a portal (a test double on loopback) was told about every session, tears
# everything down. Exits non-zero when a step does not behave as shown. Run as
# root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --locked --bin ocserv-agent --bin ocserv-agent-hook --example demo
exec target/release/examples/demo
