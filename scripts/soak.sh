#!/usr/bin/env bash
# soak.sh [minutes] — a bounded soak of the whole stack (default 10 minutes).
#
#   `ferry up` (token service, Destination Service, Connectivity Proxy) + a standalone
#   `ferry connector run` + nginx as the backend. Mixed traffic from scripts/lib/soak.py: HTTP
#   through the proxy (a small page and a 256 KiB file), SOCKS5 with SAP's method 0x80 (a TCP
#   mapping to the same nginx), and the Destination Service's find API. The connector is restarted
#   every RESTART_EVERY seconds (default 60), so requests during its restart fail with the proxy's 503
#   (counted apart from other errors). Every SAMPLE seconds (default 5) one CSV row: requests,
#   errors, p50/p99 latency per kind, RSS and open fds of `ferry up` and of the connector.
#   At the end: a PNG plot and a verdict whether RSS and fds are flat (after a warm-up of a sixth
#   of the run: the last third's median within FLAT_PCT % (default 10) of the first third's, fds
#   within 10 % or 5 descriptors). Exit 1 when not flat or when a non-restart error occurred.
#
#   FERRY_BIN=path (default: cargo build -p ferry, debug)   OUT=dir (default: a new temp dir)
#   PNG=path (default $OUT/soak.png)   WORKERS=n per kind (default 2)
#
# Needs nginx and python3 with matplotlib (Debian python3-matplotlib; scripts/test.sh installs it).
# Not part of scripts/test.sh: it runs for minutes. A 1-minute run: scripts/soak.sh 1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
minutes=${1:-10}
OUT=${OUT:-$(mktemp -d /tmp/ferry-soak.XXXXXX)}
mkdir -p "$OUT"
chmod 755 "$OUT"
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[ -x /usr/sbin/nginx ] || { echo "nginx missing (apt-get install nginx)" >&2; exit 2; }
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || { echo "matplotlib missing (apt-get install python3-matplotlib)" >&2; exit 2; }
if [ -z "${FERRY_BIN:-}" ]; then
  log "building ferry"
  (cd "$root" && cargo build --quiet -p ferry --bin ferry)
  FERRY_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/ferry"
fi
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -f "$OUT/nginx/nginx.pid" ] && kill "$(cat "$OUT/nginx/nginx.pid")" 2>/dev/null || true
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- backend: nginx with a small page and a 256 KiB file --------------------------------------
nginx_port=$(free_port)
mkdir -p "$OUT/nginx/www/api"
chmod -R 755 "$OUT/nginx"
echo '{"ok":true}' >"$OUT/nginx/www/api/small.json"
head -c 262144 /dev/urandom >"$OUT/nginx/www/api/big.bin"
chmod 644 "$OUT/nginx/www/api/"*
cat >"$OUT/nginx/nginx.conf" <<NGINX
daemon on;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
worker_processes 1;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $OUT/nginx/tmp;
  proxy_temp_path $OUT/nginx/tmp;
  fastcgi_temp_path $OUT/nginx/tmp;
  uwsgi_temp_path $OUT/nginx/tmp;
  scgi_temp_path $OUT/nginx/tmp;
  keepalive_requests 100000;
  server { listen 127.0.0.1:$nginx_port; root $OUT/nginx/www; }
}
NGINX
/usr/sbin/nginx -c "$OUT/nginx/nginx.conf" -p "$OUT/nginx" 2>"$OUT/nginx/start.log" || { cat "$OUT/nginx/start.log" >&2; exit 1; }

# ---- ferry up with one destination for the find API --------------------------------------------
mkdir -p "$OUT/up"
cat >"$OUT/up/ferry.toml" <<TOML
[listen]
token_port = 0
token_https_port = 0
destination_port = 0
http_proxy_port = 0
socks5_port = 0
tunnel_port = 0

[[destinations]]
properties = { Name = "soak", Type = "HTTP", URL = "http://soak.virtual:80", ProxyType = "OnPremise", Authentication = "NoAuthentication" }
TOML
FERRY_LOG=warn "$FERRY_BIN" up --config "$OUT/up/ferry.toml" --data-dir "$OUT/up/data" \
  --env-file "$OUT/up/default-env.json" >"$OUT/up/up.out" 2>"$OUT/up/up.log" &
up_pid=$!
pids+=("$up_pid")
for _ in $(seq 1 300); do grep -q '^ready$' "$OUT/up/up.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready$' "$OUT/up/up.out" || { cat "$OUT/up/up.log" >&2; echo "ferry up did not start" >&2; exit 1; }

# ---- the connector, enrolled for location "soak" -----------------------------------------------
conn_url=$(/usr/bin/python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["VCAP_SERVICES"]["connectivity"][0]["credentials"]["url"])' "$OUT/up/default-env.json")
sub=$(/usr/bin/python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["VCAP_SERVICES"]["connectivity"][0]["credentials"]["tenantid"])' "$OUT/up/default-env.json")
"$FERRY_BIN" connector enroll --subaccount "$sub" --location soak --url "$conn_url" --data-dir "$OUT/up/data" \
  --out "$OUT/connector" >/dev/null
cat >>"$OUT/connector/connector.toml" <<TOML

backoff_max_seconds = 2

[[mappings]]
virtualHost = "soak.virtual"
virtualPort = 80
localHost = "127.0.0.1"
localPort = $nginx_port
protocol = "HTTP"
resources = [{ path = "/api", exactMatchOnly = false }]

[[mappings]]
virtualHost = "soak-tcp.virtual"
virtualPort = 80
localHost = "127.0.0.1"
localPort = $nginx_port
protocol = "TCP"
TOML

log "soak for $minutes min; output in $OUT"
/usr/bin/python3 "$root/scripts/lib/soak.py" --minutes "$minutes" --out "$OUT" --png "${PNG:-$OUT/soak.png}" \
  --ferry "$FERRY_BIN" --up-pid "$up_pid" --connector-config "$OUT/connector/connector.toml" \
  --env-file "$OUT/up/default-env.json" --restart-every "${RESTART_EVERY:-60}" --sample "${SAMPLE:-5}" \
  --workers "${WORKERS:-2}" --flat-pct "${FLAT_PCT:-10}"
