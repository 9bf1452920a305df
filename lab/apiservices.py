"""Service defaulting, validation and ClusterIP / NodePort allocation, as the real API does.

What a client of the real API can rely on, and so what the lab double does:

- `spec.type` defaults to ClusterIP; ports default `protocol: TCP` and
  `targetPort: <port>`; `sessionAffinity: None`, `internalTrafficPolicy: Cluster`,
  `externalTrafficPolicy: Cluster` for NodePort/LoadBalancer, and
  `allocateLoadBalancerNodePorts: true` for LoadBalancer.
- `spec.clusterIP`/`clusterIPs`/`ipFamilies`/`ipFamilyPolicy` are filled in from the
  service CIDR(s) unless the service is headless (`None`) or ExternalName; a requested
  IP must lie in the range and be free (422 otherwise). With two CIDRs (one per
  family) `PreferDualStack`/`RequireDualStack` services get one IP of each.
- NodePort and LoadBalancer ports get a `nodePort` from 30000-32767 unless given; a
  LoadBalancer with `externalTrafficPolicy: Local` gets a `healthCheckNodePort`. A
  port taken by another service is 422; one service may reuse a number across
  protocols, as the real allocator allows.
- On update, an omitted clusterIP, nodePort (matched by port name) or
  healthCheckNodePort keeps its allocated value (`patchAllocatedValues` upstream); a
  changed clusterIP is rejected (immutable); switching type allocates or releases.

IPv4 addresses are parsed the way Go's legacy parser does (leading zeros are decimal:
`172.30.0.041` is 172.30.0.41) so that such values behave as on a real 1.32 cluster.

Concurrency: `ServiceAdmission` is called only under the store's lock (see
`apistore`); it is not thread-safe on its own and never blocks.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lab.apierrors import FieldError
from proxy.parse import parse_ip_sloppy

__all__ = ["DEFAULT_NODE_PORT_RANGE", "ServiceAdmission", "parse_sloppy_ip"]

Obj = dict[str, Any]
Owner = tuple[str, str]
"""(namespace, name) of the service holding an allocation."""

DEFAULT_NODE_PORT_RANGE = (30000, 32767)
SERVICE_TYPES = ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort")
PROTOCOLS = ("SCTP", "TCP", "UDP")
FAMILY_POLICIES = ("PreferDualStack", "RequireDualStack", "SingleStack")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_sloppy_ip(text: str) -> IP | None:
    """An IP as Go's legacy `ParseIP` reads it (IPv4 octets with leading zeros allowed)."""
    if not isinstance(text, str) or text != text.strip():
        return None  # the API refuses surrounding blanks; only the proxy forgives them
    return parse_ip_sloppy(text)


def _family(ip: IP) -> str:
    return "IPv4" if ip.version == 4 else "IPv6"


@dataclass
class _IPRange:
    """One service CIDR: which addresses are taken and where to look next."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    used: dict[int, Owner] = field(default_factory=dict)
    next_offset: int = 1

    @property
    def family(self) -> str:
        return "IPv4" if self.network.version == 4 else "IPv6"

    @property
    def size(self) -> int:
        # Offsets 1 .. size: the network address (and IPv4 broadcast) are never handed out.
        total = self.network.num_addresses
        return total - 2 if self.network.version == 4 else total - 1

    def offset_of(self, ip: IP) -> int | None:
        if ip.version != self.network.version or ip not in self.network:
            return None
        offset = int(ip) - int(self.network.network_address)
        return offset if 1 <= offset <= self.size else None

    def allocate(self, owner: Owner) -> str | None:
        for step in range(min(self.size, 1 << 20)):
            offset = (self.next_offset - 1 + step) % self.size + 1
            if offset not in self.used:
                self.used[offset] = owner
                self.next_offset = offset % self.size + 1
                return str(self.network.network_address + offset)
        return None


@dataclass
class _Plan:
    """What an admission will reserve and release once validation passed."""

    ips: list[tuple[_IPRange, int]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)


class ServiceAdmission:
    """Defaults, validates and allocates for Services (see module docstring)."""

    def __init__(
        self,
        service_cidrs: Sequence[str],
        node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE,
    ) -> None:
        if not service_cidrs or len(service_cidrs) > 2:
            raise ValueError("one service CIDR, or two of different families")
        self.ranges = [
            _IPRange(ipaddress.ip_network(c.strip(), strict=True)) for c in service_cidrs
        ]
        if len({r.family for r in self.ranges}) != len(self.ranges):
            raise ValueError("two service CIDRs must be of different families")
        self.node_port_range = node_port_range
        self.node_ports: dict[int, Owner] = {}
        self._next_node_port = node_port_range[0]

    @property
    def cidr_text(self) -> str:
        return ",".join(str(r.network) for r in self.ranges)

    def _range(self, family: str) -> _IPRange | None:
        return next((r for r in self.ranges if r.family == family), None)

    # -- Admission protocol ---------------------------------------------------------------

    def create(self, obj: Obj) -> list[FieldError]:
        return self._admit(obj, None)

    def update(self, new: Obj, old: Obj) -> list[FieldError]:
        return self._admit(new, old)

    def release(self, obj: Obj) -> None:
        owner = _owner(obj)
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        assert isinstance(spec, dict)
        for text in _cluster_ips(spec):
            self._release_ip(text, owner)
        for port in _node_ports(spec):
            if self.node_ports.get(port) == owner:
                del self.node_ports[port]

    def observe(self, obj: Obj) -> None:
        """Record what an object written without admission holds (best effort, no checks)."""
        owner = _owner(obj)
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        assert isinstance(spec, dict)
        for text in _cluster_ips(spec):
            ip = parse_sloppy_ip(text)
            for rng in self.ranges:
                offset = rng.offset_of(ip) if ip is not None else None
                if offset is not None:
                    rng.used.setdefault(offset, owner)
        for port in _node_ports(spec):
            self.node_ports.setdefault(port, owner)

    # -- the work ------------------------------------------------------------------------

    def _release_ip(self, text: str, owner: Owner) -> None:
        ip = parse_sloppy_ip(text)
        if ip is None:
            return
        for rng in self.ranges:
            offset = rng.offset_of(ip)
            if offset is not None and rng.used.get(offset) == owner:
                del rng.used[offset]

    def _admit(self, obj: Obj, old: Obj | None) -> list[FieldError]:
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            return [FieldError("spec", "Required")]
        old_spec: Obj = old.get("spec") or {} if old is not None else {}
        owner = _owner(obj)
        errors = _default_and_validate(spec)
        if errors:
            return errors
        if old is not None:
            _patch_allocated_values(spec, old_spec)
        plan = _Plan()
        errors += self._plan_cluster_ips(spec, old_spec, owner, plan, updating=old is not None)
        errors += self._plan_node_ports(spec, owner, plan)
        if errors:
            return errors
        # Valid: commit. Release what the old version held and the new one does not.
        if old is not None:
            self.release(old)
        for rng, offset in plan.ips:
            rng.used[offset] = owner
        for port in plan.ports:
            self.node_ports[port] = owner
        if not self._allocate_missing(spec, owner):
            self.release(obj)
            if old is not None:
                self.observe(old)
            return [
                FieldError("spec.clusterIPs", "Invalid", spec.get("clusterIPs"), "range is full")
            ]
        return []

    def _plan_cluster_ips(
        self, spec: Obj, old_spec: Obj, owner: Owner, plan: _Plan, *, updating: bool
    ) -> list[FieldError]:
        errors: list[FieldError] = []
        service_type = spec["type"]
        cluster_ip = spec.get("clusterIP")
        cluster_ips = spec.get("clusterIPs")
        if service_type == "ExternalName":
            if cluster_ip not in (None, "") or cluster_ips:
                errors.append(
                    FieldError(
                        "spec.clusterIP",
                        "Invalid",
                        cluster_ip,
                        "must be empty for ExternalName services",
                    )
                )
            if not spec.get("externalName"):
                errors.append(FieldError("spec.externalName", "Required"))
            for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                spec.pop(key, None)
            return errors
        if cluster_ips is not None and not isinstance(cluster_ips, list):
            return [FieldError("spec.clusterIPs", "Invalid", cluster_ips, "must be a list")]
        if cluster_ip and cluster_ips and cluster_ips[0] != cluster_ip:
            errors.append(
                FieldError(
                    "spec.clusterIPs", "Invalid", cluster_ips, "element [0] must match clusterIP"
                )
            )
        requested = list(cluster_ips or ([cluster_ip] if cluster_ip else []))
        if updating and old_spec.get("type") != "ExternalName":
            before = list(old_spec.get("clusterIPs") or [])
            if before and requested[: len(before)] != before[: len(requested)]:
                errors.append(
                    FieldError(
                        "spec.clusterIPs[0]", "Invalid", requested, "may not change once set"
                    )
                )
        policy = spec.get("ipFamilyPolicy") or "SingleStack"
        if policy not in FAMILY_POLICIES:
            return [*errors, FieldError("spec.ipFamilyPolicy", "NotSupported", policy)]
        families = list(spec.get("ipFamilies") or [])
        if requested == ["None"] or requested[:1] == ["None"]:
            spec["clusterIP"] = "None"
            spec["clusterIPs"] = ["None"]
            spec["ipFamilies"] = families or self._families(policy)
            spec["ipFamilyPolicy"] = policy
            return errors
        parsed: list[IP] = []
        for i, text in enumerate(requested):
            ip = parse_sloppy_ip(text)
            if ip is None:
                errors.append(
                    FieldError(
                        f"spec.clusterIPs[{i}]", "Invalid", text, "must be a valid IP address"
                    )
                )
            else:
                parsed.append(ip)
        if errors:
            return errors
        if parsed:
            families = [_family(ip) for ip in parsed] + [
                f for f in families if f not in {_family(ip) for ip in parsed}
            ]
        for family in families:
            if family not in ("IPv4", "IPv6"):
                return [FieldError("spec.ipFamilies", "NotSupported", family)]
            if self._range(family) is None:
                return [
                    FieldError(
                        "spec.ipFamilies",
                        "Invalid",
                        families,
                        f"{family} is not configured on this cluster",
                    )
                ]
        if not families:
            families = self._families(policy)
        if policy == "SingleStack" and len(families) > 1:
            return [
                FieldError(
                    "spec.ipFamilies", "Invalid", families, "must be one family for SingleStack"
                )
            ]
        if policy == "RequireDualStack" and len(self.ranges) < 2:
            return [
                FieldError(
                    "spec.ipFamilyPolicy",
                    "Invalid",
                    policy,
                    "this cluster is not configured for dual-stack services",
                )
            ]
        if policy != "SingleStack" and len(families) == 1 and len(self.ranges) == 2:
            families.append(next(r.family for r in self.ranges if r.family != families[0]))
        spec["ipFamilies"] = families
        spec["ipFamilyPolicy"] = policy
        for ip, text in zip(parsed, requested, strict=True):
            rng = self._range(_family(ip))
            assert rng is not None
            offset = rng.offset_of(ip)
            if offset is None:
                errors.append(
                    FieldError(
                        "spec.clusterIPs",
                        "Invalid",
                        requested,
                        f"failed to allocate IP {text}: provided IP ({text}) is not in the valid "
                        f"range. The range of valid IPs is {rng.network}",
                    )
                )
            elif rng.used.get(offset, owner) != owner:
                errors.append(
                    FieldError(
                        "spec.clusterIPs",
                        "Invalid",
                        requested,
                        f"failed to allocate IP {text}: provided IP is already allocated",
                    )
                )
            else:
                plan.ips.append((rng, offset))
        spec["clusterIPs"] = requested
        if requested:
            spec["clusterIP"] = requested[0]
        return errors

    def _families(self, policy: str) -> list[str]:
        if policy == "SingleStack":
            return [self.ranges[0].family]
        return [r.family for r in self.ranges]

    def _plan_node_ports(self, spec: Obj, owner: Owner, plan: _Plan) -> list[FieldError]:
        errors: list[FieldError] = []
        wants = _needs_node_ports(spec)
        seen: set[tuple[int, str]] = set()
        for i, port in enumerate(spec.get("ports") or []):
            node_port = port.get("nodePort")
            if not node_port:
                continue
            path = f"spec.ports[{i}].nodePort"
            if not wants:
                errors.append(
                    FieldError(
                        path, "Forbidden", detail=f"may not be used when `type` is '{spec['type']}'"
                    )
                )
                continue
            if (node_port, port["protocol"]) in seen:
                errors.append(FieldError(path, "Duplicate", node_port))
                continue
            seen.add((node_port, port["protocol"]))
            errors += self._check_node_port(path, node_port, owner, plan)
        health = spec.get("healthCheckNodePort")
        if health:
            path = "spec.healthCheckNodePort"
            if not _needs_health_check_port(spec):
                errors.append(
                    FieldError(
                        path,
                        "Invalid",
                        health,
                        "may only be set when `type` is 'LoadBalancer' and "
                        "`externalTrafficPolicy` is 'Local'",
                    )
                )
            else:
                errors += self._check_node_port(path, health, owner, plan)
        return errors

    def _check_node_port(self, path: str, port: Any, owner: Owner, plan: _Plan) -> list[FieldError]:
        low, high = self.node_port_range
        if not isinstance(port, int) or not low <= port <= high:
            return [
                FieldError(
                    path,
                    "Invalid",
                    port,
                    "provided port is not in the valid range. "
                    f"The range of valid ports is {low}-{high}",
                )
            ]
        if self.node_ports.get(port, owner) != owner:
            return [FieldError(path, "Invalid", port, "provided port is already allocated")]
        plan.ports.append(port)
        return []

    def _allocate_missing(self, spec: Obj, owner: Owner) -> bool:
        """Hand out whatever is still unset; False when a range is exhausted."""
        ips: list[str] = list(spec.get("clusterIPs") or [])
        if spec["type"] != "ExternalName" and ips != ["None"]:
            # Every family without an address yet (all of them on create; the second
            # one when an update asks for dual-stack).
            for family in spec["ipFamilies"][len(ips) :]:
                rng = self._range(family)
                ip = rng.allocate(owner) if rng is not None else None
                if ip is None:
                    return False
                ips.append(ip)
            spec["clusterIPs"] = ips
            spec["clusterIP"] = ips[0]
        if _needs_node_ports(spec):
            # The same port number and name on TCP and UDP share one node port.
            by_name: dict[str, int] = {}
            for port in spec.get("ports") or []:
                if not port.get("nodePort"):
                    reuse = by_name.get(port.get("name") or "")
                    number = reuse or self._allocate_node_port(owner)
                    if number is None:
                        return False
                    port["nodePort"] = number
                by_name.setdefault(port.get("name") or "", port["nodePort"])
        if _needs_health_check_port(spec) and not spec.get("healthCheckNodePort"):
            number = self._allocate_node_port(owner)
            if number is None:
                return False
            spec["healthCheckNodePort"] = number
        return True

    def _allocate_node_port(self, owner: Owner) -> int | None:
        low, high = self.node_port_range
        span = high - low + 1
        for step in range(span):
            port = low + (self._next_node_port - low + step) % span
            if port not in self.node_ports:
                self.node_ports[port] = owner
                self._next_node_port = low + (port - low + 1) % span
                return port
        return None


def _owner(obj: Obj) -> Owner:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _cluster_ips(spec: Obj) -> list[str]:
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return [ip for ip in ips if isinstance(ip, str) and ip != "None"]


def _node_ports(spec: Obj) -> list[int]:
    ports = [p.get("nodePort") for p in spec.get("ports") or [] if isinstance(p, dict)]
    ports.append(spec.get("healthCheckNodePort"))
    return [p for p in ports if isinstance(p, int) and p]


def _needs_node_ports(spec: Obj) -> bool:
    if spec.get("type") == "NodePort":
        return True
    return (
        spec.get("type") == "LoadBalancer"
        and spec.get("allocateLoadBalancerNodePorts") is not False
    )


def _needs_health_check_port(spec: Obj) -> bool:
    return spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"


def _patch_allocated_values(spec: Obj, old_spec: Obj) -> None:
    """Keep allocations an update left out (`patchAllocatedValues` in the real registry)."""
    old_type = old_spec.get("type")
    if old_type != "ExternalName" and spec["type"] != "ExternalName":
        if not spec.get("clusterIP") and not spec.get("clusterIPs"):
            if old_spec.get("clusterIPs"):
                spec["clusterIPs"] = list(old_spec["clusterIPs"])
            if old_spec.get("clusterIP"):
                spec["clusterIP"] = old_spec["clusterIP"]
        if not spec.get("ipFamilies") and old_spec.get("ipFamilies"):
            spec["ipFamilies"] = list(old_spec["ipFamilies"])
    if _needs_node_ports(old_spec) and _needs_node_ports(spec):
        new_used = {p.get("nodePort") for p in spec.get("ports") or []}
        old_used = {p.get("nodePort") for p in old_spec.get("ports") or []}
        taken = new_used & old_used
        by_name = {p.get("name") or "": p.get("nodePort") for p in old_spec.get("ports") or []}
        for port in spec.get("ports") or []:
            if not port.get("nodePort"):
                previous = by_name.get(port.get("name") or "")
                if previous and previous not in taken:
                    port["nodePort"] = previous
    if (
        _needs_health_check_port(old_spec)
        and _needs_health_check_port(spec)
        and not spec.get("healthCheckNodePort")
    ):
        spec["healthCheckNodePort"] = old_spec.get("healthCheckNodePort")


def _default_and_validate(spec: Obj) -> list[FieldError]:
    errors: list[FieldError] = []
    service_type = spec.get("type") or "ClusterIP"
    spec["type"] = service_type
    if service_type not in SERVICE_TYPES:
        return [FieldError("spec.type", "NotSupported", service_type)]
    affinity = spec.setdefault("sessionAffinity", "None")
    if affinity not in ("None", "ClientIP"):
        errors.append(FieldError("spec.sessionAffinity", "NotSupported", affinity))
    elif affinity == "ClientIP":
        config = spec.setdefault("sessionAffinityConfig", {})
        client_ip = config.setdefault("clientIP", {}) if isinstance(config, dict) else {}
        if isinstance(client_ip, dict):
            client_ip.setdefault("timeoutSeconds", 10800)
    if service_type != "ExternalName":
        spec.setdefault("internalTrafficPolicy", "Cluster")
    if service_type in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    if service_type == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)
    for key, allowed in (
        ("externalTrafficPolicy", ("Cluster", "Local")),
        ("internalTrafficPolicy", ("Cluster", "Local")),
    ):
        if key in spec and spec[key] not in allowed:
            errors.append(FieldError(f"spec.{key}", "NotSupported", spec[key]))
    ports = spec.get("ports")
    if ports is None:
        ports = []
    if not isinstance(ports, list):
        return [*errors, FieldError("spec.ports", "Invalid", ports, "must be a list")]
    headless = spec.get("clusterIP") == "None" or (spec.get("clusterIPs") or [None])[0] == "None"
    if not ports and not headless and service_type != "ExternalName":
        errors.append(FieldError("spec.ports", "Required"))
    names: set[str] = set()
    endpoints: set[tuple[Any, Any]] = set()
    for i, port in enumerate(ports):
        path = f"spec.ports[{i}]"
        if not isinstance(port, dict):
            errors.append(FieldError(path, "Invalid", port, "must be an object"))
            continue
        protocol = port.setdefault("protocol", "TCP")
        if protocol not in PROTOCOLS:
            errors.append(FieldError(f"{path}.protocol", "NotSupported", protocol))
        number = port.get("port")
        if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 65536:
            errors.append(
                FieldError(
                    f"{path}.port", "Invalid", number, "must be between 1 and 65535, inclusive"
                )
            )
        target = port.get("targetPort")
        if target in (None, 0, ""):
            port["targetPort"] = number
        elif isinstance(target, int) and not isinstance(target, bool):
            if not 0 < target < 65536:
                errors.append(
                    FieldError(
                        f"{path}.targetPort",
                        "Invalid",
                        target,
                        "must be between 1 and 65535, inclusive",
                    )
                )
        elif not isinstance(target, str) or not _valid_port_name(target):
            errors.append(
                FieldError(
                    f"{path}.targetPort",
                    "Invalid",
                    target,
                    "must contain only lower-case "
                    "alphanumerics and '-', at most 15 characters, with at least one letter",
                )
            )
        name = port.get("name")
        if name:
            if not isinstance(name, str) or not _PORT_NAME.match(name) or len(name) > 63:
                errors.append(FieldError(f"{path}.name", "Invalid", name, "must be a DNS label"))
            elif name in names:
                errors.append(FieldError(f"{path}.name", "Duplicate", name))
            names.add(str(name))
        elif len(ports) > 1:
            errors.append(FieldError(f"{path}.name", "Required"))
        if (number, protocol) in endpoints:
            errors.append(FieldError(path, "Duplicate", {"port": number, "protocol": protocol}))
        endpoints.add((number, protocol))
    selector = spec.get("selector")
    if selector is not None and (
        not isinstance(selector, dict) or not all(isinstance(v, str) for v in selector.values())
    ):
        errors.append(FieldError("spec.selector", "Invalid", selector, "must be a map of strings"))
    return errors


def _valid_port_name(name: str) -> bool:
    return (
        len(name) <= 15
        and bool(_IANA_SVC_NAME.match(name))
        and "--" not in name
        and any(c.isalpha() for c in name)
    )
