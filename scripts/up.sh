#!/usr/bin/env bash
# Builds Ferry and runs `ferry up`. Extra arguments go to `ferry up` (e.g. -- --config FILE).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
command -v cc >/dev/null || { if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq build-essential; else sudo apt-get update -qq && sudo apt-get install -y -qq build-essential; fi; }
command -v cargo >/dev/null || { echo "Rust (cargo) is required: https://rustup.rs" >&2; exit 2; }
[ "${1:-}" = "--" ] && shift
cargo build --release --bin ferry
exec "${CARGO_TARGET_DIR:-$root/target}/release/ferry" up "$@"
