#!/usr/bin/env bash
# scripts/image-check.sh: build the container image for real and smoke-test what is inside.
#
# No container runtime can run containers on the CI machine and no image registry is
# reachable, but podman can build with `--isolation chroot` and mount an image read-only.
# So this stage:
#   1. installs podman and debootstrap if missing (apt-get);
#   2. makes the Dockerfile's base image (its `ARG BASE_IMAGE`, docker.io/library/debian:
#      bookworm-slim) from Debian's own packages with debootstrap, under that exact name, so
#      the Dockerfile builds unchanged here and on any real registry-backed builder. The rootfs
#      tarball is cached in $KPY_CACHE_DIR (default /var/cache/kube-proxy-py) and the imported
#      image stays in podman's store; KPY_REFRESH_BASE=1 rebuilds both;
#   3. builds the image (`podman build --isolation chroot`, no layer cache: every run proves
#      the Dockerfile builds from scratch on top of the base);
#   4. mounts the image's filesystem and runs, chrooted into it, each in a fresh network, mount
#      and PID namespace (only loopback, nothing shared with the host's rules):
#        - the image's own ENTRYPOINT and Env with --version and --help;
#        - bad input: an unknown --proxy-mode, a ConfigMap-style config with an unknown mode
#          and an empty API server address exit 1 with a message naming what is wrong;
#        - every kernel tool: iptables-nft/-legacy (v4 and v6), nft, ipset, conntrack, ipvsadm;
#        - the plain `iptables` wrapper picks the backend the proxy would pick;
#        - `python -m proxy --cleanup --proxy-mode iptables`: exit 0 on an empty namespace,
#          then removes our KPY- chains from both backends and leaves foreign chains
#          byte-identical; `--cleanup --proxy-mode nftables` deletes our nftables table
#          and leaves a foreign table byte-identical;
#        - kpy-node-init against a scratch /proc/sys with the manifests' sysctls.conf;
#   5. unmounts, removes the image (KPY_KEEP_IMAGE=1 keeps it) and prints the timings.
#
# Needs root (podman's store, chroot, namespaces). Budget: 10 minutes on a 2-core machine.
# The test scripts below run inside the image, so their $variables are meant for that shell:
# shellcheck disable=SC2016
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET_SECONDS=600
IMAGE=localhost/kube-proxy-py:image-check
CACHE_DIR=${KPY_CACHE_DIR:-/var/cache/kube-proxy-py}
BASE_IMAGE=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
[ -n "$BASE_IMAGE" ] || {
  echo "image-check: no 'ARG BASE_IMAGE=' line in the Dockerfile" >&2
  exit 1
}
# docker.io/library/debian:bookworm-slim -> bookworm
SUITE=${BASE_IMAGE##*:}
SUITE=${SUITE%-slim}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

STARTED=$(date +%s)
STEP_STARTED=$STARTED
TIMINGS=()
WORK=""
MOUNTED=""
FAILED=0

log() { printf '\n==> %s\n' "$*"; }
pass() { printf '    ok   %s\n' "$*"; }
fail() {
  printf '    FAIL %s\n' "$*" >&2
  FAILED=$((FAILED + 1))
}
step_done() {
  local now
  now=$(date +%s)
  TIMINGS+=("$(printf '%4ds  %s' $((now - STEP_STARTED)) "$1")")
  STEP_STARTED=$now
}

cleanup() {
  local rc=$?
  if [ -n "$MOUNTED" ]; then
    podman image unmount "$IMAGE" >/dev/null 2>&1 || true
  fi
  if [ "${KPY_KEEP_IMAGE:-0}" != 1 ]; then
    podman rmi --force "$IMAGE" >/dev/null 2>&1 || true
  fi
  if [ -n "$WORK" ]; then
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT

if [ "$(id -u)" != 0 ]; then
  echo "image-check: run as root (podman's store, chroot and network namespaces need it)" >&2
  exit 1
fi
WORK=$(mktemp -d /tmp/kpy-image-check.XXXXXX)

# -- 1. tools --------------------------------------------------------------------------------
log "tools"
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
podman --version
step_done "tools"

# -- 2. the base image, from Debian's packages -------------------------------------------------
debian_mirror() {
  # The first Debian archive apt already uses (deb822 or one-line sources), else the default.
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
    sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)\/\{0,1\}$/\1/p' | head -n 1)
  if [ -z "$uri" ]; then
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      sed -n 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\([^[:space:]]*\/debian\)\/\{0,1\}[[:space:]].*/\2/p' |
      head -n 1)
  fi
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

make_base_tarball() {
  local tarball=$1 mirror rootfs
  mirror=$(debian_mirror)
  rootfs="$WORK/rootfs"
  echo "debootstrap --variant=minbase $SUITE from $mirror"
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 30 "$WORK/debootstrap.log" >&2
    return 1
  }
  # Shaped like the official slim image: the release, its updates and security archives, no
  # package cache, no apt lists, and dpkg told to skip documentation, manuals and translations
  # (for the packages the Dockerfile installs too), as debuerreotype's slim variant does.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
  # ...and apt told to drop downloaded packages and its binary caches after each run.
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  printf 'Acquire::Languages "none";\n' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$rootfs"/usr/share/groff/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/linda/* \
    "$rootfs"/usr/share/lintian/overrides/* "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/man/*
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/* "$rootfs"/tmp/*
  mkdir -p "$(dirname "$tarball")"
  tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -C "$rootfs" -cf "$tarball.partial" .
  mv "$tarball.partial" "$tarball"
  rm -rf "$rootfs"
}

log "base image $BASE_IMAGE"
# Bump BASE_RECIPE when make_base_tarball changes: a cached tarball or imported image made by
# an older recipe is then rebuilt instead of reused.
BASE_RECIPE=3
recipe_label=io.kube-proxy-py.base-recipe
if [ "${KPY_REFRESH_BASE:-0}" = 1 ] || { podman image exists "$BASE_IMAGE" &&
  [ "$(podman image inspect --format "{{index .Labels \"$recipe_label\"}}" "$BASE_IMAGE")" != "$BASE_RECIPE" ]; }; then
  podman rmi --force "$BASE_IMAGE" >/dev/null 2>&1 || true
fi
if podman image exists "$BASE_IMAGE"; then
  echo "already in podman's store (KPY_REFRESH_BASE=1 rebuilds it)"
else
  arch=$(dpkg --print-architecture)
  tarball="$CACHE_DIR/debian-$SUITE-slim-$arch-recipe$BASE_RECIPE.tar"
  if [ "${KPY_REFRESH_BASE:-0}" = 1 ] || [ ! -s "$tarball" ]; then
    if ! mkdir -p "$CACHE_DIR" 2>/dev/null || [ ! -w "$CACHE_DIR" ]; then
      tarball="$WORK/debian-$SUITE-minbase-$arch.tar" # no cache: still works, just slower
    fi
    rm -f "$CACHE_DIR/debian-$SUITE-"*.tar # older recipes
    make_base_tarball "$tarball"
  else
    echo "debootstrap tarball from the cache: $tarball"
  fi
  podman import --quiet --change 'CMD ["bash"]' --change "LABEL $recipe_label=$BASE_RECIPE" \
    "$tarball" "$BASE_IMAGE" >/dev/null
fi
step_done "base image"

# -- 3. build -----------------------------------------------------------------------------------
log "podman build $IMAGE"
# pip reaches PyPI over HTTPS; give it the CA bundle this machine trusts (a TLS-intercepting
# proxy's CA lives there, if any), as a build secret that never lands in the image.
secret_args=()
host_ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [ -s "$host_ca" ]; then
  secret_args=(--secret "id=pip-ca,src=$host_ca")
fi
podman build --isolation chroot --pull=never --layers=false --quiet "${secret_args[@]}" \
  -t "$IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1 || {
  tail -n 60 "$WORK/build.log" >&2
  echo "image-check: the image build failed (full log above, last 60 lines)" >&2
  exit 1
}
podman image inspect --format '{{.Size}}' "$IMAGE" |
  awk '{ printf "image size: %.0f MB\n", $1 / 1000000 }'
step_done "build"

# -- 4. smoke tests inside the image's filesystem ------------------------------------------------
log "smoke tests in the image's filesystem (fresh network namespaces)"
MOUNTED=$(podman image mount "$IMAGE")
podman image inspect "$IMAGE" >"$WORK/inspect.json"
# The image's Env (one VAR=value a line) and Entrypoint (as shell words for `eval`), so the
# tests start exactly what a kubelet would.
read_config() {
  python3 - "$WORK/inspect.json" "$1" <<'EOF'
import json, shlex, sys
config = json.load(open(sys.argv[1]))[0]["Config"]
words = config.get(sys.argv[2]) or []
print("\n".join(words) if sys.argv[2] == "Env" else " ".join(shlex.quote(w) for w in words))
EOF
}
mapfile -t IMAGE_ENV < <(read_config Env)
ENTRYPOINT=$(read_config Entrypoint)
echo "entrypoint: $ENTRYPOINT"

SHARE="$WORK/share" # appears as /mnt/check inside the image
mkdir -p "$SHARE"

# in_image SCRIPT: run a POSIX sh script chrooted in the image, with the image's Env, in new
# net/mount/PID namespaces; /proc, /dev, a tmpfs /run (the xtables lock) and /tmp are mounted
# privately and vanish with the namespace. Prints the script's stdout and stderr.
in_image() {
  unshare --net --mount --pid --fork --propagation private \
    /bin/sh -c '
      set -e
      root=$1; share=$2; shift 2
      mount -t proc proc "$root/proc"
      mount --rbind /dev "$root/dev"
      mount -t tmpfs -o size=16m tmpfs "$root/run"
      mount -t tmpfs -o size=64m tmpfs "$root/tmp"
      mount --bind "$share" "$root/mnt"
      ip link set lo up 2>/dev/null || true
      exec chroot "$root" "$@"
    ' in_image "$MOUNTED" "$SHARE" \
    /usr/bin/env -i "${IMAGE_ENV[@]}" ENTRYPOINT="$ENTRYPOINT" /bin/sh -c "$1" 2>&1
}

# expect NAME WANT_RC PATTERN SCRIPT: run SCRIPT in the image; pass when it exits WANT_RC and
# its output matches the extended regex PATTERN.
expect() {
  local name=$1 want_rc=$2 pattern=$3 script=$4 out rc=0
  out=$(in_image "$script") || rc=$?
  if [ "$rc" = "$want_rc" ] && printf '%s\n' "$out" | grep -q -E -- "$pattern"; then
    pass "$name"
  else
    fail "$name (exit $rc, wanted $want_rc and /$pattern/)"
    printf '%s\n' "$out" | tail -n 20 | sed 's/^/         | /' >&2
  fi
}

expect "entrypoint --version prints $VERSION" 0 "^kube-proxy-py $VERSION\$" \
  'eval "$ENTRYPOINT --version"'
expect "entrypoint --help" 0 "--proxy-mode" 'eval "$ENTRYPOINT --help"'
# Every module of the proxy imports (the Dockerfile trims kubernetes/aio, which none uses).
expect "every proxy module imports with the image's Python and packages" 0 "^imported [0-9]+ modules$" \
  'command -v python | grep -q ^/opt/kube-proxy-py/bin/python &&
   python -c "import importlib, pkgutil, proxy
names = [m.name for m in pkgutil.walk_packages(proxy.__path__, \"proxy.\")]
for name in names: importlib.import_module(name)
print(\"imported\", len(names), \"modules\")"'

expect "bad input: unknown --proxy-mode exits 1 naming it" 1 '--proxy-mode: "bogus" is not a proxy mode' \
  'eval "$ENTRYPOINT --proxy-mode=bogus --hostname-override=node-a"'
cat >"$SHARE/bad-mode.conf" <<'EOF'
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: bogus
EOF
expect "bad input: unknown mode in the config file exits 1 naming it" 1 'mode: "bogus" is not a proxy mode' \
  'NODE_NAME=node-a; export NODE_NAME; eval "$ENTRYPOINT --config=/mnt/bad-mode.conf"'

# The manifests' kube-proxy-py-apiserver ConfigMap left empty: the proxy must stop, saying so.
expect "bad input: empty KUBERNETES_SERVICE_HOST exits 1 naming the API server" 1 "no API server configured" \
  'KUBERNETES_SERVICE_HOST= KUBERNETES_SERVICE_PORT= NODE_NAME=node-a timeout 60 sh -c "$ENTRYPOINT"'
expect "iptables-nft and ip6tables-nft (nat, fresh netns)" 0 "Chain PREROUTING" \
  'iptables-nft -t nat -L -n && ip6tables-nft -t nat -L -n && iptables-nft -V | grep -q nf_tables'
expect "iptables-legacy and ip6tables-legacy (nat, fresh netns)" 0 "Chain PREROUTING" \
  'iptables-legacy -t nat -L -n && ip6tables-legacy -t nat -L -n && iptables-legacy -V | grep -q legacy'
expect "nft: a table round trip" 0 "table inet kpy_image_check" \
  'nft add table inet kpy_image_check && nft list ruleset && nft delete table inet kpy_image_check &&
   test -z "$(nft list ruleset)"'
expect "ipset: a set round trip" 0 "Name: KPY-IMAGE-CHECK" \
  'ipset create KPY-IMAGE-CHECK hash:ip && ipset add KPY-IMAGE-CHECK 198.18.0.1 && ipset list KPY-IMAGE-CHECK &&
   ipset destroy KPY-IMAGE-CHECK'
expect "conntrack: list the table" 0 "flow entries have been shown" 'conntrack -L'
# The host kernel here has no ip_vs (platform.md): only the tool itself can be checked.
expect "ipvsadm: runs and reaches the kernel" 0 "ipvsadm v[0-9]|Can.t initialize ipvs" \
  'ipvsadm --version; true'
expect "kmod: modprobe installed" 0 "kmod version" 'modprobe --version'

expect "iptables wrapper: empty node -> nft" 0 "nf_tables" 'iptables -V && ip6tables-save -V'
expect "iptables wrapper: KUBE- chains in legacy -> legacy" 0 "^legacy-save: iptables-save v[0-9.]+ \(legacy\)" \
  'iptables-legacy -t nat -N KUBE-SERVICES && iptables -V && printf "legacy-save: " && iptables-save -V'
expect "iptables wrapper: KPY_IPTABLES_MODE=nft wins over legacy rules" 0 "\(nf_tables\)" \
  'iptables-legacy -t nat -N KUBE-SERVICES && KPY_IPTABLES_MODE=nft iptables -V'
expect "iptables wrapper: bad KPY_IPTABLES_MODE is refused" 2 "not a valid iptables mode" \
  'KPY_IPTABLES_MODE=both iptables -V'

expect "python -m proxy --cleanup --proxy-mode iptables: empty netns, exit 0" 0 "cleanup done" \
  'NODE_NAME=node-a; export NODE_NAME; eval "$ENTRYPOINT --cleanup --proxy-mode iptables"'

# nftables: our table and a foreign one; --cleanup deletes ours only (the nftables backend
# loads libnftables in-process: this also proves the library is in the image).
cat >"$SHARE/nft-rules.nft" <<'EOF'
add table ip kube-proxy-py
add chain ip kube-proxy-py canary
add table ip cni-image-check
add chain ip cni-image-check pre { type nat hook prerouting priority -100 ; }
add rule ip cni-image-check pre ip daddr 198.18.7.1 return
EOF
expect "python -m proxy --cleanup: deletes our nftables table only" 0 "^nft-cleanup-verified$" '
  set -e
  nft -f /mnt/nft-rules.nft
  nft list table ip cni-image-check > /tmp/nft-foreign-before
  NODE_NAME=node-a; export NODE_NAME
  eval "$ENTRYPOINT --cleanup --proxy-mode nftables"
  if nft list table ip kube-proxy-py 2>/dev/null; then echo "our table is left"; exit 1; fi
  nft list table ip cni-image-check | cmp /tmp/nft-foreign-before -
  echo nft-cleanup-verified'

# Our chains (the proxy's jump rules and a service chain) plus a foreign CNI chain, in both
# backends; --cleanup must remove ours everywhere and leave the foreign ones byte-identical.
cat >"$SHARE/rules.txt" <<'EOF'
*nat
:KPY-SERVICES - [0:0]
:KPY-POSTROUTING - [0:0]
:KPY-SVC-IMAGECHECK - [0:0]
:CNI-IMAGE-CHECK - [0:0]
-A PREROUTING -m comment --comment "kpy service portals" -j KPY-SERVICES
-A OUTPUT -m comment --comment "kpy service portals" -j KPY-SERVICES
-A POSTROUTING -m comment --comment "kpy postrouting rules" -j KPY-POSTROUTING
-A PREROUTING -j CNI-IMAGE-CHECK
-A CNI-IMAGE-CHECK -d 198.18.7.0/24 -j RETURN
-A KPY-SERVICES -d 198.18.0.10/32 -p tcp -m tcp --dport 80 -j KPY-SVC-IMAGECHECK
-A KPY-SVC-IMAGECHECK -p tcp -j DNAT --to-destination 198.18.1.10:8080
COMMIT
*filter
:KPY-FORWARD - [0:0]
-A FORWARD -m comment --comment "kpy forwarding rules" -j KPY-FORWARD
-A FORWARD -s 198.18.7.0/24 -j ACCEPT
COMMIT
EOF
expect "python -m proxy --cleanup: removes KPY- from nft and legacy, foreign rules untouched" 0 "^cleanup-verified$" '
  set -e
  dump() { "iptables-$1-save" | grep -v -E "^(#|:[A-Z]+ [A-Z]+ \[)" | sed "s/ \[[0-9]*:[0-9]*\]//"; }
  for v in nft legacy; do
    "iptables-$v-restore" < /mnt/rules.txt
    dump "$v" | grep -v KPY- > "/tmp/foreign-before-$v"
    test "$(dump "$v" | grep -c KPY-)" -gt 0
  done
  NODE_NAME=node-a; export NODE_NAME
  eval "$ENTRYPOINT --cleanup --proxy-mode iptables"
  for v in nft legacy; do
    if dump "$v" | grep KPY-; then echo "KPY- rules left in $v"; exit 1; fi
    dump "$v" > "/tmp/foreign-after-$v"
    cmp "/tmp/foreign-before-$v" "/tmp/foreign-after-$v"
  done
  echo cleanup-verified'

# kpy-node-init against a scratch /proc/sys holding the sysctls the manifests set.
fake="$SHARE/fake"
mkdir -p "$fake/proc/sys/net/netfilter" "$fake/module/nf_conntrack/parameters"
echo 65536 >"$fake/proc/sys/net/netfilter/nf_conntrack_max"
echo 432000 >"$fake/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established"
echo 60 >"$fake/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait"
echo 16384 >"$fake/module/nf_conntrack/parameters/hashsize"
cp manifests/base/sysctls.conf "$SHARE/sysctls.conf"
printf 'net.ipv4.vs.conntrack = 1\n' >"$SHARE/ipvs-missing.conf"
node_init_env='KPY_MODULES= KPY_PROC_SYS=/mnt/fake/proc/sys KPY_SYS_MODULE=/mnt/fake/module'
expect "kpy-node-init: applies manifests/base/sysctls.conf and sizes conntrack" 0 "node ready" \
  "$node_init_env kpy-node-init /mnt/sysctls.conf"
want_max=$((32768 * $(nproc)))
[ "$want_max" -ge 131072 ] || want_max=131072
for check in "net/netfilter/nf_conntrack_max:$want_max" \
  "net/netfilter/nf_conntrack_tcp_timeout_established:86400" \
  "net/netfilter/nf_conntrack_tcp_timeout_close_wait:3600"; do
  got=$(cat "$fake/proc/sys/${check%%:*}")
  if [ "$got" = "${check##*:}" ]; then pass "kpy-node-init set ${check%%:*} = $got"; else
    fail "kpy-node-init: ${check%%:*} is $got, wanted ${check##*:}"
  fi
done
if [ "$(cat "$fake/module/nf_conntrack/parameters/hashsize")" = $((want_max / 4)) ]; then
  pass "kpy-node-init set the conntrack hashsize to $((want_max / 4))"
else
  fail "kpy-node-init: conntrack hashsize is $(cat "$fake/module/nf_conntrack/parameters/hashsize")"
fi
expect "kpy-node-init: a sysctl the kernel lacks fails, naming it" 1 \
  "ERROR: sysctl net.ipv4.vs.conntrack does not exist" \
  "$node_init_env kpy-node-init /mnt/ipvs-missing.conf"
step_done "smoke tests"

podman image unmount "$IMAGE" >/dev/null
MOUNTED=""
if [ "${KPY_KEEP_IMAGE:-0}" != 1 ]; then
  podman rmi --force "$IMAGE" >/dev/null
fi
step_done "clean-up"

# -- 5. summary -----------------------------------------------------------------------------------
total=$(($(date +%s) - STARTED))
log "timings"
printf '  %s\n' "${TIMINGS[@]}"
printf '  %4ds  total (budget %ds)\n' "$total" "$BUDGET_SECONDS"
if [ "$total" -gt "$BUDGET_SECONDS" ]; then
  echo "WARNING: image-check took ${total}s, over its ${BUDGET_SECONDS}s budget" >&2
fi
if [ "$FAILED" -gt 0 ]; then
  echo "image-check: $FAILED check(s) failed" >&2
  exit 1
fi
echo "image-check: all checks passed"
