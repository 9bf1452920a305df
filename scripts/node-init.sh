#!/bin/sh
# kpy-node-init: the DaemonSet's short privileged init step (installed in the image as
# /usr/local/sbin/kpy-node-init). It prepares the node the way kube-proxy prepares it at
# start-up, so that the long-running proxy container needs only NET_ADMIN and NET_RAW:
#
#   1. load the kernel modules named in KPY_MODULES (space-separated, e.g. "nf_conntrack" or,
#      for ipvs, "ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh nf_conntrack"); a module that is missing or
#      built in is logged, not fatal: the sysctl step below tells whether it mattered;
#   2. size the conntrack table as kube-proxy does: nf_conntrack_max = max(
#      KPY_CONNTRACK_MAX_PER_CORE x CPUs, KPY_CONNTRACK_MIN) (defaults 32768 and 131072, set
#      either per-core value to 0 to leave it alone) and the hash size to a quarter of that.
#      Unlike kube-proxy, a larger value already set by someone else is never lowered;
#   3. apply the sysctl file given as $1 (the ConfigMap's sysctls.conf): one `key = value`
#      per line, key dotted or slashed, `#` comments; a key prefixed with `-` is optional
#      (skipped with a log line when the kernel lacks it), any other failure is fatal and
#      names the key, so `kubectl logs <pod> -c node-init` shows what cannot work.
#
# KPY_PROC_SYS and KPY_SYS_MODULE (defaults /proc/sys and /sys/module) exist for the image
# check, which runs this script against a scratch directory instead of the host's kernel.
set -eu

proc_sys=${KPY_PROC_SYS:-/proc/sys}
sys_module=${KPY_SYS_MODULE:-/sys/module}
sysctl_file=${1:-}

log() { printf 'kpy-node-init: %s\n' "$*" >&2; }
fail() {
  log "ERROR: $*"
  exit 1
}

is_uint() {
  case "$1" in
    '' | *[!0-9]*) return 1 ;;
    *) return 0 ;;
  esac
}

# set_sysctl KEY VALUE OPTIONAL(0|1): write VALUE unless it is already the value.
set_sysctl() {
  path="$proc_sys/$(printf '%s' "$1" | tr . /)"
  if [ ! -e "$path" ]; then
    if [ "$3" = 1 ]; then
      log "skip $1 (optional; not in this kernel)"
      return 0
    fi
    fail "sysctl $1 does not exist on this node ($path); load its module (KPY_MODULES) or remove it from the sysctl file"
  fi
  current=$(cat "$path")
  if [ "$current" = "$2" ]; then
    log "keep $1 = $2"
    return 0
  fi
  if ! printf '%s\n' "$2" >"$path" 2>/dev/null; then
    fail "cannot set sysctl $1 = $2 (was $current); the init container must be privileged"
  fi
  log "set $1 = $2 (was $current)"
}

load_modules() {
  for module in ${KPY_MODULES:-}; do
    if [ -d "$sys_module/$module" ]; then
      log "module $module already loaded"
    elif modprobe "$module" 2>/dev/null; then
      log "module $module loaded"
    else
      log "module $module not loaded (missing or built in); continuing"
    fi
  done
}

size_conntrack() {
  per_core=${KPY_CONNTRACK_MAX_PER_CORE:-32768}
  floor=${KPY_CONNTRACK_MIN:-131072}
  is_uint "$per_core" || fail "KPY_CONNTRACK_MAX_PER_CORE='$per_core' is not a non-negative integer"
  is_uint "$floor" || fail "KPY_CONNTRACK_MIN='$floor' is not a non-negative integer"
  if [ "$per_core" -eq 0 ]; then
    log "conntrack table size left alone (KPY_CONNTRACK_MAX_PER_CORE=0)"
    return 0
  fi
  want=$((per_core * $(nproc)))
  [ "$want" -ge "$floor" ] || want=$floor
  max_path="$proc_sys/net/netfilter/nf_conntrack_max"
  [ -e "$max_path" ] || fail "net.netfilter.nf_conntrack_max does not exist: nf_conntrack is not loaded (add it to KPY_MODULES)"
  current=$(cat "$max_path")
  if [ "$current" -ge "$want" ]; then
    log "keep net.netfilter.nf_conntrack_max = $current (wanted at least $want)"
  else
    set_sysctl net.netfilter.nf_conntrack_max "$want" 0
  fi
  hash_path="$sys_module/nf_conntrack/parameters/hashsize"
  if [ -w "$hash_path" ] && [ "$(cat "$hash_path")" -lt $((want / 4)) ]; then
    printf '%s\n' $((want / 4)) >"$hash_path" || fail "cannot set the nf_conntrack hashsize to $((want / 4))"
    log "set nf_conntrack hashsize = $((want / 4))"
  fi
}

apply_file() {
  [ -n "$sysctl_file" ] || return 0
  [ -r "$sysctl_file" ] || fail "sysctl file $sysctl_file is not readable"
  line_no=0
  while IFS= read -r line || [ -n "$line" ]; do
    line_no=$((line_no + 1))
    line=${line%%#*}
    case "$line" in *[![:space:]]*) ;; *) continue ;; esac
    case "$line" in
      *=*) ;;
      *) fail "$sysctl_file:$line_no: '$line' is not 'key = value'" ;;
    esac
    key=$(printf '%s' "${line%%=*}" | tr -d '[:space:]')
    value=$(printf '%s' "${line#*=}" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
    optional=0
    case "$key" in -*)
      optional=1
      key=${key#-}
      ;;
    esac
    [ -n "$key" ] || fail "$sysctl_file:$line_no: empty key"
    [ -n "$value" ] || fail "$sysctl_file:$line_no: $key has no value"
    set_sysctl "$key" "$value" "$optional"
  done <"$sysctl_file"
}

load_modules
size_conntrack
apply_file
log "node ready"
