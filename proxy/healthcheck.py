"""healthCheckNodePort servers: one small HTTP server per `externalTrafficPolicy: Local` service.

A cloud load balancer in front of a Local service probes each node's
`healthCheckNodePort` and sends traffic only to nodes answering 200, i.e. nodes with a
ready endpoint of that service (kube-proxy's `pkg/proxy/healthcheck/service_health.go`).

Rules, as upstream:

- A server per service whose ports have `externalTrafficPolicy: Local` and a
  `healthCheckNodePort`; opened when such a service appears, closed when it goes or
  changes its port (then reopened on the new one).
- It listens on every address (`0.0.0.0`) unless `nodePortAddresses` is set, then on
  each node address it allows (departure: upstream reads the addresses of the host's
  interfaces; we use the Node's addresses, what the proxy knows). When none is
  allowed, it listens on every address with a warning, as upstream does when it
  cannot list them. A change of those addresses reopens every server.
- Every path answers, with `Content-Type: application/json` and
  `X-Content-Type-Options: nosniff`, upstream's body (same layout, tab-indented):
  `{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": b}`.
  200 when the service has a local ready endpoint (counted by distinct address over
  all its ports; terminating ones do not count) and the proxy is healthy (the
  `/livez` rule), else 503.
- A port that cannot be opened (already in use) is logged with the service's name and
  counted (`kubeproxy_py_service_health_listen_failures_total`); the other services'
  servers and the sync go on, and the failed one is tried again after the next sync.

Upstream has no metric for these servers; `kubeproxy_py_service_health_servers` counts
the open ones.

The work follows the change: `after_sync` (a proxier after-sync hook) looks only at the
services named in `SyncHint.changed` (every one on a full sync) plus failed ones, and
keeps its own index of each service's ports.

Sockets open in `netns` when one is named (the backend's `BackendConfig.netns`, set
by tests that run a backend in a namespace), else in the caller's: the proxy runs in
the node's. The serving threads need no namespace: a socket keeps the one it was
created in.

Concurrency: `after_sync` and `close` run on the proxier's sync thread (and the
stopping main thread); the HTTP handler threads read the local-endpoint counts under
`_lock` and call `proxy_healthy`, which must be thread-safe (`ProxyHealth.is_healthy`).
Nothing blocks while holding the lock; closing a server waits for its thread outside it.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from proxy.config.addresses import join_host_port
from proxy.kernel.netns import run_in_netns
from proxy.metrics import HttpServer, Response, Route, start_http_server
from proxy.model import (
    NodeContext,
    ProxyState,
    ServiceKey,
    ServicePortName,
    ServicePortState,
    SyncHint,
)

log = logging.getLogger(__name__)

_HEADERS = {"X-Content-Type-Options": "nosniff"}
ALL_ADDRESSES = ("0.0.0.0",)

Listen = Callable[[str, Route], HttpServer]
"""Bind `IP:port` and serve the route (`proxy.metrics.start_http_server`); raises OSError."""


def _listen(address: str, route: Route) -> HttpServer:
    return start_http_server(address, route, name="service-health")


class ServiceHealthMetrics(Protocol):
    """Where the servers are counted (implemented by `proxy.metrics.ProxyMetrics`)."""

    def count_service_health_failure(self) -> None: ...
    def set_service_health_servers(self, count: int) -> None: ...


def health_body(key: ServiceKey, local_endpoints: int, proxy_healthy: bool) -> bytes:
    """Upstream's body, byte for byte (a dedented Go template: tabs, no final newline)."""
    healthy = "true" if proxy_healthy else "false"
    return (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": {json.dumps(key.namespace)},\n'
        f'\t\t"name": {json.dumps(key.name)}\n'
        "\t},\n"
        f'\t"localEndpoints": {local_endpoints},\n'
        f'\t"serviceProxyHealthy": {healthy}\n'
        "}"
    ).encode()


def listen_addresses(node: NodeContext) -> tuple[str, ...]:
    """Where health-check node ports listen: every address, or those nodePortAddresses allows.

    Both families, as upstream's per-family servers: every address is `::` (which also
    takes IPv4 there) on a node with an IPv6 address, else `0.0.0.0`; "primary" is the
    node's first address of each family (upstream's GetNodeHostIPs); a CIDR takes the
    node's addresses inside it.
    """
    every = ("::",) if any(":" in ip for ip in node.node_ips) else ALL_ADDRESSES
    if not node.nodeport_addresses:
        return every
    chosen: list[str] = []
    for raw in node.nodeport_addresses:
        entry = raw.strip()
        if entry == "primary":
            for v6 in (False, True):
                first = next((ip for ip in node.node_ips if (":" in ip) == v6), None)
                if first is not None:
                    chosen.append(first)
            continue
        network = ipaddress.ip_network(entry, strict=False)
        if network.prefixlen == 0:
            return every
        chosen.extend(
            ip
            for ip in node.node_ips
            if (":" in ip) == (network.version == 6) and ipaddress.ip_address(ip) in network
        )
    return tuple(dict.fromkeys(chosen)) or every


def wanted(states: Iterable[ServicePortState]) -> tuple[int, int]:
    """(healthCheckNodePort or 0, local ready endpoints by distinct address) of one service."""
    port = 0
    local: set[str] = set()
    for state in states:
        if state.port.external_policy_local and state.port.health_check_node_port:
            port = state.port.health_check_node_port
        local.update(ep.ip for ep in state.all_endpoints if ep.is_local and ep.ready)
    return port, len(local)


@dataclass
class _Instance:
    port: int
    local_endpoints: int
    servers: list[HttpServer] = field(default_factory=list)


class ServiceHealthServers:
    """The health-check node port servers of every Local service; see the module doc."""

    def __init__(
        self,
        *,
        proxy_healthy: Callable[[], bool],
        metrics: ServiceHealthMetrics,
        listen: Listen = _listen,
        netns: str | None = None,
    ) -> None:
        self._proxy_healthy = proxy_healthy
        self._metrics = metrics
        self._listen = listen
        self._netns = netns
        self._lock = threading.Lock()
        self._services: dict[ServiceKey, _Instance] = {}  # guarded by _lock
        # Owned by the sync thread.
        self._ports: dict[ServiceKey, set[ServicePortName]] = {}
        self._failed: set[ServiceKey] = set()
        self._addresses: tuple[str, ...] | None = None

    # -- the proxier's after-sync hook ---------------------------------------------------

    def after_sync(self, state: ProxyState, hint: SyncHint) -> None:
        """Open, move, close servers and update the counts for the services that changed."""
        touched = set(self._failed)
        self._failed = set()
        for name in hint.changed:
            key = name.service
            touched.add(key)
            if name in state.services:
                self._ports.setdefault(key, set()).add(name)
            elif key in self._ports:
                self._ports[key].discard(name)
                if not self._ports[key]:
                    del self._ports[key]
        addresses = listen_addresses(state.node)
        if addresses != self._addresses:
            if self._addresses is not None:
                log.info("health-check node ports move to %s", ", ".join(addresses))
            self._addresses = addresses
            touched.update(self._services)
            for key in list(self._services):
                self._close(key)
        for key in sorted(touched):
            names = self._ports.get(key, ())
            port, local = wanted(state.services[name] for name in names)
            self._apply(key, port, local, addresses)
        self._metrics.set_service_health_servers(len(self._services))

    def _apply(self, key: ServiceKey, port: int, local: int, addresses: tuple[str, ...]) -> None:
        current = self._services.get(key)
        if current is not None and current.port == port:
            with self._lock:
                current.local_endpoints = local
            return
        if current is not None:
            self._close(key)
        if not port:
            return
        servers: list[HttpServer] = []
        try:
            for address in addresses:
                where = join_host_port(address, port)
                bind = functools.partial(self._listen, where, self._route_for(key))
                servers.append(run_in_netns(self._netns, bind))
        except OSError as err:
            for server in servers:
                server.close()
            self._failed.add(key)
            self._metrics.count_service_health_failure()
            log.error(
                "service %s: cannot open its health-check node port %d (%s); "
                "retrying after the next sync",
                key,
                port,
                err,
            )
            return
        log.info("service %s: health-check node port %d open", key, port)
        with self._lock:
            self._services[key] = _Instance(port=port, local_endpoints=local, servers=servers)

    def _close(self, key: ServiceKey) -> None:
        with self._lock:
            instance = self._services.pop(key, None)
        if instance is None:
            return
        for server in instance.servers:
            server.close()
        log.info("service %s: health-check node port %d closed", key, instance.port)

    def close(self) -> None:
        """Close every server (the proxy is stopping)."""
        with self._lock:
            keys = list(self._services)
        for key in keys:
            self._close(key)

    # -- answering (HTTP handler threads) ------------------------------------------------

    def _route_for(self, key: ServiceKey) -> Route:
        def route(_path: str) -> Response | None:
            return self.answer(key)

        return route

    def answer(self, key: ServiceKey) -> Response:
        """What the health-check node port of `key` answers now."""
        with self._lock:
            instance = self._services.get(key)
            count = instance.local_endpoints if instance is not None else 0
        healthy = self._proxy_healthy()
        code = 200 if count and healthy else 503
        return Response(code, health_body(key, count, healthy), "application/json", _HEADERS)

    def ports(self) -> dict[ServiceKey, tuple[int, int]]:
        """Open servers: service -> (port, local endpoints) (for tests and the lab)."""
        with self._lock:
            return {k: (i.port, i.local_endpoints) for k, i in self._services.items()}
