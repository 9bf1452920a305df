"""The Kubernetes objects a grid point holds, as plain values (no lab, no kernel).

Every service is ClusterIP, one TCP port (80 -> 8080), in namespace ``bench``, with one
EndpointSlice listing its endpoints, all ready, on the benchmark's node. Endpoints are
real pods (echo servers) up to `REAL_PODS`; beyond that they are addresses of the
cluster CIDR where nothing listens (198.18.65.0 upwards): the rules are the same size
and the kernel does the same work, but a packet sent to such an endpoint goes nowhere,
so VIPs are probed only at points whose endpoints are all real.

The same values feed the lab's API (`benchmarks.cluster`) and the generator of
upstream's ruleset (`benchmarks.upstream`), so both describe exactly one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lab.slicewriter import rfc3339_nano

NAMESPACE = "bench"
PORT_NAME = "http"
SERVICE_PORT = 80
ECHO_PORT = 8080
REAL_PODS = 10
"""Endpoint pods that really answer; more endpoints per service reuse synthetic addresses."""


@dataclass(frozen=True)
class ServiceSpec:
    """One Service and its endpoints ("ip:port" strings)."""

    name: str
    vip: str
    endpoints: tuple[str, ...]

    @property
    def port_name(self) -> str:
        """Upstream's ServicePortName string, ``namespace/name:port``."""
        return f"{NAMESPACE}/{self.name}:{PORT_NAME}"


def vip(index: int) -> str:
    """The index-th address of the service CIDR 198.19.0.0/16, skipping .0 and .255."""
    if index >= 254 * 256:
        raise ValueError(f"service index {index} does not fit 198.19.0.0/16")
    return f"198.19.{index // 254}.{index % 254 + 1}"


def synthetic_ip(index: int) -> str:
    """An endpoint address where no pod listens: 198.18.65.1 upwards (in the cluster CIDR)."""
    return f"198.18.{65 + index // 254}.{index % 254 + 1}"


def endpoint_addresses(pod_ips: list[str], count: int) -> tuple[str, ...]:
    """`count` endpoints: the real pods first, then synthetic addresses."""
    real = pod_ips[:count]
    extra = [synthetic_ip(i) for i in range(count - len(real))]
    return tuple(f"{ip}:{ECHO_PORT}" for ip in (*real, *extra))


def services(count: int, endpoints: tuple[str, ...], *, first: int = 0) -> list[ServiceSpec]:
    """`count` services svc<first>.. with the same endpoints each."""
    return [ServiceSpec(f"svc{i}", vip(i), endpoints) for i in range(first, first + count)]


def service_body(spec: ServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "namespace": NAMESPACE},
        "spec": {
            "clusterIP": spec.vip,
            "clusterIPs": [spec.vip],
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": SERVICE_PORT,
                    "targetPort": ECHO_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def slice_body(
    name: str,
    endpoints: list[tuple[str, bool]],
    *,
    node: str,
    port: int = ECHO_PORT,
    trigger: float | None = None,
) -> dict[str, Any]:
    """The EndpointSlice of service `name`: (ip, ready) pairs, all on `port`.

    `trigger` stamps ``endpoints.kubernetes.io/last-change-trigger-time`` (what the
    proxy's network programming histogram measures from), as the endpoint controller does.
    """
    meta: dict[str, Any] = {
        "name": f"{name}-bench",
        "namespace": NAMESPACE,
        "labels": {"kubernetes.io/service-name": name},
    }
    if trigger is not None:
        stamp = rfc3339_nano(trigger)
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": stamp}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv4",
        "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": ready}, "nodeName": node}
            for ip, ready in endpoints
        ],
    }


def spec_slice(spec: ServiceSpec, *, node: str) -> dict[str, Any]:
    """The EndpointSlice of a `ServiceSpec` (all endpoints on ECHO_PORT, ready)."""
    return slice_body(spec.name, [(ep.rsplit(":", 1)[0], True) for ep in spec.endpoints], node=node)
