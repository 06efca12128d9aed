#!/usr/bin/env bash
# run.sh — Ferry's proxy + connector through the anchor benchmarks (../shared/bench/anchors.sh), in the
# same run as the anchors, then a table of ratios (ours / each anchor; min/median/max over REPS).
#
#   bench/run.sh                                   # full: REPS=3 DUR=10 (about 40 minutes)
#   DUR=3 REPS=1 ONLY='rathole|direct|ssh|squid|ours' bench/run.sh      # quick pass
#   IDLE_N=10000 (default) second pass: RSS with that many idle tunnelled connections (0 = skip)
#   ANCHORS=/path/to/anchors.sh  FERRY=/path/to/ferry (default: cargo build --release -p ferry)
#   FERRY_BENCH_TUNNELS=N  tunnel connections of the connector (default: the connector's, cores 2 to 4)
#   OUT=dir  results (default: a new temp dir): pass1/ pass2/ ratios.md
#
# Identity comes from a real `ferry up` (token service + CA, all ports 0) that runs beside the
# benchmark and is not measured: the connector is enrolled with `ferry connector enroll`, the proxy's
# tunnel certificate is issued from Ferry's CA, and the HTTP scenarios send a client-credentials token.
# The SOCKS5 scenarios use `ferry proxy`'s benchmark-only no-auth listener ([bench_socks5_no_auth]),
# because the anchors' generic SOCKS5 clients cannot speak SAP's method 0x80.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=${ANCHORS:-$(dirname "$REPO")/shared/bench/anchors.sh}
OUT=${OUT:-$(mktemp -d /tmp/ferry-bench.XXXXXX)}
IDLE_N=${IDLE_N:-10000}
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[ -x "$ANCHORS" ] || { echo "anchors script not found at $ANCHORS (set ANCHORS=)" >&2; exit 2; }
for t in curl python3 openssl wrk; do
  command -v $t >/dev/null || { echo "$t missing: run '$ANCHORS install' first" >&2; exit 2; }
done

if [ -z "${FERRY:-}" ]; then
  log "building ferry (release)"
  (cd "$REPO" && cargo build --release -q -p ferry)
  FERRY=${CARGO_TARGET_DIR:-$REPO/target}/release/ferry
fi
export FERRY

mkdir -p "$OUT"
S=$OUT/state; rm -rf "$S"; mkdir -p "$S/up"
export FERRY_BENCH_STATE=$S
UP_PID=''
cleanup() { [ -n "$UP_PID" ] && kill "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null; return 0; }
trap cleanup EXIT
trap 'exit 130' INT TERM

. "$REPO/bench/identity.sh"

export OURS_PROXY_CMD="exec '$REPO/bench/ours.sh' proxy {HTTP_PORT} {SOCKS_PORT} {TUNNEL_PORT}"
export OURS_CONNECTOR_CMD="exec '$REPO/bench/ours.sh' connector {TUNNEL_PORT} {ORIGIN} {SINK}"
export OURS_HTTP_HEADERS="Proxy-Authorization: Bearer $TOKEN"
export OURS_ORIGIN_URL="http://origin.virtual:$(( ${PORT_BASE:-24000} + 80 ))/1k.bin"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

log "pass 1: anchors + ferry (results in $OUT/pass1)"
OUT=$OUT/pass1 "$ANCHORS" run
if [ "$IDLE_N" != 0 ]; then
  log "pass 2: $IDLE_N idle tunnelled connections, ferry next to rathole-tls (results in $OUT/pass2)"
  OUT=$OUT/pass2 HOLD_N=$IDLE_N HOLD_SECS=${HOLD_SECS:-5} REPS=${REPS:-3} ONLY='^mem-(ours-socks|rathole-tls)$' "$ANCHORS" run
fi
python3 "$REPO/bench/ratios.py" "$OUT"/pass*/results.tsv | tee "$OUT/ratios.md"
log "ratios in $OUT/ratios.md"
