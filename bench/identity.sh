#!/usr/bin/env bash
# identity.sh — sourced by run.sh and profile.sh: a real `ferry up` (token service + CA, every port 0,
# not measured) in $S/up, the connector enrolled into $S/connector, the proxy's tunnel certificate
# from Ferry's CA, and a client-credentials token in $TOKEN. Needs FERRY, S, log; sets UP_PID.
# ---- identity: ferry up (token service, CA), every port 0 ----------------------------------------
printf '[listen]\ntoken_port = 0\ntoken_https_port = 0\ndestination_port = 0\nhttp_proxy_port = 0\nsocks5_port = 0\ntunnel_port = 0\n' \
  >"$S/up/ferry.toml"
FERRY_LOG=warn "$FERRY" up --config "$S/up/ferry.toml" --data-dir "$S/up/data" --env-file "$S/up/default-env.json" \
  >"$S/up/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 300); do [ -s "$S/up/default-env.json" ] && grep -q '^ready' "$S/up/up.log" 2>/dev/null && break; sleep 0.1; done
[ -s "$S/up/default-env.json" ] || { cat "$S/up/up.log" >&2; echo "ferry up did not start" >&2; exit 1; }
python3 - "$S" <<'PY'
import json, sys
s = sys.argv[1]
c = json.load(open(f"{s}/up/default-env.json"))["VCAP_SERVICES"]["connectivity"][0]["credentials"]
for k, v in {"token_url": c["url"], "subaccount": c["tenantid"], "clientid": c["clientid"], "clientsecret": c["clientsecret"]}.items():
    open(f"{s}/{k}", "w").write(v)
PY
TOKEN=$(curl -sf -u "$(cat "$S/clientid"):$(cat "$S/clientsecret")" -d grant_type=client_credentials \
  "$(cat "$S/token_url")/oauth/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
[ -n "$TOKEN" ] || { echo "no token from ferry up's token service" >&2; exit 1; }

# ---- connector enrollment and the proxy's tunnel certificate (both from Ferry's CA) ----------------
"$FERRY" connector enroll --subaccount "$(cat "$S/subaccount")" --location "" --url "$(cat "$S/token_url")" \
  --data-dir "$S/up/data" --out "$S/connector" >"$S/enroll.log"
(cd "$S" && {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out proxy-key.pem
  openssl req -new -key proxy-key.pem -subj /CN=localhost -out proxy.csr
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' >proxy.ext
  openssl x509 -req -in proxy.csr -CA up/data/ca.pem -CAkey up/data/ca-key.pem -CAcreateserial -days 2 \
    -extfile proxy.ext -out proxy.pem
}) >"$S/certs.log" 2>&1 || { cat "$S/certs.log" >&2; exit 1; }

