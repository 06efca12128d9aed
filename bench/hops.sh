#!/usr/bin/env bash
# hops.sh — what each relay in the HTTP 1 KiB c64 path costs on this machine, from one run.sh pass:
# direct, one haproxy (L4) and one nginx (L7) hop, rathole plain and TLS (two processes each), and
# ferry (HTTP proxy → TLS tunnel → connector). At 64 connections every path is CPU-bound, so the
# machine's cores ÷ requests per second is the CPU one request costs, and minus direct's is what
# the relays add. The last lines say what a ratio goal to rathole-TLS leaves for ours.
#
#   bench/hops.sh                    # DUR=5 REPS=3; FERRY, OUT as for run.sh; GOAL=1.4
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$(mktemp -d /tmp/ferry-hops.XXXXXX)}
export DUR=${DUR:-5} REPS=${REPS:-3}
GOAL=${GOAL:-1.4}
IDLE_N=0 QUIET_MAX=${QUIET_MAX:-0} OUT=$OUT/run \
  ONLY='^http-c64-(direct|haproxy-l4|nginx-l7|rathole-tcp|rathole-tls|ours-httpproxy)$' \
  "$REPO/bench/run.sh" >"$OUT/run.log" 2>&1
python3 - "$OUT/run/pass1/results.tsv" "$(nproc)" "$GOAL" <<'PY'
import collections, statistics, sys
path, cores, goal = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rps = collections.defaultdict(list)
for line in open(path):
    f = line.rstrip("\n").split("\t")
    if len(f) >= 4 and f[2] == "req_per_s":
        rps[f[1].removeprefix("http-c64-")].append(float(f[3]))
rows = [("direct", "direct (wrk → nginx)"), ("haproxy-l4", "haproxy, L4, one hop"),
        ("nginx-l7", "nginx, L7 reverse proxy, one hop"), ("rathole-tcp", "rathole, plain TCP (two processes)"),
        ("rathole-tls", "rathole, TLS (two processes)"),
        ("ours-httpproxy", "ferry, HTTP proxy → TLS tunnel → connector")]
if "direct" not in rps:
    sys.exit("no direct result: see run.log")
cost = lambda r: cores * 1e6 / r
base = cost(statistics.median(rps["direct"]))
print(f"| path | req/s (median of {len(rps['direct'])}) | CPU per request | the relays add |")
print("|---|---|---|---|")
for key, label in rows:
    if key not in rps:
        print(f"| {label} | no result | | |"); continue
    med = statistics.median(rps[key])
    c = cost(med)
    print(f"| {label} | {med:,.0f} | {c:.1f} µs | {'—' if key == 'direct' else f'{c - base:.1f} µs'} |")
if "rathole-tls" in rps:
    target = goal * statistics.median(rps["rathole-tls"])
    print(f"\n{goal}× rathole-TLS = {target:,.0f} req/s = {cost(target):.1f} µs per request: "
          f"{cost(target) - base:.1f} µs for the tunnel's processes together.")
    if "nginx-l7" in rps:
        hop = cost(statistics.median(rps["nginx-l7"])) - base
        print(f"Two nginx L7 hops (unencrypted) cost {2 * hop:.1f} µs.")
PY
echo "results in $OUT" >&2
