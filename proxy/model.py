"""Pure values: what the proxy knows about Services, endpoints and this node.

Nothing here imports the Kubernetes client or touches the kernel. Watch events are
parsed into these frozen values once, on arrival (`proxy.parse`); the change
trackers hold them; `proxy.topology` picks the endpoints this node must use; and a
backend receives the result as a `ProxyState`, the complete node-local desired
state, together with a `SyncHint` naming what changed since its last successful
sync.

Values are immutable and compared by value, so "did this service change?" is a
plain `!=` between the state computed now and the one programmed last time.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple


class Protocol(enum.StrEnum):
    """Transport protocols a Service port can use."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class IPFamily(enum.IntEnum):
    """Address family of a ClusterIP or an endpoint."""

    V4 = 4
    V6 = 6


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """A Service's namespace and name."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """One port of one Service, as upstream's `ServicePortName`.

    The string form is upstream's too (`ns/name:port`, or `ns/name` for an unnamed
    port); backends hash it with the protocol to name per-service chains.
    """

    service: ServiceKey
    port: str
    protocol: Protocol

    def __str__(self) -> str:
        suffix = f":{self.port}" if self.port else ""
        return f"{self.service}{suffix}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """Everything about one Service port that decides how traffic to it is handled.

    Addresses are normalised strings (`proxy.parse.normalize_ip`). Fields beyond
    ClusterIP and NodePort are parsed now so that later features only need to render
    them; a backend that does not support one yet ignores it.
    """

    name: ServicePortName
    cluster_ips: tuple[str, ...]
    port: int
    node_port: int = 0
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    session_affinity_seconds: int | None = None
    """ClientIP affinity timeout; None when the Service has no session affinity."""
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0
    traffic_distribution: str | None = None

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """A parsed Service: the ports this proxy must program, nothing else."""

    key: ServiceKey
    ports: tuple[ServicePort, ...]


class Endpoint(NamedTuple):
    """One backend address for one Service port, merged over all its slices.

    A NamedTuple, not a frozen dataclass: a list of 10k services x 10 endpoints makes
    100k of them, and a frozen dataclass's `__init__` (one `object.__setattr__` per
    field) costs four times as much (0.17 s against 0.04 s per 100k, measured).
    """

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] | None = None
    """`hints.forZones`; None when the endpoint carries no zone hints."""
    node_hints: frozenset[str] | None = None
    """`hints.forNodes`; None when the endpoint carries no node hints."""
    is_local: bool = False
    """True when the endpoint runs on this node (its nodeName is ours)."""

    @property
    def family(self) -> IPFamily:
        return IPFamily.V6 if ":" in self.ip else IPFamily.V4

    def address(self) -> str:
        """`ip:port`, with brackets for IPv6."""
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SlicePort:
    """One port of an EndpointSlice: the resolved target port for a named Service port."""

    name: str
    port: int
    protocol: Protocol


class SliceEndpoint(NamedTuple):
    """One endpoint of an EndpointSlice, before it is joined with the slice's ports
    (a NamedTuple for the reason `Endpoint` is one)."""

    ip: str
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] | None = None
    node_hints: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class SliceInfo:
    """A parsed EndpointSlice, keyed by its own namespace and name."""

    namespace: str
    name: str
    service: ServiceKey
    family: IPFamily
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]
    trigger_time: float | None = None
    """`endpoints.kubernetes.io/last-change-trigger-time` as a Unix time."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the proxy needs of its own Node object."""

    name: str
    addresses: tuple[str, ...] = ()
    zone: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    eligible: bool = True
    """False when the Node is being deleted or tainted ToBeDeletedByClusterAutoscaler."""


@dataclass(frozen=True, slots=True)
class ServicePortState:
    """The node-local decision for one Service port: what the backend must render.

    `cluster_endpoints` serve traffic to the ClusterIP from anywhere;
    `external_endpoints` serve NodePort, LoadBalancer and externalIP traffic. Both are
    already filtered by traffic policy, topology and the terminating fallback, in a
    stable order, so a backend never decides which endpoint is usable.
    """

    port: ServicePort
    cluster_endpoints: tuple[Endpoint, ...]
    external_endpoints: tuple[Endpoint, ...]
    all_endpoints: tuple[Endpoint, ...] = ()
    """Every endpoint known for the port, usable or not (for conntrack cleanup)."""
    short_circuit_endpoints: tuple[Endpoint, ...] | None = None
    """The Cluster-policy endpoints that pods and the node reaching an external address
    (NodePort, LB IP, external IP) are sent to with externalTrafficPolicy Local, when
    they differ from `cluster_endpoints`: only when internalTrafficPolicy is Local too
    (upstream's clusterPolicyChain). None means `cluster_endpoints`."""

    @property
    def name(self) -> ServicePortName:
        return self.port.name


@dataclass(frozen=True, slots=True)
class NodeContext:
    """Node-wide settings a backend needs to render rules."""

    node_name: str
    node_ips: tuple[str, ...]
    """This node's addresses (NodePort destinations, unless nodeport_addresses narrows them)."""
    cluster_cidrs: tuple[str, ...] = ()
    """Traffic from outside these CIDRs to a ClusterIP is masqueraded."""
    masquerade_all: bool = False
    nodeport_addresses: tuple[str, ...] = ()
    """CIDRs (or "primary") limiting where NodePorts are open; empty means every local address."""


@dataclass(frozen=True, slots=True)
class ProxyState:
    """The complete node-local desired state handed to a backend at each sync.

    `services` is a read-only view owned by the proxier: a backend may read it during
    `sync` but must copy what it wants to keep.
    """

    node: NodeContext
    services: Mapping[ServicePortName, ServicePortState]


@dataclass(frozen=True, slots=True)
class SyncHint:
    """What changed since the backend's last successful sync.

    With `full` the backend must make the kernel match `ProxyState` whatever it
    believes is there (start-up, after an error or drift, the hourly resync).
    Otherwise every port not in `changed` is exactly as the last successful sync left
    it, and the backend may look at the changed ports only.

    `changed` names every port whose state differs from the last successful sync,
    including removed ports (absent from `ProxyState.services`); it is filled on full
    syncs too. `previous` holds, for each changed port that existed then, its state at
    the last successful sync: what stale-conntrack cleanup compares against, once for
    every backend. `node_changed` says the `NodeContext` differs from the last
    successful sync (addresses, which NodePort and IPVS bindings depend on).
    """

    full: bool
    changed: frozenset[ServicePortName] = frozenset()
    previous: Mapping[ServicePortName, ServicePortState] = field(
        default_factory=lambda: MappingProxyType({})
    )
    node_changed: bool = False
