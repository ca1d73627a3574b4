#!/usr/bin/env bash
# The quick-start demo: installs what is missing, builds, and runs a throwaway ocserv with
# openconnect clients in network namespaces beside the agent; lists sessions through the agent,
# kicks one, shows metrics, tears everything down. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --locked --bin ocserv-agent --example demo
exec target/release/examples/demo
