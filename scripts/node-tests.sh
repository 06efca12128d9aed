#!/usr/bin/env bash
# Runs tests/node against `ferry up`: tokens of a real OpenID Connect provider (oidc-provider)
# that Ferry trusts are accepted by the Destination Service and the proxy, an untrusted
# provider's are refused, and real @sap/xssec validates Ferry's own tokens.
#
#   scripts/node-tests.sh
#
# Uses FERRY_BIN if set, else `cargo build --bin ferry` (a no-op right after scripts/conformance.sh
# built it). Starts `ferry up` with tests/node/ferry.toml in a throw-away data folder, runs
# `npm ci` and `node run.js` in tests/node, and exits with its status. Ports 28090-28092 must be
# free (the providers and the echo backend that tests/node/ferry.toml names).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/ferry-node-tests.XXXXXX")"
# shellcheck source=lib/ferry-up.sh
. "$root/scripts/lib/ferry-up.sh"
cleanup() {
  stop_ferry_up
  rm -rf "$work"
}
trap cleanup EXIT

command -v node >/dev/null || { echo "node (>= 20) is required" >&2; exit 2; }

(cd "$root/tests/node" && npm ci --no-audit --no-fund --loglevel=error)

data="$work/data"
start_ferry_up "$root/tests/node/ferry.toml" "$work"

status=0
(cd "$root/tests/node" && FERRY_ENV_FILE="$work/default-env.json" NODE_EXTRA_CA_CERTS="$data/ca.pem" node run.js) || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- ferry log (last 60 lines) ---" >&2
  tail -n 60 "$work/ferry.log" >&2
fi
exit "$status"
