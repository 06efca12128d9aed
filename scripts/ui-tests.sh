#!/usr/bin/env bash
# Browser tests of the Cloud Connector web UI: headless Chromium (Debian's /usr/bin/chromium,
# driven by playwright-core) against a standalone connector's admin server, whose tunnel goes to
# `ferry up` (the cloud side).
#
#   scripts/ui-tests.sh
#
# Uses FERRY_BIN if set, else `cargo build --bin ferry`. Starts `ferry up` with tests/ui/ferry.toml
# in a throw-away data folder, enrolls location ui-loc with `ferry connector enroll` (its
# authentication data is what the test pastes into the UI), starts `ferry connector run` with
# only `[admin]` (no subaccount yet), runs `npm ci` and `node run.js` in tests/ui, and exits with
# its status. Screenshots of every page go to $FERRY_ARTIFACTS/ui-screenshots (default:
# target/ui-screenshots).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/ferry-ui-tests.XXXXXX")"
# shellcheck source=lib/ferry-up.sh
. "$root/scripts/lib/ferry-up.sh"
scc_pid=""
cleanup() {
  if [ -n "$scc_pid" ]; then kill "$scc_pid" 2>/dev/null || true; wait "$scc_pid" 2>/dev/null || true; fi
  stop_ferry_up
  rm -rf "$work"
}
trap cleanup EXIT

command -v node >/dev/null || { echo "node (>= 20) is required" >&2; exit 2; }
chromium="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$chromium" ] || { echo "$chromium is required (Debian package chromium)" >&2; exit 2; }

(cd "$root/tests/ui" && npm ci --no-audit --no-fund --loglevel=error)

data="$work/data"
start_ferry_up "$root/tests/ui/ferry.toml" "$work" >/dev/null
token_url="$(sed -n 's/^  token service *\(http:[^ ]*\).*/\1/p' "$work/ferry.out")"
[ -n "$token_url" ] || { echo "cannot read the token service address from ferry up's output" >&2; exit 1; }
subaccount="$(sed -n 's/^id = "\(.*\)"/\1/p' "$root/tests/ui/ferry.toml")"
"$FERRY_BIN" connector enroll --url "$token_url" --data-dir "$data" --subaccount "$subaccount" \
  --location ui-loc --out "$work/enroll" >/dev/null

mkdir -p "$work/scc"
printf '[admin]\nport = 0\ndata_dir = "scc-data"\n' >"$work/scc/connector.toml"
"$FERRY_BIN" connector run --config "$work/scc/connector.toml" >"$work/scc.out" 2>"$work/scc.log" &
scc_pid=$!
for _ in $(seq 1 300); do
  grep -q '^ready$' "$work/scc.out" 2>/dev/null && break
  kill -0 "$scc_pid" 2>/dev/null || { echo "ferry connector run exited:" >&2; cat "$work/scc.log" >&2; exit 1; }
  sleep 0.1
done
ui_url="$(sed -n 's#^admin API: \(https://[^ ]*\) .*#\1#p' "$work/scc.out")"
[ -n "$ui_url" ] || { echo "the connector's admin server did not start" >&2; cat "$work/scc.out" "$work/scc.log" >&2; exit 1; }

shots="${FERRY_ARTIFACTS:-$root/target}/ui-screenshots"
mkdir -p "$shots"
status=0
(cd "$root/tests/ui" && FERRY_UI_URL="$ui_url" FERRY_ENV_FILE="$work/default-env.json" \
  FERRY_AUTH_DATA="$work/enroll/authentication-data.json" FERRY_LOCATION=ui-loc \
  FERRY_SCREENSHOTS="$shots" CHROMIUM="$chromium" NODE_EXTRA_CA_CERTS="$data/ca.pem" node run.js) || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- ferry up log (last 30 lines) ---" >&2
  tail -n 30 "$work/ferry.log" >&2
  echo "--- connector log (last 30 lines) ---" >&2
  tail -n 30 "$work/scc.log" >&2
fi
echo "screenshots in $shots"
exit "$status"
