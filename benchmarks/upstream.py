"""Upstream kube-proxy's iptables ruleset for the same services, for the raw tool to load.

Written from the rules of kubernetes `pkg/proxy/iptables/proxier.go` (`syncProxyRules`
and `writeServiceToEndpointRules`, current layout since KEP-3453), not from our
renderer: what upstream's iptables mode would restore for ClusterIP TCP services with
ready endpoints on a node whose cluster CIDR is known. Per service port:

    KUBE-SERVICES  -d VIP --dport P              -> KUBE-SVC-<hash(port name + proto)>
    KUBE-SVC-...   -d VIP --dport P ! -s CIDR    -> KUBE-MARK-MASQ
    KUBE-SVC-...   statistic 1/n, 1/(n-1), ..    -> KUBE-SEP-<hash(name + proto + ip:port)>
    KUBE-SEP-...   -s ENDPOINT                   -> KUBE-MARK-MASQ
    KUBE-SEP-...   DNAT --to-destination ENDPOINT

plus the fixed chains (KUBE-POSTROUTING, KUBE-MARK-MASQ, KUBE-NODEPORTS, the filter
table's KUBE-FORWARD and friends) and, as upstream does past 1,000 endpoints
(`largeClusterEndpointsThreshold`), no per-endpoint comments. Chain names are upstream's:
base32 of SHA-256, 16 characters. The jumps from the built-in chains (which upstream
ensures with single `iptables -I` calls before the restore) are part of the text, so the
input is loadable alone into an empty namespace. Pure: text in memory only.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable

from benchmarks.workload import SERVICE_PORT, ServiceSpec

LARGE_CLUSTER_ENDPOINTS = 1000
MASQ_MARK = "0x4000"


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def svc_chain(spec: ServiceSpec) -> str:
    return "KUBE-SVC-" + _hash16(spec.port_name + "tcp")


def sep_chain(spec: ServiceSpec, endpoint: str) -> str:
    return "KUBE-SEP-" + _hash16(spec.port_name + "tcp" + endpoint)


def ruleset(services: Iterable[ServiceSpec], *, cluster_cidr: str) -> str:
    """The iptables-restore input upstream would write for `services` (filter, then nat)."""
    specs = list(services)
    large = sum(len(s.endpoints) for s in specs) > LARGE_CLUSTER_ENDPOINTS
    filter_lines = [
        "*filter",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-EXTERNAL-SERVICES - [0:0]",
        ":KUBE-FORWARD - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-PROXY-FIREWALL - [0:0]",
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment "
        '"kubernetes service portals" -j KUBE-SERVICES',
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "
        '"kubernetes service portals" -j KUBE-SERVICES',
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
    ]
    chains = [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
    ]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
    ]
    for spec in specs:
        svc = svc_chain(spec)
        chains.append(f":{svc} - [0:0]")
        match = (
            f'-m comment --comment "{spec.port_name} cluster IP" -m tcp -p tcp '
            f"-d {spec.vip}/32 --dport {SERVICE_PORT}"
        )
        rules.append(f"-A KUBE-SERVICES {match} -j {svc}")
        rules.append(f"-A {svc} {match} ! -s {cluster_cidr} -j KUBE-MARK-MASQ")
        count = len(spec.endpoints)
        for index, endpoint in enumerate(spec.endpoints):
            sep = sep_chain(spec, endpoint)
            chains.append(f":{sep} - [0:0]")
            comment = "" if large else f'-m comment --comment "{spec.port_name} -> {endpoint}" '
            left = count - index
            chance = (
                "" if left == 1 else f"-m statistic --mode random --probability {1 / left:.10f} "
            )
            rules.append(f"-A {svc} {comment}{chance}-j {sep}")
            sep_comment = "" if large else f"-m comment --comment {spec.port_name} "
            ip = endpoint.rsplit(":", 1)[0]
            rules.append(f"-A {sep} {sep_comment}-s {ip}/32 -j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} {sep_comment}-m tcp -p tcp -j DNAT --to-destination {endpoint}")
    rules.append(
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must '
        'be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'
    )
    return "\n".join([*filter_lines, *chains, *rules, "COMMIT", ""])
