#!/usr/bin/env bash
# Installs the system packages the agent, its demo and its tests need, when missing.
# Debian/Ubuntu, as root. Idempotent: does nothing when everything is present.
set -euo pipefail

# g++: libfuzzer-sys compiles libFuzzer (C++) for the fuzz targets (scripts/fuzz-smoke.sh).
packages=(ocserv openconnect iptables gnutls-bin iproute2 iputils-ping curl g++)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $EUID -ne 0 ]]; then
    echo "install-deps: run as root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo (Rust toolchain) not found; install it with rustup first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi
