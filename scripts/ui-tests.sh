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
# target/ui-screenshots). A throw-away slapd (Debian's, as this user, on a free port) holds the
# users of the LDAP logon steps.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/ferry-ui-tests.XXXXXX")"
# shellcheck source=lib/ferry-up.sh
. "$root/scripts/lib/ferry-up.sh"
scc_pid=""
slapd_pid=""
cleanup() {
  if [ -n "$scc_pid" ]; then kill "$scc_pid" 2>/dev/null || true; wait "$scc_pid" 2>/dev/null || true; fi
  if [ -n "$slapd_pid" ]; then kill "$slapd_pid" 2>/dev/null || true; wait "$slapd_pid" 2>/dev/null || true; fi
  stop_ferry_up
  rm -rf "$work"
}
trap cleanup EXIT

command -v node >/dev/null || { echo "node (>= 20) is required" >&2; exit 2; }
chromium="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$chromium" ] || { echo "$chromium is required (Debian package chromium)" >&2; exit 2; }

(cd "$root/tests/ui" && npm ci --no-audit --no-fund --loglevel=error)

# The directory of the LDAP logon steps: anna is in the administrators' group, nick in none.
[ -x /usr/sbin/slapd ] || { echo "/usr/sbin/slapd is required (Debian packages slapd ldap-utils)" >&2; exit 2; }
ldap="$work/ldap"
mkdir -p "$ldap/data"
suffix="dc=ferry,dc=test"
cat >"$ldap/slapd.conf" <<EOF
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
pidfile $ldap/slapd.pid
argsfile $ldap/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 16777216
suffix "$suffix"
rootdn "cn=admin,$suffix"
rootpw admin-secret
directory $ldap/data
access to attrs=userPassword by anonymous auth by * none
access to * by users read by * none
EOF
/usr/sbin/slapadd -f "$ldap/slapd.conf" <<EOF
dn: $suffix
objectClass: dcObject
objectClass: organization
dc: ferry
o: Ferry

dn: ou=people,$suffix
objectClass: organizationalUnit
ou: people

dn: ou=groups,$suffix
objectClass: organizationalUnit
ou: groups

dn: cn=reader,$suffix
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: reader
userPassword: reader-secret-ui

dn: uid=anna,ou=people,$suffix
objectClass: inetOrgPerson
uid: anna
cn: Anna Admin
sn: Admin
userPassword: anna-ldap-pw

dn: uid=nick,ou=people,$suffix
objectClass: inetOrgPerson
uid: nick
cn: Nick Nobody
sn: Nobody
userPassword: nick-ldap-pw

dn: cn=sccadmin,ou=groups,$suffix
objectClass: groupOfNames
cn: sccadmin
member: uid=anna,ou=people,$suffix
EOF
ldap_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
/usr/sbin/slapd -f "$ldap/slapd.conf" -h "ldap://127.0.0.1:$ldap_port/" -d 0 2>"$ldap/slapd.log" &
slapd_pid=$!
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$ldap_port") 2>/dev/null && break
  kill -0 "$slapd_pid" 2>/dev/null || { echo "slapd exited:" >&2; cat "$ldap/slapd.log" >&2; exit 1; }
  sleep 0.1
done

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
  FERRY_SCREENSHOTS="$shots" CHROMIUM="$chromium" NODE_EXTRA_CA_CERTS="$data/ca.pem" \
  FERRY_LDAP_PORT="$ldap_port" FERRY_LDAP_SUFFIX="$suffix" node run.js) || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- ferry up log (last 30 lines) ---" >&2
  tail -n 30 "$work/ferry.log" >&2
  echo "--- connector log (last 30 lines) ---" >&2
  tail -n 30 "$work/scc.log" >&2
fi
echo "screenshots in $shots"
exit "$status"
