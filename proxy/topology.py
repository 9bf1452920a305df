"""Which endpoints this node sends each kind of traffic to (upstream `CategorizeEndpoints`).

Decided once here, before any backend sees the state, so every backend agrees:

- cluster endpoints: ready endpoints, narrowed by topology (`hints.forZones` /
  `hints.forNodes`) when every ready endpoint is hinted and the hinted subset for this
  node is not empty; when there is no ready endpoint anywhere, the serving and
  terminating ones (KEP-1669).
- local endpoints: the ready endpoints on this node, or failing that the serving and
  terminating ones on this node.
- ClusterIP traffic uses the cluster set, or the local set with
  `internalTrafficPolicy: Local`; external traffic (NodePort, LoadBalancer, external
  IPs) uses the cluster set, or the local set with `externalTrafficPolicy: Local`.
- pods and the node reaching an external address of a port with
  `externalTrafficPolicy: Local` are short-circuited to the cluster set, so an
  externally reachable port always has one (upstream's `UsesClusterEndpoints`), even
  when both policies are Local (`ServicePortState.short_circuit_endpoints`).

Pure functions on frozen values: no locks, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from proxy.model import Endpoint, ServicePort, ServicePortState

_NO_TOPOLOGY = ""
_SAME_ZONE = "PreferSameZone"
_SAME_NODE = "PreferSameNode"


def _topology_mode(
    port: ServicePort, endpoints: Sequence[Endpoint], node_name: str, zone: str | None
) -> str:
    """The topology filter to apply, following upstream's all-or-nothing hint guard."""
    all_node_hints = all_zone_hints = True
    node_hit = zone_hit = False
    any_ready = False
    for ep in endpoints:
        if not ep.ready:
            continue
        any_ready = True
        if not ep.node_hints:
            all_node_hints = False
        elif node_name in ep.node_hints:
            node_hit = True
        if not ep.zone_hints:
            all_zone_hints = False
        elif zone is not None and zone in ep.zone_hints:
            zone_hit = True
    if not any_ready:
        return _NO_TOPOLOGY
    if port.traffic_distribution == _SAME_NODE and all_node_hints and node_hit:
        return _SAME_NODE
    if all_zone_hints and zone_hit:
        return _SAME_ZONE
    return _NO_TOPOLOGY


def _topology_filter(mode: str, node_name: str, zone: str | None) -> Callable[[Endpoint], bool]:
    if mode == _SAME_NODE:
        return lambda ep: ep.node_hints is not None and node_name in ep.node_hints
    if mode == _SAME_ZONE:
        return lambda ep: ep.zone_hints is not None and zone in ep.zone_hints
    return lambda _ep: True


def _externally_accessible(port: ServicePort) -> bool:
    return bool(port.node_port or port.external_ips or port.load_balancer_ips)


def cluster_endpoints(
    port: ServicePort, endpoints: Sequence[Endpoint], node_name: str, zone: str | None
) -> tuple[Endpoint, ...]:
    """Endpoints for Cluster traffic policy: ready (topology-filtered), else serving-terminating."""
    mode = _topology_mode(port, endpoints, node_name, zone)
    if mode == _NO_TOPOLOGY:
        ready = tuple(ep for ep in endpoints if ep.ready)
        if isinstance(endpoints, tuple) and len(ready) == len(endpoints):
            return endpoints  # the usual case: one tuple shared by every endpoint set
    else:
        keep = _topology_filter(mode, node_name, zone)
        ready = tuple(ep for ep in endpoints if ep.ready and keep(ep))
    if ready:
        return ready
    return tuple(ep for ep in endpoints if ep.serving and ep.terminating)


def local_endpoints(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """Endpoints for Local traffic policy: local ready, else local serving-terminating."""
    local = [ep for ep in endpoints if ep.is_local]
    ready = tuple(ep for ep in local if ep.ready)
    if ready:
        return ready
    return tuple(ep for ep in local if ep.serving and ep.terminating)


def categorize(
    port: ServicePort, endpoints: Sequence[Endpoint], node_name: str, zone: str | None
) -> ServicePortState:
    """The node-local state of one Service port given every endpoint known for it."""
    accessible = _externally_accessible(port)
    # Upstream: "even if the external traffic policy is Local, we need Cluster
    # endpoints to implement short circuiting".
    uses_cluster = not port.internal_policy_local or accessible
    uses_local = port.internal_policy_local or (accessible and port.external_policy_local)
    cluster = cluster_endpoints(port, endpoints, node_name, zone) if uses_cluster else ()
    local = local_endpoints(endpoints) if uses_local else ()
    short_circuit = None
    if port.internal_policy_local and port.external_policy_local and accessible:
        short_circuit = cluster
    return ServicePortState(
        port=port,
        cluster_endpoints=local if port.internal_policy_local else cluster,
        external_endpoints=local if port.external_policy_local else cluster,
        all_endpoints=tuple(endpoints),
        short_circuit_endpoints=short_circuit,
    )


def has_usable_endpoints(endpoints: Iterable[Endpoint]) -> bool:
    """Upstream's `hasAnyEndpoints`: some endpoint, anywhere, is ready or serving-terminating."""
    return any(ep.ready or (ep.serving and ep.terminating) for ep in endpoints)


def lacks_local_endpoints(state: ServicePortState) -> tuple[bool, bool]:
    """(internal, external): a Local traffic policy leaves this port with no endpoint on
    this node although it has usable endpoints elsewhere, so its traffic is dropped.

    Upstream counts these ports in `kubeproxy_sync_proxy_rules_no_local_endpoints_total`
    (labels "internal" and "external"); a port with no usable endpoint at all is
    rejected instead and counted in neither.
    """
    if not has_usable_endpoints(state.all_endpoints):
        return False, False
    port = state.port
    internal = port.internal_policy_local and not state.cluster_endpoints
    external = (
        port.external_policy_local and _externally_accessible(port) and not state.external_endpoints
    )
    return internal, external
