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
ferry_pid=""
cleanup() {
  if [ -n "$ferry_pid" ]; then kill "$ferry_pid" 2>/dev/null || true; wait "$ferry_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

command -v node >/dev/null || { echo "node (>= 20) is required" >&2; exit 2; }

if [ -z "${FERRY_BIN:-}" ]; then
  (cd "$root" && cargo build --quiet --bin ferry)
  FERRY_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/ferry"
fi

(cd "$root/tests/node" && npm ci --no-audit --no-fund --loglevel=error)

data="$work/data"
"$FERRY_BIN" up --config "$root/tests/node/ferry.toml" --data-dir "$data" --env-file "$work/default-env.json" \
  >"$work/ferry.out" 2>"$work/ferry.log" &
ferry_pid=$!
for _ in $(seq 1 300); do
  grep -q '^ready$' "$work/ferry.out" 2>/dev/null && break
  kill -0 "$ferry_pid" 2>/dev/null || { echo "ferry up exited:" >&2; cat "$work/ferry.log" >&2; exit 1; }
  sleep 0.1
done
grep -q '^ready$' "$work/ferry.out" || { echo "ferry up did not become ready" >&2; cat "$work/ferry.log" >&2; exit 1; }
grep -v '^VCAP_SERVICES=' "$work/ferry.out"

status=0
(cd "$root/tests/node" && FERRY_ENV_FILE="$work/default-env.json" NODE_EXTRA_CA_CERTS="$data/ca.pem" node run.js) || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- ferry log (last 60 lines) ---" >&2
  tail -n 60 "$work/ferry.log" >&2
fi
exit "$status"
