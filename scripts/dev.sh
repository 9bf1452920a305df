#!/usr/bin/env bash
# One entry point for people and CI.
#   scripts/dev.sh setup   install system packages and the virtualenv (idempotent)
#   scripts/dev.sh lab     setup, then run the lab (python -m lab)
#   scripts/dev.sh test    setup, then lint, type-check and run every test suite
# Must run as root on Debian/Ubuntu: the lab and the kernel tests build network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
APT_PACKAGES=(python3 python3-venv python3-pip iptables nftables conntrack iproute2 procps)

log() { printf '\n==> %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "scripts/dev.sh: run as root (network namespaces and iptables need it)" >&2
    exit 1
  fi
}

setup() {
  need_root
  local missing=()
  for tool in iptables-nft-restore iptables-legacy-restore nft conntrack ip python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then missing+=(python3-venv); fi
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing system packages (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    log "installing the project and its dev tools into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e '.[dev]'
    touch "$VENV/.installed"
  fi
}

run_tests() {
  log "ruff"
  "$VENV/bin/ruff" check proxy lab tests benchmarks
  "$VENV/bin/ruff" format --check proxy lab tests benchmarks
  log "mypy --strict proxy/ lab/ benchmarks/"
  "$VENV/bin/mypy" proxy lab benchmarks
  log "import-linter: the layers declared in pyproject.toml"
  "$VENV/bin/lint-imports"
  log "pytest: unit, kernel and end-to-end suites (kernel tests must not be skipped)"
  local junit
  junit="$(mktemp -d)/junit.xml"
  "$VENV/bin/pytest" -q -ra tests --junitxml="$junit"
  log "conformance: docs/conformance.md from the feature suite's results (fails when stale)"
  "$VENV/bin/python" scripts/conformance.py --junit "$junit" --check
  if [ -x scripts/manifests-check.sh ]; then
    log "manifests"
    bash scripts/manifests-check.sh
  fi
  if [ -x scripts/image-check.sh ]; then
    log "container image"
    bash scripts/image-check.sh
  fi
}

case "${1:-}" in
  setup) setup ;;
  lab) setup; shift; exec "$VENV/bin/python" -m lab "$@" ;;
  test) setup; run_tests ;;
  *) echo "usage: $0 setup|lab|test" >&2; exit 2 ;;
esac
