#!/usr/bin/env bash
# cpu-split.sh — user and kernel CPU time of the tunnel processes per unit of work, next to
# rathole's, from the same run.sh pass. Tells how much of a path's cost is our code (user) and
# how much is the kernel moving the bytes (system calls, loopback TCP, wake-ups): a tunnel cannot
# beat another by more than the ratio of their kernel times unless it needs less kernel work per
# request (fewer segments and wake-ups; fewer system calls alone did not do it, see bench/README
# "Fifth round").
#
#   bench/cpu-split.sh                                   # HTTP 1 KiB at 64 connections
#   SCEN=bulk bench/cpu-split.sh                         # bulk, SOCKS5 → tunnel → sink
#   DUR, REPS, FERRY, OUT as for run.sh (defaults here: DUR=8 REPS=1).
#
# Samples /proc/PID/stat (utime, stime) of `ferry proxy`, `ferry connector` and both rathole
# processes every 0.2 s while run.sh runs only the scenarios compared; each of those processes
# lives for one scenario, so its last sample is its total.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SCEN=${SCEN:-http}
OUT=${OUT:-$(mktemp -d /tmp/ferry-cpu.XXXXXX)}
export DUR=${DUR:-8} REPS=${REPS:-1}
case $SCEN in
  http) ONLY='^http-c64-(ours-httpproxy|rathole-tls)$' OURS=http-c64-ours-httpproxy ANCHOR=http-c64-rathole-tls METRIC=req_per_s ;;
  bulk) ONLY='^bulk-(ours-socks|rathole-tls)$' OURS=bulk-ours-socks ANCHOR=bulk-rathole-tls METRIC=throughput ;;
  *) echo "SCEN is http or bulk" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
TICK=$(getconf CLK_TCK)
sample() {
  while :; do
    for p in $(pgrep -f '^[^ ]*ferry (proxy|connector run)|^rathole --(server|client)' || true); do
      stat=$(cat /proc/"$p"/stat 2>/dev/null) || continue
      cmd=$(tr '\0' ' ' </proc/"$p"/cmdline 2>/dev/null | awk '{print ($1 ~ /rathole/) ? "rathole" $2 : "ferry-" $2}')
      # utime, stime are fields 14 and 15; the command name (field 2) may hold spaces
      awk -v p="$p" -v c="$cmd" '{sub(/^.*\) /, ""); print p, c, $12, $13}' <<<"$stat"
    done
    sleep 0.2
  done
}
sample >"$OUT/samples.txt" 2>/dev/null &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null || true' EXIT
IDLE_N=0 QUIET_MAX=${QUIET_MAX:-0} ONLY=$ONLY OUT=$OUT/run "$REPO/bench/run.sh" >"$OUT/run.log" 2>&1
kill $SAMPLER 2>/dev/null || true
python3 - "$OUT" "$TICK" "$OURS" "$ANCHOR" "$METRIC" "$DUR" <<'PY'
import sys, collections
out, tick, ours, anchor, metric, dur = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6])
last = {}
for line in open(f"{out}/samples.txt"):
    f = line.split()
    if len(f) == 4:
        last[(f[0], f[1])] = (int(f[2]), int(f[3]))
cpu = collections.defaultdict(lambda: [0.0, 0.0])
for (pid, name), (u, s) in last.items():
    cpu[name][0] += u / tick
    cpu[name][1] += s / tick
vals = collections.defaultdict(list)
for line in open(f"{out}/run/pass1/results.tsv"):
    f = line.rstrip("\n").split("\t")
    if len(f) >= 4 and f[2] == metric:
        vals[f[1]].append(float(f[3]))
def work(scen):  # requests, or GB, done over all repetitions
    v = vals.get(scen, [])
    return sum(x * dur for x in v) if metric == "req_per_s" else sum(x * dur / 8 for x in v)
unit = "µs per request" if metric == "req_per_s" else "s per GB"
scale = 1e6 if metric == "req_per_s" else 1.0
print(f"| path | {metric} (median) | process | user ({unit}) | system ({unit}) |")
print("|---|---|---|---|---|")
for scen, names in ((ours, ("ferry-proxy", "ferry-connector")), (anchor, ("rathole--server", "rathole--client"))):
    w = work(scen)
    if not w:
        print(f"| {scen} | no result | | | |"); continue
    med = sorted(vals[scen])[len(vals[scen]) // 2]
    tu = ts = 0.0
    for n in names:
        u, s = cpu.get(n, (0.0, 0.0))
        tu += u; ts += s
        print(f"| {scen} | {med} | {n} | {u / w * scale:.1f} | {s / w * scale:.1f} |")
    print(f"| {scen} | | both | {tu / w * scale:.1f} | {ts / w * scale:.1f} |")
PY
