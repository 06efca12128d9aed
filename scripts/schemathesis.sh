#!/usr/bin/env bash
# Checks the Destination Service against SAP's own OpenAPI document with schemathesis: no
# server error and no answer that violates the document, over generated requests for every
# operation (at least 30 for each operation with a body or path parameter).
#
#   scripts/schemathesis.sh            # uses FERRY_BIN if set, else builds ferry
#
# SAP's document ships in the PyPI package sap-cloud-sdk (sap_cloud_sdk/destination/spec/
# api_spec.yaml); scripts/schemathesis/errata.py corrects the few statements in it that no server
# can satisfy (listed in docs/destination-api.md). Python packages go into a virtualenv in the
# build cache folder, pinned, so reruns do not download again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/ferry-schemathesis.XXXXXX")"
# shellcheck source=lib/ferry-up.sh
. "$root/scripts/lib/ferry-up.sh"
cleanup() {
  stop_ferry_up
  rm -rf "$work"
}
trap cleanup EXIT

SCHEMATHESIS_VERSION=4.32.5
SAP_SDK_VERSION=0.62.0
cache="${FERRY_CACHE_DIR:-$HOME/.cache/ferry}/schemathesis"
venv="$cache/venv-$SCHEMATHESIS_VERSION"
if [ ! -x "$venv/bin/st" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
spec="$cache/sap-cloud-sdk-$SAP_SDK_VERSION-api_spec.yaml"
if [ ! -s "$spec" ]; then
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps "sap-cloud-sdk==$SAP_SDK_VERSION" -d "$work/wheel"
  "$venv/bin/python" - "$work"/wheel/*.whl "$spec.tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read("sap_cloud_sdk/destination/spec/api_spec.yaml")
open(sys.argv[2], "wb").write(data)
PY
  mv "$spec.tmp" "$spec"
fi
"$venv/bin/python" "$root/scripts/schemathesis/errata.py" --ferry "$spec" "$work/api_spec.yaml"

start_ferry_up "$root/scripts/conformance.toml" "$work" >/dev/null
# The document Ferry serves must be SAP's, corrected only by the errata (plus the label endpoints).
curl -fsS http://127.0.0.1:18082/destination-configuration/openapi.yaml -o "$work/served.yaml"
if ! cmp -s "$work/served.yaml" "$work/api_spec.yaml"; then
  echo "the served OpenAPI document differs from SAP's document with the errata applied; regenerate it:" >&2
  echo "  python3 scripts/schemathesis/errata.py --ferry $spec crates/ferry-destination/openapi/destination-api.yaml" >&2
  diff "$work/served.yaml" "$work/api_spec.yaml" | head -20 >&2
  exit 1
fi
token=$(curl -fsS -u 'sb-conf-destination!b1:conf-destination-secret' -d grant_type=client_credentials \
  http://127.0.0.1:18081/oauth/token | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

status=0
# schemathesis keeps a cache folder in the working directory: keep it in the throw-away one.
cd "$work"
"$venv/bin/st" run http://127.0.0.1:18082/destination-configuration/openapi.yaml \
  --url http://127.0.0.1:18082/destination-configuration \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,response_schema_conformance \
  --phases examples,coverage,fuzzing --max-examples 50 --workers 2 \
  --seed "${SCHEMATHESIS_SEED:-20261123}" \
  --report ndjson --report-dir "$work/report" || status=$?
"$venv/bin/python" "$root/scripts/schemathesis/coverage.py" "$work"/report/*.ndjson "$work/api_spec.yaml" 30 || status=1
if [ "$status" != 0 ]; then
  echo "schemathesis: failures above (ferry log: last lines follow)" >&2
  tail -n 40 "$work/ferry.log" >&2
fi
exit "$status"
