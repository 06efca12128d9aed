# Shared by the test scripts: build (unless FERRY_BIN is set) and start `ferry up` in the
# background, wait for `ready`, and stop it on exit. Source it, then call
#   start_ferry_up <config> <work folder>
# It sets FERRY_BIN and ferry_pid; output goes to <work>/ferry.out and <work>/ferry.log, the
# data folder is <work>/data and the VCAP_SERVICES file <work>/default-env.json.

ferry_pid=""
stop_ferry_up() {
  if [ -n "$ferry_pid" ]; then kill "$ferry_pid" 2>/dev/null || true; wait "$ferry_pid" 2>/dev/null || true; fi
  ferry_pid=""
}

start_ferry_up() {
  local config=$1 work=$2
  if [ -z "${FERRY_BIN:-}" ]; then
    (cd "$root" && cargo build --quiet --bin ferry)
    FERRY_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/ferry"
  fi
  "$FERRY_BIN" up --config "$config" --data-dir "$work/data" --env-file "$work/default-env.json" \
    >"$work/ferry.out" 2>"$work/ferry.log" &
  ferry_pid=$!
  for _ in $(seq 1 300); do
    grep -q '^ready$' "$work/ferry.out" 2>/dev/null && break
    kill -0 "$ferry_pid" 2>/dev/null || { echo "ferry up exited:" >&2; cat "$work/ferry.log" >&2; return 1; }
    sleep 0.1
  done
  grep -q '^ready$' "$work/ferry.out" || { echo "ferry up did not become ready" >&2; cat "$work/ferry.log" >&2; return 1; }
  grep -v '^VCAP_SERVICES=' "$work/ferry.out"
}
