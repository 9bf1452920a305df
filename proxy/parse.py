"""Turn raw API JSON (Services, EndpointSlices, Nodes) into the values of `proxy.model`.

Parsing happens once per watch event, on the reflector's thread, so the rest of the
proxy never sees a raw dict. Bad input never raises out of here: a Service that
cannot be programmed at all comes back as `Skipped`, and a bad port or endpoint is
dropped while the rest of the object is kept. Every drop is reported through the
`Problems` sink with the object's name, so the caller can log it once and count it.

Addresses are normalised the way upstream's `ParseIPSloppy` reads them: leading
zeros in IPv4 octets are decimal ("172.30.0.041" is 172.30.0.41), which Python's
`ipaddress` refuses outright.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from socket import inet_aton, inet_ntoa
from typing import Any

from proxy.model import (
    IPFamily,
    NodeInfo,
    Protocol,
    ServiceInfo,
    ServiceKey,
    ServicePort,
    ServicePortName,
    SliceEndpoint,
    SliceInfo,
    SlicePort,
)

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
ZONE_LABEL = "topology.kubernetes.io/zone"
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
DEFAULT_AFFINITY_SECONDS = 10800
MAX_AFFINITY_SECONDS = 86400
"""The API's bound on sessionAffinityConfig.clientIP.timeoutSeconds (one day)."""

# Label selector kube-proxy lists Services and EndpointSlices with.
PROXY_LABEL_SELECTOR = f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"

Problems = Callable[[str, str], None]
"""Sink for dropped input: called with (reason, message naming the object)."""


@dataclass(frozen=True, slots=True)
class Skipped:
    """A Service this proxy does not program, and why (not necessarily an error)."""

    key: ServiceKey
    reason: str
    error: bool
    """True for bad input (logged and counted), False for deliberate skips (headless...)."""


def _ignore(_reason: str, _message: str) -> None:
    """Default sink for callers that do not care about dropped input."""


def parse_ip_sloppy(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP as Go's legacy parser reads it (IPv4 leading zeros are decimal); None if bad."""
    text = text.strip()
    if not text:
        return None
    if ":" not in text:
        parts = text.split(".")
        if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
            return None
        octets = [int(p, 10) for p in parts]
        if any(o > 255 for o in octets):
            return None
        return ipaddress.IPv4Address(bytes(octets))
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        return None


def normalize_ip(text: str) -> str | None:
    """Canonical form of an IP address, reading IPv4 leading zeros as decimal; None if bad."""
    try:
        # Already canonical, the common case (100k times per list at 10k services):
        # two C calls instead of a regex or `ipaddress`.
        if inet_ntoa(inet_aton(text)) == text:
            return text
    except OSError:
        pass
    ip = parse_ip_sloppy(text)
    return None if ip is None else str(ip)


def normalize_cidr(text: str) -> str | None:
    """Canonical form of a CIDR (host bits cleared), sloppy about leading zeros; None if bad."""
    text = text.strip()
    address, sep, prefix = text.partition("/")
    ip = normalize_ip(address)
    if ip is None or not sep or not prefix.isdigit():
        return None
    try:
        return str(ipaddress.ip_network(f"{ip}/{int(prefix, 10)}", strict=False))
    except ValueError:
        return None


_PROTOCOLS = {protocol.value: protocol for protocol in Protocol}


def parse_protocol(value: object) -> Protocol | None:
    """The protocol named by `value` ("TCP" when absent, as the API defaults it)."""
    if value is None:
        return Protocol.TCP
    return _PROTOCOLS.get(value) if isinstance(value, str) else None


def _valid_port(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65535:
        return value
    return None


def parse_service(raw: Mapping[str, Any], problems: Problems = _ignore) -> ServiceInfo | Skipped:
    """The ports of a Service this proxy must program, or why it is skipped."""
    meta = raw.get("metadata") or {}
    key = ServiceKey(str(meta.get("namespace") or "default"), str(meta.get("name") or ""))
    spec = raw.get("spec") or {}
    labels = meta.get("labels") or {}
    if SERVICE_PROXY_NAME_LABEL in labels:
        return Skipped(key, "service-proxy-name label", error=False)
    svc_type = spec.get("type") or "ClusterIP"
    if svc_type == "ExternalName":
        return Skipped(key, "ExternalName", error=False)
    raw_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not raw_ips or raw_ips[0] in ("None", ""):
        return Skipped(key, "headless", error=False)

    cluster_ips: list[str] = []
    for raw_ip in raw_ips:
        ip = normalize_ip(str(raw_ip))
        if ip is None:
            problems("invalid_cluster_ip", f"service {key}: clusterIP {raw_ip!r} is not an IP")
            return Skipped(key, f"invalid clusterIP {raw_ip!r}", error=True)
        cluster_ips.append(ip)

    external_ips = _parse_ip_list(spec.get("externalIPs"), key, "externalIPs", problems)
    lb_ips = _parse_lb_ingress(raw, key, problems)
    source_ranges = _parse_source_ranges(spec.get("loadBalancerSourceRanges"), key, problems)
    affinity = _parse_affinity(spec, key, problems)
    ext_local = spec.get("externalTrafficPolicy") == "Local" and svc_type in (
        "NodePort",
        "LoadBalancer",
    )
    int_local = spec.get("internalTrafficPolicy") == "Local"
    hc_port = _valid_port(spec.get("healthCheckNodePort")) or 0
    distribution = spec.get("trafficDistribution")

    ports: list[ServicePort] = []
    seen: set[tuple[str, Protocol]] = set()
    for index, raw_port in enumerate(spec.get("ports") or []):
        port_name = str(raw_port.get("name") or "")
        where = f"service {key} port {port_name or index}"
        protocol = parse_protocol(raw_port.get("protocol"))
        if protocol is None:
            problems("invalid_protocol", f"{where}: unknown protocol {raw_port.get('protocol')!r}")
            continue
        number = _valid_port(raw_port.get("port"))
        if number is None:
            problems("invalid_port", f"{where}: port {raw_port.get('port')!r} out of range")
            continue
        node_port = 0
        if svc_type in ("NodePort", "LoadBalancer") and raw_port.get("nodePort") is not None:
            node_port = _valid_port(raw_port.get("nodePort")) or 0
            if not node_port:
                problems(
                    "invalid_port", f"{where}: nodePort {raw_port.get('nodePort')!r} out of range"
                )
        if (port_name, protocol) in seen:
            problems("duplicate_port", f"{where}: duplicate port name {port_name!r}/{protocol}")
            continue
        seen.add((port_name, protocol))
        ports.append(
            ServicePort(
                name=ServicePortName(key, port_name, protocol),
                cluster_ips=tuple(cluster_ips),
                port=number,
                node_port=node_port,
                external_ips=external_ips,
                load_balancer_ips=lb_ips,
                load_balancer_source_ranges=source_ranges,
                session_affinity_seconds=affinity,
                external_policy_local=ext_local,
                internal_policy_local=int_local,
                health_check_node_port=hc_port if ext_local else 0,
                traffic_distribution=str(distribution) if distribution else None,
            )
        )
    return ServiceInfo(key, tuple(ports))


def _parse_ip_list(
    values: object, key: ServiceKey, field: str, problems: Problems
) -> tuple[str, ...]:
    result: list[str] = []
    for value in values if isinstance(values, list) else []:
        ip = normalize_ip(str(value))
        if ip is None:
            problems("invalid_ip", f"service {key}: {field} entry {value!r} is not an IP")
        else:
            result.append(ip)
    return tuple(result)


def _parse_lb_ingress(
    raw: Mapping[str, Any], key: ServiceKey, problems: Problems
) -> tuple[str, ...]:
    ingress = ((raw.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    usable: list[object] = []
    for entry in ingress if isinstance(ingress, list) else []:
        if not isinstance(entry, dict):
            continue
        if not entry.get("ip"):
            # A hostname-only entry (AWS ELB style) gives this proxy nothing to program;
            # upstream skips it silently, we report it so the skipped count says why an
            # LB address is not served.
            problems(
                "lb_ingress_without_ip",
                f"service {key}: status.loadBalancer.ingress entry {entry!r} has no ip; skipped",
            )
        elif entry.get("ipMode") != "Proxy":  # Proxy mode: the LB itself delivers to nodes
            usable.append(entry["ip"])
    return _parse_ip_list(usable, key, "status.loadBalancer.ingress", problems)


def _parse_source_ranges(values: object, key: ServiceKey, problems: Problems) -> tuple[str, ...]:
    result: list[str] = []
    for value in values if isinstance(values, list) else []:
        cidr = normalize_cidr(str(value))
        if cidr is None:
            problems(
                "invalid_cidr", f"service {key}: loadBalancerSourceRanges {value!r} is not a CIDR"
            )
        else:
            result.append(cidr)
    return tuple(result)


def _parse_affinity(spec: Mapping[str, Any], key: ServiceKey, problems: Problems) -> int | None:
    """ClientIP affinity's timeout; absent means the API default (10800 s), and a value
    outside the API's range (1..86400) is reported and replaced by that default, so the
    service keeps its affinity."""
    if spec.get("sessionAffinity") != "ClientIP":
        return None
    config = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
    timeout = config.get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_SECONDS
    if (
        isinstance(timeout, int)
        and not isinstance(timeout, bool)
        and 0 < timeout <= MAX_AFFINITY_SECONDS
    ):
        return timeout
    problems(
        "invalid_affinity_timeout",
        f"service {key}: sessionAffinityConfig.clientIP.timeoutSeconds {timeout!r} is not in "
        f"1..{MAX_AFFINITY_SECONDS}; using {DEFAULT_AFFINITY_SECONDS}",
    )
    return DEFAULT_AFFINITY_SECONDS


def parse_slice(raw: Mapping[str, Any], problems: Problems = _ignore) -> SliceInfo | None:
    """The endpoints and ports of an EndpointSlice; None when it serves no Service we know."""
    meta = raw.get("metadata") or {}
    namespace = str(meta.get("namespace") or "default")
    name = str(meta.get("name") or "")
    service_name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service_name:
        return None
    address_type = raw.get("addressType")
    if address_type == "IPv4":
        family = IPFamily.V4
    elif address_type == "IPv6":
        family = IPFamily.V6
    else:
        return None  # FQDN slices are not for a proxy

    where = f"endpointslice {namespace}/{name}"
    ports: list[SlicePort] = []
    for raw_port in raw.get("ports") or []:
        number = _valid_port(raw_port.get("port"))
        protocol = parse_protocol(raw_port.get("protocol"))
        if number is None or protocol is None:
            problems(
                "invalid_port",
                f"{where}: port {raw_port.get('name')!r} ({raw_port.get('port')!r}/"
                f"{raw_port.get('protocol')!r}) ignored",
            )
            continue
        ports.append(SlicePort(str(raw_port.get("name") or ""), number, protocol))

    endpoints: list[SliceEndpoint] = []
    for raw_ep in raw.get("endpoints") or []:
        addresses = raw_ep.get("addresses") or []
        ip = normalize_ip(str(addresses[0])) if addresses else None
        if ip is None or (":" in ip) != (family is IPFamily.V6):
            problems("invalid_endpoint", f"{where}: endpoint {addresses!r} ignored")
            continue
        conditions = raw_ep.get("conditions") or {}
        # API semantics: nil ready means ready; nil serving means "same as ready".
        ready = conditions.get("ready") is not False
        serving = conditions.get("serving")
        hints = raw_ep.get("hints")
        # Positional, hint lookups only when there are hints: this runs once per
        # endpoint of the cluster (100k times in one list at 10k services).
        endpoints.append(
            SliceEndpoint(
                ip,
                ready,
                ready if serving is None else bool(serving),
                bool(conditions.get("terminating")),
                # A few distinct values repeated 100k times: keep one copy of each.
                _interned(raw_ep.get("nodeName")),
                _interned(raw_ep.get("zone")),
                _hint_set(hints.get("forZones")) if hints else None,
                _hint_set(hints.get("forNodes")) if hints else None,
            )
        )
    return SliceInfo(
        namespace=namespace,
        name=name,
        service=ServiceKey(namespace, str(service_name)),
        family=family,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        trigger_time=parse_time((meta.get("annotations") or {}).get(TRIGGER_TIME_ANNOTATION)),
    )


def _interned(value: object) -> str | None:
    return sys.intern(value) if isinstance(value, str) else None


def _hint_set(values: object) -> frozenset[str] | None:
    if not isinstance(values, list):
        return None
    return frozenset(str(v.get("name")) for v in values if isinstance(v, dict) and v.get("name"))


def parse_time(value: object) -> float | None:
    """An RFC 3339 timestamp as a Unix time; None when absent or unparsable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_node(raw: Mapping[str, Any]) -> NodeInfo:
    """This node's name, addresses, zone and eligibility for /healthz."""
    meta = raw.get("metadata") or {}
    labels = dict(meta.get("labels") or {})
    addresses: list[str] = []
    entries = (raw.get("status") or {}).get("addresses") or []
    # As upstream's GetNodeHostIPs: InternalIPs first, then ExternalIPs, each in order.
    for kind in ("InternalIP", "ExternalIP"):
        for entry in entries:
            if entry.get("type") != kind:
                continue
            ip = normalize_ip(str(entry.get("address") or ""))
            if ip is not None and ip not in addresses:
                addresses.append(ip)
    taints = (raw.get("spec") or {}).get("taints") or []
    eligible = not meta.get("deletionTimestamp") and not any(
        t.get("key") == TO_BE_DELETED_TAINT for t in taints
    )
    return NodeInfo(
        name=str(meta.get("name") or ""),
        addresses=tuple(addresses),
        zone=labels.get(ZONE_LABEL),
        labels=labels,
        eligible=eligible,
    )
