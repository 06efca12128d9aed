#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a bounded time: scripts/fuzz.sh [seconds-per-target] [target...]
# (default 30 s, all targets). scripts/test.sh runs it for 10 s per target; `cargo test --workspace` also
# replays the committed corpus (fuzz/corpus/<target>/) through the same properties on stable.
#
# New interesting inputs go to a working corpus in the cache, which is read back on the next run; an input
# that fails (panic, broken property, timeout, out of memory) is copied into fuzz/corpus/<target>/ so that it
# becomes a regression test: commit it with the fix.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${FERRY_CACHE_DIR:-$HOME/.cache/ferry}"
seconds="${1:-30}"
shift || true
case "$seconds" in '' | *[!0-9]*) echo "usage: $0 [seconds-per-target] [target...]" >&2; exit 2 ;; esac

export PATH="$cache/tools/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked --root "$cache/tools"
fi
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
# Ferry forbids unsafe code, so AddressSanitizer would mostly slow the search down; FUZZ_SANITIZER=address
# turns it back on (it then also checks the C parts: aws-lc, SQLite).
sanitizer="${FUZZ_SANITIZER:-none}"
target_dir="${CARGO_TARGET_DIR:-$cache/target}/fuzz"

cd "$root/fuzz"
if [ "$#" -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
cargo fuzz build -s "$sanitizer" --target-dir "$target_dir"

failed=()
for t in "${targets[@]}"; do
  work="$cache/fuzz/corpus/$t"
  artifacts="$cache/fuzz/artifacts/$t"
  mkdir -p "$work" "$artifacts" "corpus/$t"
  echo "== $t: ${seconds}s"
  if cargo fuzz run -s "$sanitizer" --target-dir "$target_dir" "$t" "$work" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" 2>"$artifacts/log.txt"; then
    grep -E '^stat::(number_of_executed_units|new_units_added)' "$artifacts/log.txt" | tr '\n' ' '
    echo
  else
    failed+=("$t")
    grep -E 'panicked|ERROR|SUMMARY' "$artifacts/log.txt" | head -5 || true
    for f in "$artifacts"/crash-* "$artifacts"/timeout-* "$artifacts"/oom-* "$artifacts"/slow-unit-*; do
      [ -e "$f" ] || continue
      mv "$f" "corpus/$t/"
      echo "   saved fuzz/corpus/$t/$(basename "$f")"
    done
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "failing targets: ${failed[*]} (inputs saved in fuzz/corpus/<target>/; logs in $cache/fuzz/artifacts/)" >&2
  exit 1
fi
echo "all ${#targets[@]} targets ran ${seconds}s without failure"
