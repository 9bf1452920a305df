#!/bin/sh
# iptables-wrapper: what `iptables`, `ip6tables` and their -save/-restore run inside the image.
#
# Installed as /usr/sbin/iptables-wrapper and registered (Dockerfile) as the highest-priority
# alternative for those six names, so a person who runs `kubectl exec ... iptables-save` lands
# on the same backend (nf_tables or legacy) as the proxy, never on the other one.
#
# The rule is the proxy's own (proxy/kernel/iptables.py `detect_variant`), per family:
#   1. KPY_IPTABLES_MODE=nft|legacy forces the backend;
#   2. else the only backend holding KUBE-* or KPY-* chains wins;
#   3. else the backend holding more rules wins; a tie means nft.
# Upstream's iptables-wrapper (kubernetes-sigs/iptables-wrappers) decides the same way, but
# rewrites the alternatives on first use; this one decides on every call and changes nothing,
# so it works on a read-only root filesystem and can never flip-flop mid-session.
# The proxy itself never calls these names: it runs iptables-nft* / iptables-legacy* directly.
set -eu

name=${0##*/}
case "$name" in
  iptables | iptables-save | iptables-restore)
    family=iptables
    suffix=${name#iptables}
    ;;
  ip6tables | ip6tables-save | ip6tables-restore)
    family=ip6tables
    suffix=${name#ip6tables}
    ;;
  *)
    echo "iptables-wrapper: called as '$name'; link it as iptables, ip6tables or their -save/-restore" >&2
    exit 2
    ;;
esac

mode=$(printf '%s' "${KPY_IPTABLES_MODE:-}" | tr '[:upper:]' '[:lower:]')
case "$mode" in
  nft | legacy | "") ;;
  *)
    echo "iptables-wrapper: KPY_IPTABLES_MODE='${KPY_IPTABLES_MODE}' is not a valid iptables mode (use nft or legacy)" >&2
    exit 2
    ;;
esac

if [ -z "$mode" ]; then
  # `|| true`: a backend whose kernel side is missing simply holds nothing.
  legacy_dump=$("${family}-legacy-save" 2>/dev/null || true)
  nft_dump=$("${family}-nft-save" 2>/dev/null || true)
  legacy_kube=$(printf '%s\n' "$legacy_dump" | grep -c -E '^:(KUBE-|KPY-)' || true)
  nft_kube=$(printf '%s\n' "$nft_dump" | grep -c -E '^:(KUBE-|KPY-)' || true)
  legacy_rules=$(printf '%s\n' "$legacy_dump" | grep -c '^-A ' || true)
  nft_rules=$(printf '%s\n' "$nft_dump" | grep -c '^-A ' || true)
  if [ "$legacy_kube" -gt 0 ] && [ "$nft_kube" -eq 0 ]; then
    mode=legacy
  elif [ "$nft_kube" -gt 0 ] && [ "$legacy_kube" -eq 0 ]; then
    mode=nft
  elif [ "$legacy_rules" -gt "$nft_rules" ]; then
    mode=legacy
  else
    mode=nft
  fi
fi

exec "/usr/sbin/${family}-${mode}${suffix}" "$@"
