#!/usr/bin/env bash
# Runs the SAP Cloud SDK conformance harness against `ferry up`.
#
#   scripts/conformance.sh                 # harness: a fresh copy of ../shared/conformance
#   CONFORMANCE_DIR=/path/to/harness scripts/conformance.sh
#
# Builds ferry (unless FERRY_BIN points at a built binary), starts `ferry up` with
# scripts/conformance.toml in a throw-away data folder, runs `npm ci` and `node run.js` in the
# harness folder with the CONF_* variables set for our servers, and exits with the harness's
# status.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/ferry-conformance.XXXXXX")"
# shellcheck source=lib/ferry-up.sh
. "$root/scripts/lib/ferry-up.sh"
cleanup() {
  stop_ferry_up
  rm -rf "$work"
}
trap cleanup EXIT

if [ -z "${CONFORMANCE_DIR:-}" ]; then
  src="$root/../shared/conformance"
  [ -d "$src" ] || { echo "no harness at $src; set CONFORMANCE_DIR" >&2; exit 2; }
  CONFORMANCE_DIR="$work/conformance"
  mkdir -p "$CONFORMANCE_DIR"
  # Copy without any node_modules or reports a previous run may have left.
  (cd "$src" && tar --exclude=node_modules --exclude=conformance-report.json -cf - .) | (cd "$CONFORMANCE_DIR" && tar -xf -)
fi

command -v node >/dev/null || { echo "node (>= 20) is required" >&2; exit 2; }

(cd "$CONFORMANCE_DIR" && npm ci --no-audit --no-fund --loglevel=error)

data="$work/data"
start_ferry_up "$root/scripts/conformance.toml" "$work"

export CONF_TOKEN_URL=http://127.0.0.1:18081
export CONF_UAA_DOMAIN=127.0.0.1:18443
export CONF_DESTINATION_URL=http://127.0.0.1:18082
export CONF_PROXY_HOST=127.0.0.1 CONF_PROXY_HTTP_PORT=20003 CONF_PROXY_SOCKS5_PORT=20004
export CONF_DEST_CLIENT_ID='sb-conf-destination!b1' CONF_DEST_CLIENT_SECRET=conf-destination-secret
export CONF_CONN_CLIENT_ID='sb-conf-connectivity!b2' CONF_CONN_CLIENT_SECRET=conf-connectivity-secret
export CONF_ONPREM_HOST=onprem-echo.virtual CONF_ONPREM_PORT=8080
export CONF_MAIL_HOST=onprem-smtp.virtual CONF_MAIL_PORT=25
export CONF_ECHO_PORT=18080 CONF_SMTP_PORT=18025 CONF_BIND_HOST=127.0.0.1
export CONF_LOCATION_ID=conf-loc
export CONF_USER_NAME=conf-user CONF_USER_PASSWORD=conf-user-password
export CONF_USER_CLIENT_ID='sb-conf-app!t1' CONF_USER_CLIENT_SECRET=conf-app-secret
export NODE_EXTRA_CA_CERTS="$data/ca.pem"
export CONF_REPORT="${CONF_REPORT:-$work/conformance-report.json}"

status=0
(cd "$CONFORMANCE_DIR" && node run.js "$@") || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- ferry log (last 60 lines) ---" >&2
  tail -n 60 "$work/ferry.log" >&2
fi
exit "$status"
