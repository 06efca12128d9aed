#!/usr/bin/env bash
# profile.sh — deterministic costs of `ferry proxy` + `ferry connector run` (the processes and
# configuration of run.sh/ours.sh), for a machine whose wall clock is shared with other work:
#   - instructions (valgrind callgrind) per tunnelled HTTP 1 KiB GET, counted between a warm-up
#     and the end of N requests (callgrind_control -z / -d), per process;
#   - instructions per byte of a SOCKS5 bulk transfer;
#   - VmRSS of both processes idle and with HOLD_N idle SOCKS5 connections (no valgrind);
#   - system calls per request / per MiB (strace -c; MODES=sys / sysbulk, not run by default);
#   - CPU time (user, kernel) of both processes per request under wrk at CONNS_WRK connections for
#     SECS seconds (MODES=cpu, not run by default): compares two builds on a noisy machine better
#     than requests per second do, since it does not depend on how much CPU the others got.
#
#   bench/profile.sh                       # http bulk mem; results and callgrind files in $OUT
#   MODES=http N=2000 CONNS=16 bench/profile.sh
# Variables: FERRY (default: cargo build --release -p ferry), OUT, MODES (http bulk mem sys sysbulk cpu), N, WARM,
# SECS, CONNS_WRK,
# CONNS, MIB (bulk size), HOLD_N, FERRY_BENCH_TUNNELS, MEM_WRAP (a command prefix for mode mem, e.g.
# `valgrind --tool=dhat --dhat-out-file=/tmp/dhat.%p`: live heap per call site at the peak). Needs nginx,
# valgrind, python3, openssl, curl.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$(mktemp -d /tmp/ferry-profile.XXXXXX)}
MODES=${MODES:-http bulk mem}
N=${N:-2000} WARM=${WARM:-200} CONNS=${CONNS:-16} MIB=${MIB:-256} HOLD_N=${HOLD_N:-1000}
SECS=${SECS:-8} CONNS_WRK=${CONNS_WRK:-64}
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
if [ -z "${FERRY:-}" ]; then
  (cd "$REPO" && cargo build --release -q -p ferry)
  FERRY=${CARGO_TARGET_DIR:-$REPO/target}/release/ferry
fi
export FERRY
mkdir -p "$OUT"
S=$OUT/state; rm -rf "$S"; mkdir -p "$S/up"
export FERRY_BENCH_STATE=$S
UP_PID='' PIDS=()
cleanup() {
  for p in "${PIDS[@]}" $UP_PID; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

. "$REPO/bench/identity.sh"

# ---- backends: nginx serving 1 KiB, a discarding sink ------------------------------------------
ORIGIN=127.0.0.1:$(free_port)
W=$OUT/nginx; mkdir -p "$W/logs" "$W/www"; head -c 1024 /dev/zero | tr '\0' x >"$W/www/1k.bin"
cat >"$W/nginx.conf" <<EOF
daemon off; worker_processes 1; pid $W/nginx.pid; error_log $W/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen $ORIGIN backlog=4096; root $W/www; location / { } } }
EOF
nginx -p "$W" -c "$W/nginx.conf" & PIDS+=($!)
SINK_PORT_FILE=$OUT/sink.port
python3 "$REPO/bench/cgload.py" sink 127.0.0.1:0 >"$SINK_PORT_FILE" & PIDS+=($!)
for _ in $(seq 1 50); do [ -s "$SINK_PORT_FILE" ] && break; sleep 0.1; done
SINK=127.0.0.1:$(cat "$SINK_PORT_FILE")
URL="http://origin.virtual:${ORIGIN##*:}/1k.bin"

# start_ferry WRAP: proxy and connector, waits until a request passes; sets PROXY_PID CONN_PID
start_ferry() {
  HTTP=$(free_port) SOCKS=$(free_port) TUNNEL=$(free_port)
  FERRY_WRAP=$1 "$REPO/bench/ours.sh" proxy "$HTTP" "$SOCKS" "$TUNNEL" >"$OUT/proxy.log" 2>&1 & PROXY_PID=$!
  PIDS+=($PROXY_PID)
  FERRY_WRAP=$1 "$REPO/bench/ours.sh" connector "$TUNNEL" "$ORIGIN" "$SINK" >"$OUT/connector.log" 2>&1 & CONN_PID=$!
  PIDS+=($CONN_PID)
  for _ in $(seq 1 600); do
    curl -sf -o /dev/null -x "http://127.0.0.1:$HTTP" -H "Proxy-Authorization: Bearer $TOKEN" "$URL" && return 0
    sleep 0.2
  done
  echo "proxy/connector did not come up" >&2; tail "$OUT/proxy.log" "$OUT/connector.log" >&2; exit 1
}
stop_ferry() { kill "$PROXY_PID" "$CONN_PID" 2>/dev/null || true; wait "$PROXY_PID" "$CONN_PID" 2>/dev/null || true; }

# total_ir PID NAME: dumps callgrind's counters of PID since the last zeroing into $OUT/NAME.cg
total_ir() {
  local before
  before=$(ls "$OUT"/cg.$1.* 2>/dev/null | wc -l)
  callgrind_control -d "$1" >/dev/null
  for _ in $(seq 1 100); do [ "$(ls "$OUT"/cg.$1.* 2>/dev/null | wc -l)" -gt "$before" ] && break; sleep 0.2; done
  local f; f=$(ls -t "$OUT"/cg.$1.* | head -1); mv "$f" "$OUT/$2.cg"
  awk '/^summary:/ {print $2}' "$OUT/$2.cg"
}

report() { # report LABEL UNIT COUNT: instructions per unit in each process
  local p c; p=$(total_ir "$PROXY_PID" "$1-proxy") c=$(total_ir "$CONN_PID" "$1-connector")
  python3 - "$1" "$2" "$3" "$p" "$c" <<'PY' | tee -a "$OUT/results.md"
import sys
label, unit, n, p, c = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print(f"| {label} | proxy {p / n:,.1f} | connector {c / n:,.1f} | both {(p + c) / n:,.1f} instructions per {unit} |")
PY
  for x in proxy connector; do
    # `|| true`: head closes the pipe early, and with pipefail the annotate's SIGPIPE ended the script
    (callgrind_annotate --inclusive=yes "$OUT/$1-$x.cg" 2>/dev/null || true) | head -60 >"$OUT/$1-$x.inclusive.txt"
    # callgrind_annotate's self table shows inclusive costs for these mid-run dumps: own parser
    python3 "$REPO/bench/cgself.py" "$OUT/$1-$x.cg" 60 --per "${3%.*}" >"$OUT/$1-$x.self.txt"
  done
}

CG="valgrind --tool=callgrind --callgrind-out-file=$OUT/cg.%p"
for mode in $MODES; do
  case $mode in
    http)
      log "http: $WARM warm-up, then $N GETs over $CONNS connections under callgrind"
      start_ferry "$CG"
      python3 "$REPO/bench/cgload.py" http "127.0.0.1:$HTTP" "$URL" "$TOKEN" "$CONNS" "$WARM"
      callgrind_control -z "$PROXY_PID" >/dev/null; callgrind_control -z "$CONN_PID" >/dev/null
      python3 "$REPO/bench/cgload.py" http "127.0.0.1:$HTTP" "$URL" "$TOKEN" "$CONNS" "$N"
      report http request "$N"
      stop_ferry ;;
    bulk)
      log "bulk: $MIB MiB through SOCKS5 under callgrind"
      start_ferry "$CG"
      python3 "$REPO/bench/cgload.py" bulk "127.0.0.1:$SOCKS" "$SINK" 1
      callgrind_control -z "$PROXY_PID" >/dev/null; callgrind_control -z "$CONN_PID" >/dev/null
      python3 "$REPO/bench/cgload.py" bulk "127.0.0.1:$SOCKS" "$SINK" "$MIB"
      report bulk byte "$((MIB * 1048576))"
      stop_ferry ;;
    sys)
      log "sys: system calls per request (strace -c) over $N GETs"
      start_ferry ""
      python3 "$REPO/bench/cgload.py" http "127.0.0.1:$HTTP" "$URL" "$TOKEN" "$CONNS" "$WARM"
      strace -c -f -p "$PROXY_PID" -o "$OUT/sys-proxy.txt" & s1=$!
      strace -c -f -p "$CONN_PID" -o "$OUT/sys-connector.txt" & s2=$!
      sleep 1
      python3 "$REPO/bench/cgload.py" http "127.0.0.1:$HTTP" "$URL" "$TOKEN" "$CONNS" "$N"
      kill -INT $s1 $s2; wait $s1 $s2 || true
      for x in proxy connector; do
        awk -v n="$N" -v x=$x '/total/ {printf "| sys | %s | %.1f system calls per request |\n", x, $4/n}' "$OUT/sys-$x.txt"
      done | tee -a "$OUT/results.md"
      stop_ferry ;;
    sysbulk)
      log "sysbulk: system calls per MiB (strace -c) over a $MIB MiB SOCKS5 transfer"
      start_ferry ""
      strace -c -f -p "$PROXY_PID" -o "$OUT/sysbulk-proxy.txt" & s1=$!
      strace -c -f -p "$CONN_PID" -o "$OUT/sysbulk-connector.txt" & s2=$!
      sleep 1
      python3 "$REPO/bench/cgload.py" bulk "127.0.0.1:$SOCKS" "$SINK" "$MIB"
      kill -INT $s1 $s2; wait $s1 $s2 || true
      for x in proxy connector; do
        awk -v n="$MIB" -v x=$x '/total/ {printf "| sysbulk | %s | %.1f system calls per MiB |\n", x, $4/n}' "$OUT/sysbulk-$x.txt"
      done | tee -a "$OUT/results.md"
      stop_ferry ;;
    cpu)
      log "cpu: CPU time per request, wrk -c$CONNS_WRK for ${SECS}s"
      start_ferry ""
      printf 'wrk.path = "%s"\nwrk.headers["Proxy-Authorization"] = "Bearer %s"\n' "$URL" "$TOKEN" >"$OUT/proxy.lua"
      wrk -t2 -c"$CONNS_WRK" -d2s -s "$OUT/proxy.lua" "http://127.0.0.1:$HTTP" >/dev/null
      ticks() { for p in "$PROXY_PID" "$CONN_PID"; do awk '{sub(/^.*\) /, ""); print $12, $13}' /proc/"$p"/stat; done | paste -sd' '; }
      before=$(ticks)
      wrk -t2 -c"$CONNS_WRK" -d"${SECS}s" -s "$OUT/proxy.lua" "http://127.0.0.1:$HTTP" >"$OUT/cpu-wrk.txt"
      after=$(ticks)
      python3 - "$before" "$after" "$(getconf CLK_TCK)" "$OUT/cpu-wrk.txt" "$SECS" <<'PY' | tee -a "$OUT/results.md"
import re, sys
b, a = [list(map(int, x.split())) for x in sys.argv[1:3]]
tick, secs = int(sys.argv[3]), float(sys.argv[5])
text = open(sys.argv[4]).read()
n = int(re.search(r"(\d+) requests in", text).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
d = [(y - x) / tick * 1e6 / n for x, y in zip(b, a)]
print(f"| cpu | {n / secs:,.0f} req/s | proxy user {d[0]:.1f} kernel {d[1]:.1f} | connector user {d[2]:.1f} "
      f"kernel {d[3]:.1f} | both {sum(d):.1f} µs per request |" + (f" {bad.group(1)} non-2xx |" if bad else ""))
PY
      stop_ferry ;;
    mem)
      log "mem: VmRSS idle and with $HOLD_N idle SOCKS5 connections"
      start_ferry "${MEM_WRAP:-}"
      sleep 2
      rss() { awk '/^VmRSS/ {s += $2} END {print s}' /proc/"$PROXY_PID"/status /proc/"$CONN_PID"/status; }
      idle=$(rss)
      for p in "$PROXY_PID" "$CONN_PID"; do grep -E '^(VmRSS|RssAnon|RssFile|Threads)' /proc/"$p"/status | tr -s ' \t' ' ' | paste -sd' '; done \
        | sed 's/^/| mem idle | /; s/$/ |/' | tee -a "$OUT/results.md"
      exec {hold}> >(python3 "$REPO/bench/cgload.py" hold "127.0.0.1:$SOCKS" "$SINK" "$HOLD_N" >"$OUT/hold.out")
      for _ in $(seq 1 600); do grep -q READY "$OUT/hold.out" 2>/dev/null && break; sleep 0.1; done
      sleep 3
      held=$(rss)
      exec {hold}>&-
      python3 - "$idle" "$held" "$HOLD_N" <<'PY' | tee -a "$OUT/results.md"
import sys
idle, held, n = (int(x) for x in sys.argv[1:])
print(f"| mem | idle {idle / 1024:.1f} MiB | {n} idle conns {held / 1024:.1f} MiB | {(held - idle) / n:.1f} KiB per conn |")
PY
      stop_ferry ;;
  esac
done
log "results in $OUT/results.md"
