#!/usr/bin/env bash
# Failover times of the master/shadow connector pair (issue 7): runs the kill -9 acceptance test
# (crates/ferry/tests/ha.rs) RUNS times and prints each time from the SIGKILL of the master to the
# first request the shadow served, then min / median / max. The test itself asserts correctness
# (no acknowledged write lost, one master); this script only collects its `measured:` lines.
#   RUNS=10 scripts/failover-times.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
runs="${RUNS:-10}"
test_name=kill_9_of_the_master_the_shadow_serves_and_the_old_master_returns_as_shadow
cargo test -p ferry --test ha --no-run --quiet
times=()
for i in $(seq 1 "$runs"); do
  out="$(cargo test -p ferry --test ha --quiet -- --exact "$test_name" --nocapture 2>&1)" || {
    printf '%s\n' "$out" | tail -40
    echo "run $i: the test failed" >&2
    exit 1
  }
  line="$(printf '%s\n' "$out" | grep -m1 '^measured: first request served by the shadow')"
  # Debug formatting of a Duration: "2.134s", "980.5ms".
  t="$(printf '%s\n' "$line" | sed -E 's/.*shadow ([0-9.]+(ms|s|µs)) after.*/\1/')"
  case "$t" in
    *ms) s="$(awk -v v="${t%ms}" 'BEGIN { printf "%.3f", v / 1000 }')" ;;
    *µs) s="$(awk -v v="${t%µs}" 'BEGIN { printf "%.3f", v / 1000000 }')" ;;
    *s) s="$(awk -v v="${t%s}" 'BEGIN { printf "%.3f", v }')" ;;
    *) echo "run $i: cannot read a time from: $line" >&2; exit 1 ;;
  esac
  echo "run $i: ${s} s"
  times+=("$s")
done
printf '%s\n' "${times[@]}" | sort -n | awk '
  { v[NR] = $1 }
  END {
    median = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "failover after kill -9 of the master, %d runs: min %.3f s, median %.3f s, max %.3f s\n", NR, v[1], median, v[NR]
  }'
