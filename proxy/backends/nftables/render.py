"""Pure rendering of the nftables ruleset: ServicePortState -> `nft -f` script text.

Nothing here runs a tool or keeps state between calls. `render_port` turns one service
port into the map and set elements it owns (`PortElements`); `render_full` writes the
whole table, `render_partial` the element operations (and any new shared chains) that
take the kernel from a set of old port states to new ones. The backend
(`proxy.backends.nftables.backend`) decides which to write.

Layout: one table of our own, ``ip kube-proxy-py`` (``ip6`` for IPv6), nothing outside
it. Services are dispatched by verdict maps and endpoints live in two global maps,
so a service port owns no chain, no rule and no set of its own; only elements::

    nat-prerouting, nat-output (nat, dstnat) -> services
      ip daddr . l4proto . dport vmap @service-ips  -> goto cluster-P-N / external[-local]-P-N
      fib daddr local, l4proto . dport vmap @service-nodeports -> goto nodeport[-local]-P-N
    cluster-P-N          (P the protocol, N the number of endpoints) masquerade off-cluster
                         sources (or all), then
                         dnat to ip daddr . P dport . numgen random mod N map @ip-endpoints-P
    external[-local]-P-N (externalIPs, LoadBalancer IPs) masquerade (Cluster policy) or only
                         node-originated traffic (Local), then the same dnat
    nodeport[-local]-P-N the same, keyed by P dport in @nodeport-endpoints-P
    external-local-P-N-M, nodeport-local-P-N-M (externalTrafficPolicy Local): traffic
                         from pods and from the node goes to the M cluster-wide endpoints
                         (@short-circuit-P, @nodeport-short-circuit-P), the rest to the N
                         local ones (no rule when N is 0: the filter below drops it)
    nat-postrouting -> masquerading: hairpin (ct status dnat, ip saddr . ip daddr @hairpin)
                         and marked packets are masqueraded
    filter-prerouting, filter-output (filter, dstnat-10, ct state new) -> firewall-check:
      loadBalancerSourceRanges: a destination in @firewall-ips whose
      daddr . l4proto . dport . saddr is not in @firewall-allow (intervals) is dropped
    filter-input/forward/output (filter, dstnat-10, ct state new) -> endpoints-check:
      @no-endpoint-services / @no-endpoint-nodeports: goto reject-chain, or drop (Local
      policy with endpoints elsewhere)
    canary: an empty chain; gone means someone flushed or deleted our table

Session affinity (ClientIP) is the exception to "elements only", as upstream has it: a
port with affinity owns, per endpoint, a set of client addresses with the timeout and
a chain that refreshes it and DNATs, plus a chain that sends a known client to its
endpoint and picks one at random for the others (see `_affinity`); its ClusterIP,
NodePort and external elements go to those chains. Affinity is per destination
address, and not applied to external traffic under the Local policy.

`N` is the number of endpoints: the shared chain `cluster-tcp-3` serves every TCP
ClusterIP with three endpoints; element ``VIP . 80 . i : IP . PORT`` (i < 3) of
@ip-endpoints-tcp holds its i-th endpoint (one endpoint map per protocol, see
`endpoint_map`). An endpoint replaced is two element operations; a service growing
from 3 to 4 endpoints also moves its @service-ips element from ``goto cluster-tcp-3``
to ``goto cluster-tcp-4``. Rules and chains change only
when a new `N` first appears (its chain is added) or on a full sync.

Why this layout (measured at 10k services x 10 endpoints, nft 1.0.6, kernel 6.18,
ClusterIP TCP, scripts from /tmp generators recorded in the backend docstring):

- upstream's (a chain per service and per endpoint, an anonymous numgen vmap per
  service): 0.87 s at 1k services, 11.1 s at 3k: every anonymous map makes the next
  one scan all sets, so it grows with the square (131 s at 10k in performance.md);
- a named endpoint map per service (10k sets): 8.7 s full, one endpoint 103 ms;
  the same with an interval map (fixed modulus, elements-only changes): 11.4 s and
  4.3 s per change (nft reads the intervals back);
- one global endpoint map bound by one rule per service (numgen ... offset): 14.8 s,
  because the kernel checks every element against every rule bound to its map
  (elements x bindings); elements first is worse, 108 s (every binding walks them);
- this layout (one global map bound by one rule per distinct N): 2.2 s full load,
  one endpoint replaced 16 ms p50, a service growing by one endpoint 16 ms p50
  through `nft -f` (0.5 ms in-process through libnftables).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from proxy.model import Endpoint, IPFamily, NodeContext, ServicePortState

TABLE = "kube-proxy-py"
CANARY = "canary"

SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
IP_ENDPOINTS = "ip-endpoints"
"""Per protocol: `ip-endpoints-tcp`, ... (see `endpoint_map`)."""
NODEPORT_ENDPOINTS = "nodeport-endpoints"
PROTOCOLS = ("tcp", "udp", "sctp")
SHORT_CIRCUIT = "short-circuit"
"""Per protocol: cluster-wide endpoints of Local-policy external destinations."""
NODEPORT_SHORT_CIRCUIT = "nodeport-short-circuit"
FIREWALL_IPS = "firewall-ips"
FIREWALL_ALLOW = "firewall-allow"
HAIRPIN = "hairpin"
NODEPORT_IPS = "nodeport-ips"
CLUSTER_CIDRS = "cluster-cidrs"

REJECT = "goto reject-chain"
DROP = "drop"

CLUSTER = "cluster"
EXTERNAL = "external"
EXTERNAL_LOCAL = "external-local"
NODEPORT = "nodeport"
NODEPORT_LOCAL = "nodeport-local"
# The shared dnat chains: `<kind>-<protocol>-<N>`, and for the Local kinds
# `<kind>-<protocol>-<N>-<M>` (N local endpoints, M cluster-wide ones for the short-circuit).
_DNAT_CHAIN = re.compile(
    r"^(cluster|external|external-local|nodeport|nodeport-local)-(tcp|udp|sctp)-(\d+)(?:-(\d+))?$"
)

ELEMENT_CHUNK = 2000
"""Elements per `add element` command in a full sync (keeps each line short)."""

Element = tuple[str, str, str | None]
"""(map or set, key, value or None for a set): one element, as the script spells it."""


@dataclass(frozen=True, slots=True)
class RenderContext:
    """Everything outside a `ServicePortState` that changes the rendered table.

    When it changes the backend syncs fully.
    """

    family: IPFamily
    mark: str
    """The masquerade mark as nft prints it, e.g. "0x00004000"."""
    cluster_cidrs: tuple[str, ...]
    masquerade_all: bool
    nodeport_scope: tuple[str, ...] | None
    """CIDRs where NodePorts are open; None means every local address."""
    node_ips: tuple[str, ...] = ()
    """This node's addresses of this family (loadBalancerSourceRanges that hold one of
    them also allow the LoadBalancer IPs themselves as sources, as upstream)."""

    @classmethod
    def build(cls, node: NodeContext, *, family: IPFamily, masquerade_bit: int) -> RenderContext:
        return cls(
            family=family,
            mark=f"0x{1 << masquerade_bit:08x}",
            cluster_cidrs=tuple(
                str(ipaddress.ip_network(cidr.strip(), strict=False))
                for cidr in node.cluster_cidrs
                if _family(cidr) == family
            ),
            masquerade_all=node.masquerade_all,
            nodeport_scope=nodeport_scope(node, family),
            node_ips=tuple(ip for ip in node.node_ips if _family(ip) == family),
        )

    @property
    def nfproto(self) -> str:
        """The table family and address-selector keyword: "ip" or "ip6"."""
        return "ip6" if self.family is IPFamily.V6 else "ip"

    @property
    def table(self) -> str:
        return f"{self.nfproto} {TABLE}"

    @property
    def addr_type(self) -> str:
        return "ipv6_addr" if self.family is IPFamily.V6 else "ipv4_addr"


def _family(address: str) -> IPFamily:
    return IPFamily.V6 if ":" in address else IPFamily.V4


def nodeport_scope(node: NodeContext, family: IPFamily) -> tuple[str, ...] | None:
    """Where NodePorts are open for `family` (`--nodeport-addresses`): None for every
    local address, else CIDRs (an empty tuple opens them nowhere). "primary" means this
    node's own addresses; a zero-length prefix means everywhere."""
    if not node.nodeport_addresses:
        return None
    host = "/128" if family is IPFamily.V6 else "/32"
    scope: list[str] = []
    for entry in node.nodeport_addresses:
        if entry.strip() == "primary":
            scope.extend(f"{ip}{host}" for ip in node.node_ips if _family(ip) == family)
        elif _family(entry) == family:
            network = ipaddress.ip_network(entry.strip(), strict=False)
            if network.prefixlen == 0:
                return None
            scope.append(str(network))
    return tuple(dict.fromkeys(scope))


OwnedSet = tuple[str, str, str]
"""("set" or "map", name, declaration): a set or map one service port owns."""
OwnedChain = tuple[str, tuple[str, ...]]
"""(name, rules): a chain one service port owns."""


@dataclass(frozen=True, slots=True)
class PortElements:
    """What one service port puts into the shared maps and sets, and what it owns.

    Only ports with session affinity own anything (sets, maps and chains named after a
    hash of the port, see `_affinity`); every other port is elements only.
    """

    elements: tuple[Element, ...]
    chains: frozenset[str]
    """The shared dnat chains its verdict elements jump to (they must exist)."""
    hairpin: tuple[str, ...]
    """Addresses of its endpoints, each once: each needs an `ip . ip` element in @hairpin."""
    sets: tuple[OwnedSet, ...] = ()
    owned_chains: tuple[OwnedChain, ...] = ()


# -- per-port rendering -------------------------------------------------------------


def _any_usable(state: ServicePortState) -> bool:
    """Some endpoint could serve, just not from this node's point of view."""
    return any(endpoint.ready or endpoint.serving for endpoint in state.all_endpoints)


def _of_family(endpoints: Iterable[Endpoint], v6: bool) -> list[Endpoint]:
    return [endpoint for endpoint in endpoints if (":" in endpoint.ip) is v6]


def endpoint_map(base: str, proto: str) -> str:
    """The endpoint map of one protocol.

    One map per protocol because the map's data must be typed `tcp dport` (or udp,
    sctp): nft 1.0.6 cannot read a map typed `ip daddr . th dport` back from the kernel
    and then refuses every later rule using it ("conflicting protocols ip vs. th"),
    and a `tcp dport` data type makes the dnat rule match TCP only.
    """
    return f"{base}-{proto}"


def _endpoint_elements(
    out: list[Element], table: str, key: str, endpoints: Sequence[Endpoint]
) -> None:
    out.extend(
        (table, f"{key} . {index}", f"{endpoint.ip} . {endpoint.port}")
        for index, endpoint in enumerate(endpoints)
    )


def render_port(state: ServicePortState, ctx: RenderContext) -> PortElements:
    """The elements one service port owns (see the module docstring for the maps)."""
    port = state.port
    proto = port.protocol.value.lower()
    v6 = ctx.family is IPFamily.V6
    cluster = _of_family(state.cluster_endpoints, v6)
    external = (
        cluster
        if state.external_endpoints == state.cluster_endpoints
        else _of_family(state.external_endpoints, v6)
    )
    out: list[Element] = []
    chains: set[str] = set()
    seen: set[str] = set()
    ip_map = endpoint_map(IP_ENDPOINTS, proto)
    local = port.external_policy_local
    affinity = (
        _affinity(
            str(port.name), proto, cluster, seconds=port.session_affinity_seconds, ctx=ctx, out=out
        )
        if port.session_affinity_seconds is not None and cluster
        else None
    )

    # ClusterIPs: cluster endpoints, or reject (drop when only the Local internal
    # policy leaves none while endpoints exist elsewhere: clients retry elsewhere).
    for vip in port.cluster_ips:
        if (":" in vip) is not v6 or vip in seen:
            continue
        seen.add(vip)
        key = f"{vip} . {proto} . {port.port}"
        if affinity is not None:
            out.append((SERVICE_IPS, key, f"goto {affinity.cluster}"))
        elif cluster:
            chain = f"{CLUSTER}-{proto}-{len(cluster)}"
            chains.add(chain)
            out.append((SERVICE_IPS, key, f"goto {chain}"))
            _endpoint_elements(out, ip_map, f"{vip} . {port.port}", cluster)
        else:
            local_only = port.internal_policy_local and _any_usable(state)
            out.append((NO_ENDPOINT_SERVICES, key, DROP if local_only else REJECT))

    # External destinations: externalIPs, LoadBalancer IPs and the NodePort, external
    # endpoints. With the Local policy, traffic from pods and from the node itself is
    # short-circuited to the cluster-wide endpoints (as if it had gone out to a load
    # balancer and come back): the chain `<kind>-local-P-N-M` reaches N local and M
    # cluster-wide endpoints, and exists as long as M > 0, even when N is 0.
    # Session affinity holds on the external paths too, except with the Local policy.
    external_affinity = affinity.external if affinity is not None and not local else None
    no_external = DROP if local and (bool(cluster) or _any_usable(state)) else REJECT
    # Both policies Local: pods and the node still reach every endpoint (the core's
    # short_circuit_endpoints); else the cluster endpoints are the short-circuit's.
    short_circuit = (
        cluster
        if state.short_circuit_endpoints is None
        else _of_family(state.short_circuit_endpoints, v6)
    )
    reachable = bool(short_circuit) if local else bool(external)
    lb_ips = {address for address in port.load_balancer_ips if (":" in address) is v6}
    for address in (*port.external_ips, *port.load_balancer_ips):
        if (":" in address) is not v6 or address in seen:
            continue
        seen.add(address)
        key = f"{address} . {proto} . {port.port}"
        base = f"{address} . {port.port}"
        if external_affinity is not None:
            out.append((SERVICE_IPS, key, f"goto {external_affinity}"))
        elif reachable:
            chain = _external_chain(EXTERNAL, proto, local, external, short_circuit)
            chains.add(chain)
            out.append((SERVICE_IPS, key, f"goto {chain}"))
            _endpoint_elements(out, ip_map, base, external)
            if local:
                _endpoint_elements(out, endpoint_map(SHORT_CIRCUIT, proto), base, short_circuit)
        if not external:
            out.append((NO_ENDPOINT_SERVICES, key, no_external))
        if address in lb_ips and port.load_balancer_source_ranges:
            out.extend(_firewall(key, port.load_balancer_source_ranges, lb_ips, ctx))

    if port.node_port and ctx.nodeport_scope != ():
        key = f"{proto} . {port.node_port}"
        base = str(port.node_port)
        if external_affinity is not None:
            out.append((SERVICE_NODEPORTS, key, f"goto {external_affinity}"))
        elif reachable:
            chain = _external_chain(NODEPORT, proto, local, external, short_circuit)
            chains.add(chain)
            out.append((SERVICE_NODEPORTS, key, f"goto {chain}"))
            _endpoint_elements(out, endpoint_map(NODEPORT_ENDPOINTS, proto), base, external)
            if local:
                short = endpoint_map(NODEPORT_SHORT_CIRCUIT, proto)
                _endpoint_elements(out, short, base, short_circuit)
        if not external:
            out.append((NO_ENDPOINT_NODEPORTS, key, no_external))

    # In endpoint order (a frozenset's order changes with the hash seed, and so would
    # the script).
    hairpin = tuple(
        dict.fromkeys(endpoint.ip for endpoint in (*cluster, *external, *short_circuit))
    )
    if affinity is None:
        return PortElements(tuple(out), frozenset(chains), hairpin)
    return PortElements(tuple(out), frozenset(chains), hairpin, affinity.sets, affinity.chains)


def _hash(text: str) -> str:
    """16 base32 characters of sha256(text): unique names for what a port owns."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()[:10]).decode()


@dataclass(frozen=True, slots=True)
class _Affinity:
    cluster: str
    """The chain ClusterIP traffic goes to."""
    external: str
    """The chain external traffic (Cluster policy) goes to."""
    sets: tuple[OwnedSet, ...]
    chains: tuple[OwnedChain, ...]


def _affinity(
    name: str,
    proto: str,
    endpoints: Sequence[Endpoint],
    *,
    seconds: int,
    ctx: RenderContext,
    out: list[Element],
) -> _Affinity:
    """ClientIP session affinity, as upstream's nftables proxier has it.

    Per endpoint, a set of client addresses with the affinity timeout
    (`affinity-<h>`, updated on every new connection) and a chain that updates it and
    DNATs (`endpoint-<h>`); per port, a chain that sends a known client to its
    endpoint and picks one at random for the others (`affinity-<hs>`, through the
    verdict map `affinity-pick-<hs>`), and one for external traffic that marks for
    masquerade first (`affinity-external-<hs>`). The names hash the port, the endpoint
    and the timeout, so an endpoint that stays keeps its set (and its clients) across
    syncs, and a new timeout makes new sets. Endpoint changes here change rules: a
    client's affinity lives in the kernel, per endpoint, and goes with its endpoint.
    """
    ip = ctx.nfproto
    port_hash = _hash(f"{name}/{proto}")
    sets: list[OwnedSet] = []
    chains: list[OwnedChain] = []
    picks: list[str] = []
    pick_map = f"affinity-pick-{port_hash}"
    for index, endpoint in enumerate(endpoints):
        endpoint_hash = _hash(f"{name}/{proto}/{endpoint.address()}/{seconds}")
        client_set, endpoint_chain = f"affinity-{endpoint_hash}", f"endpoint-{endpoint_hash}"
        sets.append(
            (
                "set",
                client_set,
                f"{{ type {ctx.addr_type}; flags dynamic,timeout; timeout {seconds}s; }}",
            )
        )
        chains.append(
            (
                endpoint_chain,
                (
                    f"update @{client_set} {{ {ip} saddr }}",
                    f"meta l4proto {proto} dnat to {endpoint.address()}",
                ),
            )
        )
        picks.append(f"{ip} saddr @{client_set} goto {endpoint_chain}")
        out.append((pick_map, str(index), f"goto {endpoint_chain}"))
    sets.append(("map", pick_map, "{ typeof numgen random mod 1 : verdict; }"))
    cluster_chain, external_chain = f"affinity-{port_hash}", f"affinity-external-{port_hash}"
    masquerade = _masquerade_off_cluster(ctx)
    cluster_rules = (
        *([] if masquerade is None else [masquerade]),
        *picks,
        f"numgen random mod {len(endpoints)} vmap @{pick_map}",
    )
    chains.append((cluster_chain, cluster_rules))
    chains.append((external_chain, ("jump mark-for-masquerade", f"goto {cluster_chain}")))
    return _Affinity(cluster_chain, external_chain, tuple(sets), tuple(chains))


def _external_chain(
    kind: str, proto: str, local: bool, external: Sequence[Endpoint], cluster: Sequence[Endpoint]
) -> str:
    if local:
        return f"{kind}-local-{proto}-{len(external)}-{len(cluster)}"
    return f"{kind}-{proto}-{len(external)}"


def _firewall(
    key: str, ranges: Sequence[str], lb_ips: Iterable[str], ctx: RenderContext
) -> list[Element]:
    """loadBalancerSourceRanges of one LoadBalancer IP and port: the destination is
    checked (`firewall-ips`) and only the listed sources pass (`firewall-allow`).

    As upstream: when a range holds this node's address, the LoadBalancer IPs are
    allowed as sources too (a VIP-like load balancer delivers the node's own requests
    with the VIP as source). NodePorts are not subject to the ranges.
    """
    networks = [
        ipaddress.ip_network(cidr.strip(), strict=False)
        for cidr in ranges
        if _family(cidr) == ctx.family
    ]
    out: list[Element] = [(FIREWALL_IPS, key, None)]
    out.extend((FIREWALL_ALLOW, f"{key} . {network}", None) for network in networks)
    if any(ipaddress.ip_address(ip) in network for ip in ctx.node_ips for network in networks):
        host = "/128" if ctx.family is IPFamily.V6 else "/32"
        out.extend((FIREWALL_ALLOW, f"{key} . {ip}{host}", None) for ip in sorted(lb_ips))
    return out


# -- shared chains ------------------------------------------------------------------


def _masquerade_off_cluster(ctx: RenderContext) -> str | None:
    """The rule marking ClusterIP traffic from outside the cluster CIDRs (or all)."""
    if ctx.masquerade_all:
        return "jump mark-for-masquerade"
    if len(ctx.cluster_cidrs) == 1:
        return f"{ctx.nfproto} saddr != {ctx.cluster_cidrs[0]} jump mark-for-masquerade"
    if ctx.cluster_cidrs:
        return f"{ctx.nfproto} saddr != @{CLUSTER_CIDRS} jump mark-for-masquerade"
    return None


def _pods(ctx: RenderContext) -> str | None:
    """A match for traffic from pods (the cluster CIDRs), if they are known."""
    if len(ctx.cluster_cidrs) == 1:
        return f"{ctx.nfproto} saddr {ctx.cluster_cidrs[0]}"
    if ctx.cluster_cidrs:
        return f"{ctx.nfproto} saddr @{CLUSTER_CIDRS}"
    return None


def parse_dnat_chain(chain: str) -> tuple[str, str, int, int]:
    """`<kind>-<protocol>-<N>[-<M>]` -> (kind, protocol, N, M); M is 0 when absent."""
    match = _DNAT_CHAIN.match(chain)
    if match is None:
        raise ValueError(f"not a dnat chain: {chain}")
    kind, proto, n, m = match.groups()
    return kind, proto, int(n), int(m or 0)


def dnat_chain_rules(chain: str, ctx: RenderContext) -> list[str]:
    """The rules of a shared dnat chain, from its name (see `parse_dnat_chain`)."""
    kind, proto, n, m = parse_dnat_chain(chain)
    ip = ctx.nfproto
    if kind in (NODEPORT, NODEPORT_LOCAL):
        endpoints, short = NODEPORT_ENDPOINTS, NODEPORT_SHORT_CIRCUIT
        key = f"{proto} dport"
    else:
        endpoints, short = IP_ENDPOINTS, SHORT_CIRCUIT
        key = f"{ip} daddr . {proto} dport"

    def dnat(count: int, table: str) -> str:
        return f"dnat to {key} . numgen random mod {count} map @{endpoint_map(table, proto)}"

    rules: list[str] = []
    if kind == CLUSTER:
        masquerade = _masquerade_off_cluster(ctx)
        if masquerade is not None:
            rules.append(masquerade)
    elif kind in (EXTERNAL, NODEPORT):
        # Cluster policy: the endpoint may be on another node, whose reply must come back.
        rules.append("jump mark-for-masquerade")
    else:
        # Local policy keeps the client's address. Pods and the node itself go to the
        # cluster-wide endpoints instead; the node's own traffic is masqueraded (its
        # source would be the destination address itself).
        pods = _pods(ctx)
        if pods is not None:
            rules.append(f"{pods} {dnat(m, short)}")
        rules.append("fib saddr type local jump mark-for-masquerade")
        rules.append(f"fib saddr type local {dnat(m, short)}")
    if n:
        rules.append(dnat(n, endpoints))
    return rules


def render_chains(chains: Iterable[str], ctx: RenderContext) -> Iterator[str]:
    """`add chain` and its rules for each shared dnat chain (new chains only)."""
    table = ctx.table
    for chain in chains:
        yield f"add chain {table} {chain}\n"
        for rule in dnat_chain_rules(chain, ctx):
            yield f"add rule {table} {chain} {rule}\n"


def _nodeport_match(ctx: RenderContext) -> str | None:
    """What a packet must match to be a NodePort packet (None: NodePorts are off)."""
    ip = ctx.nfproto
    if ctx.nodeport_scope is None:
        loopback = "::1" if ctx.family is IPFamily.V6 else "127.0.0.0/8"
        return f"fib daddr type local {ip} daddr != {loopback}"
    if not ctx.nodeport_scope:
        return None
    return f"fib daddr type local {ip} daddr @{NODEPORT_IPS}"


def render_static(ctx: RenderContext) -> list[str]:
    """The table's skeleton: base chains, helper chains, maps and sets, no elements."""
    t = ctx.table
    ip = ctx.nfproto
    addr = ctx.addr_type
    lines = [
        f"add chain {t} {CANARY}",
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority -100; }}",
        f"add chain {t} nat-output {{ type nat hook output priority -100; }}",
        f"add chain {t} nat-postrouting {{ type nat hook postrouting priority 100; }}",
        # Filter before DNAT (dstnat - 10), so the rules see the service address.
        f"add chain {t} filter-input {{ type filter hook input priority -110; }}",
        f"add chain {t} filter-forward {{ type filter hook forward priority -110; }}",
        f"add chain {t} filter-output {{ type filter hook output priority -110; }}",
        f"add chain {t} filter-prerouting {{ type filter hook prerouting priority -110; }}",
        *(
            f"add chain {t} {chain}"
            for chain in (
                "services",
                "masquerading",
                "mark-for-masquerade",
                "endpoints-check",
                "firewall-check",
                "reject-chain",
            )
        ),
        f"add map {t} {SERVICE_IPS} {{ type {addr} . inet_proto . inet_service : verdict; }}",
        f"add map {t} {SERVICE_NODEPORTS} {{ type inet_proto . inet_service : verdict; }}",
        f"add map {t} {NO_ENDPOINT_SERVICES} "
        f"{{ type {addr} . inet_proto . inet_service : verdict; }}",
        f"add map {t} {NO_ENDPOINT_NODEPORTS} {{ type inet_proto . inet_service : verdict; }}",
        *(
            f"add map {t} {endpoint_map(IP_ENDPOINTS, p)} {{ typeof {ip} daddr . {p} dport . "
            f"numgen random mod 1 : {ip} daddr . {p} dport; }}"
            for p in PROTOCOLS
        ),
        *(
            f"add map {t} {endpoint_map(NODEPORT_ENDPOINTS, p)} {{ typeof {p} dport . "
            f"numgen random mod 1 : {ip} daddr . {p} dport; }}"
            for p in PROTOCOLS
        ),
        *(
            f"add map {t} {endpoint_map(SHORT_CIRCUIT, p)} {{ typeof {ip} daddr . {p} dport . "
            f"numgen random mod 1 : {ip} daddr . {p} dport; }}"
            for p in PROTOCOLS
        ),
        *(
            f"add map {t} {endpoint_map(NODEPORT_SHORT_CIRCUIT, p)} {{ typeof {p} dport . "
            f"numgen random mod 1 : {ip} daddr . {p} dport; }}"
            for p in PROTOCOLS
        ),
        f"add set {t} {FIREWALL_IPS} {{ type {addr} . inet_proto . inet_service; }}",
        f"add set {t} {FIREWALL_ALLOW} "
        f"{{ type {addr} . inet_proto . inet_service . {addr}; flags interval; }}",
        f"add set {t} {HAIRPIN} {{ type {addr} . {addr}; }}",
    ]
    if ctx.nodeport_scope:
        lines.append(f"add set {t} {NODEPORT_IPS} {{ type {addr}; flags interval; }}")
        lines.append(f"add element {t} {NODEPORT_IPS} {{ {', '.join(ctx.nodeport_scope)} }}")
    if len(ctx.cluster_cidrs) > 1:
        lines.append(f"add set {t} {CLUSTER_CIDRS} {{ type {addr}; flags interval; }}")
        lines.append(f"add element {t} {CLUSTER_CIDRS} {{ {', '.join(ctx.cluster_cidrs)} }}")
    rules = [
        ("nat-prerouting", "jump services"),
        ("nat-output", "jump services"),
        ("nat-postrouting", "jump masquerading"),
        ("filter-input", "ct state new jump endpoints-check"),
        ("filter-forward", "ct state new jump endpoints-check"),
        ("filter-output", "ct state new jump endpoints-check"),
        # loadBalancerSourceRanges, before DNAT: from outside and from the node itself.
        ("filter-prerouting", "ct state new jump firewall-check"),
        ("filter-output", "ct state new jump firewall-check"),
        (
            "firewall-check",
            f"{ip} daddr . meta l4proto . th dport @{FIREWALL_IPS} {ip} daddr . meta l4proto "
            f". th dport . {ip} saddr != @{FIREWALL_ALLOW} drop",
        ),
        ("mark-for-masquerade", f"meta mark set meta mark | {ctx.mark}"),
        # A pod reaching itself through a service: its reply must come back through us.
        (
            "masquerading",
            f"ct status dnat {ip} saddr . {ip} daddr @{HAIRPIN} masquerade fully-random",
        ),
        ("masquerading", f"meta mark & {ctx.mark} == 0 return"),
        ("masquerading", f"meta mark set meta mark ^ {ctx.mark}"),
        ("masquerading", "masquerade fully-random"),
        ("reject-chain", "reject"),
        ("endpoints-check", f"{ip} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"),
        ("services", f"{ip} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}"),
    ]
    nodeports = _nodeport_match(ctx)
    if nodeports is not None:
        rules.append(
            (
                "endpoints-check",
                f"{nodeports} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}",
            )
        )
        rules.append(("services", f"{nodeports} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"))
    lines.extend(f"add rule {t} {chain} {rule}" for chain, rule in rules)
    return [f"{line}\n" for line in lines]


# -- whole scripts --------------------------------------------------------------------


def _element_text(element: Element) -> str:
    _, key, value = element
    return key if value is None else f"{key} : {value}"


def _grouped(
    verb: str, ctx: RenderContext, elements: Iterable[Element], *, keys_only: bool = False
) -> Iterator[str]:
    """`add element` / `delete element` commands, one per map and chunk."""
    by_map: dict[str, list[str]] = {}
    for element in elements:
        by_map.setdefault(element[0], []).append(
            element[1] if keys_only else _element_text(element)
        )
    for name, texts in by_map.items():
        for start in range(0, len(texts), ELEMENT_CHUNK):
            chunk = ", ".join(texts[start : start + ELEMENT_CHUNK])
            yield f"{verb} element {ctx.table} {name} {{ {chunk} }}\n"


def hairpin_element(address: str) -> Element:
    return (HAIRPIN, f"{address} . {address}", None)


def render_full(ports: Iterable[PortElements], ctx: RenderContext, hairpin: Iterable[str]) -> str:
    """The whole table, replacing whatever table of ours exists, in one transaction.

    `add table; delete table; add table` works whether or not the table exists, and
    the kernel swaps old for new atomically: packets see one or the other.
    """
    ports = list(ports)
    chains = sorted({chain for port in ports for chain in port.chains}, key=_chain_order)
    parts = [
        f"add table {ctx.table}\n",
        f"delete table {ctx.table}\n",
        f"add table {ctx.table}\n",
        *render_static(ctx),
        *render_chains(chains, ctx),
        *_owned_objects(ctx, OwnedChange.of((), ports)),
        *_grouped("add", ctx, (element for port in ports for element in port.elements)),
        *_grouped("add", ctx, (hairpin_element(address) for address in hairpin)),
    ]
    return "".join(parts)


def _chain_order(chain: str) -> tuple[str, str, int, int]:
    return parse_dnat_chain(chain)


@dataclass(frozen=True, slots=True)
class ElementChange:
    """The element operations between old and new port states."""

    delete: tuple[Element, ...]
    add: tuple[Element, ...]


def element_change(old: Iterable[Element], new: Iterable[Element]) -> ElementChange:
    """Delete what is gone or changed value, add what is new or changed value."""
    before = {(element[0], element[1]): element for element in old}
    after = {(element[0], element[1]): element for element in new}
    delete = tuple(e for k, e in before.items() if after.get(k) != e)
    add = tuple(e for k, e in after.items() if before.get(k) != e)
    return ElementChange(delete, add)


@dataclass(frozen=True, slots=True)
class OwnedChange:
    """What changes among the sets, maps and chains the changed ports own."""

    add_sets: tuple[OwnedSet, ...] = ()
    delete_sets: tuple[OwnedSet, ...] = ()
    add_chains: tuple[OwnedChain, ...] = ()
    rewrite_chains: tuple[OwnedChain, ...] = ()
    delete_chains: tuple[str, ...] = ()

    @classmethod
    def of(cls, old: Iterable[PortElements], new: Iterable[PortElements]) -> OwnedChange:
        old_sets = {owned[1]: owned for port in old for owned in port.sets}
        new_sets = {owned[1]: owned for port in new for owned in port.sets}
        old_chains = {name: rules for port in old for name, rules in port.owned_chains}
        new_chains = {name: rules for port in new for name, rules in port.owned_chains}
        return cls(
            # A name hashes everything its declaration says: same name, same set.
            add_sets=tuple(owned for name, owned in new_sets.items() if name not in old_sets),
            delete_sets=tuple(owned for name, owned in old_sets.items() if name not in new_sets),
            add_chains=tuple(
                (name, rules) for name, rules in new_chains.items() if name not in old_chains
            ),
            rewrite_chains=tuple(
                (name, rules)
                for name, rules in new_chains.items()
                if name in old_chains and old_chains[name] != rules
            ),
            delete_chains=tuple(name for name in old_chains if name not in new_chains),
        )


def _owned_objects(ctx: RenderContext, owned: OwnedChange) -> Iterator[str]:
    """New sets and maps, then every new chain declared, then their rules (a rule may
    jump to a chain declared after its own), then the rewritten chains."""
    t = ctx.table
    for kind, name, declaration in owned.add_sets:
        yield f"add {kind} {t} {name} {declaration}\n"
    for name, _ in owned.add_chains:
        yield f"add chain {t} {name}\n"
    for name, rules in owned.add_chains:
        yield from (f"add rule {t} {name} {rule}\n" for rule in rules)
    for name, rules in owned.rewrite_chains:
        yield f"flush chain {t} {name}\n"
        yield from (f"add rule {t} {name} {rule}\n" for rule in rules)


def render_partial(
    *,
    ctx: RenderContext,
    new_chains: Iterable[str],
    change: ElementChange,
    gone_chains: Iterable[str] = (),
    owned: OwnedChange = OwnedChange(),
) -> str:
    """New shared chains and owned objects first (elements will jump to them), then
    element deletions and additions, then the chains nothing jumps to any more (flushed,
    then deleted: the kernel refuses to delete a chain still referenced, so they go
    last), and last the owned sets no rule uses any more."""
    gone = [*owned.delete_chains, *sorted(gone_chains, key=_chain_order)]
    return "".join(
        [
            *render_chains(sorted(new_chains, key=_chain_order), ctx),
            *_owned_objects(ctx, owned),
            *_grouped("delete", ctx, change.delete, keys_only=True),
            *_grouped("add", ctx, change.add),
            *(f"flush chain {ctx.table} {chain}\n" for chain in gone),
            *(f"delete chain {ctx.table} {chain}\n" for chain in gone),
            *(f"delete {kind} {ctx.table} {name}\n" for kind, name, _ in owned.delete_sets),
        ]
    )


def render_cleanup(ctx: RenderContext) -> str:
    return f"delete table {ctx.table}\n"
