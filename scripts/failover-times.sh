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
logs="${OUT:-$(mktemp -d)}"
mkdir -p "$logs"
cargo test -p ferry --test ha --no-run --quiet
times=()
failed=0
for i in $(seq 1 "$runs"); do
  if ! cargo test -p ferry --test ha --quiet -- --exact "$test_name" --nocapture >"$logs/run-$i.log" 2>&1; then
    failed=$((failed + 1))
    echo "run $i: the test FAILED: $(grep -m1 -A2 'panicked at' "$logs/run-$i.log" | tr '\n' ' ') (log: $logs/run-$i.log)"
  fi
  # A run that failed after the failover still measured it.
  line="$(grep -m1 '^measured: first request served by the shadow' "$logs/run-$i.log" || true)"
  [ -n "$line" ] || continue
  # Debug formatting of a Duration: "2.134s", "980.5ms".
  t="$(printf '%s\n' "$line" | sed -E 's/.*shadow ([0-9.]+(ms|s|µs)) after.*/\1/')"
  case "$t" in
    *ms) s="$(awk -v v="${t%ms}" 'BEGIN { printf "%.3f", v / 1000 }')" ;;
    *µs) s="$(awk -v v="${t%µs}" 'BEGIN { printf "%.3f", v / 1000000 }')" ;;
    *s) s="$(awk -v v="${t%s}" 'BEGIN { printf "%.3f", v }')" ;;
    *) echo "run $i: cannot read a time from: $line" >&2; failed=$((failed + 1)); continue ;;
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
if [ "$failed" -gt 0 ]; then
  echo "$failed of $runs runs failed (logs in $logs)" >&2
  exit 1
fi
