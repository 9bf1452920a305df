"""kube-proxy's Prometheus metrics, under kube-proxy's names, and the small HTTP servers.

`ProxyMetrics` owns a private `CollectorRegistry` (no global registry: tests build
as many as they like) holding upstream's metrics (`pkg/proxy/metrics/metrics.go`)
with their names, help texts (with component-base's "[ALPHA] " prefix), label names
and bucket boundaries, so existing dashboards and alerts work unchanged. As upstream
since v1.33, the metrics of a per-family proxier carry `ip_family` ("IPv4", "IPv6"):
the sync durations, network programming latency, last (queued) sync timestamps,
restore / nftables failures, rule counts, no-local-endpoint gauges and the conntrack
reconciler's `kubeproxy_conntrack_reconciler_deleted_entries_total` and
`..._sync_duration_seconds`; the change counters and healthz counters do not. Every
recording method takes the family as a keyword defaulting to IPv4.

Ours sit beside them, named `kubeproxy_py_*` so nobody mistakes them for upstream's:
`kubeproxy_py_sync_failures_total{backend}`,
`kubeproxy_py_skipped_objects_total{resource,reason}`,
`kubeproxy_py_sync_phase_duration_seconds{phase}` (render, read, write: where a sync's
time goes, reported by the backend through the seam's metrics sink),
`kubeproxy_py_conntrack_cleanup_failures_total`, `kubeproxy_py_unsupported_total{feature}`
(a service uses something the active backend does not program; once per service and
feature), `kubeproxy_py_service_health_servers` and
`kubeproxy_py_service_health_listen_failures_total` (healthCheckNodePort servers).

The exposition matches a Go server's where a query could tell the difference:
prometheus_client's extra `*_created` series are dropped, and histogram `le` labels
are written as Go writes them (`le="1"`, not `le="1.0"`), because `{le="1"}` in a
recording rule is an exact string match. `exposition()` returns the text.

Serving: `ProxyMetrics.serve("IP:port")` starts a `ThreadingHTTPServer` on a daemon
thread answering `/metrics`, `/healthz` ("ok", as upstream's metrics server) and
`/proxyMode`. `start_http_server` is shared with `proxy.health`; a port that cannot
be bound raises `ServeError` (an `OSError`) at once, naming the server and address.

Concurrency: the recording methods are called from the sync thread and the HTTP
handler threads; prometheus_client's metric objects are thread-safe, and nothing
here blocks except `close()`, which waits for the server thread to stop.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy.config import split_host_port
from proxy.model import IPFamily

log = logging.getLogger(__name__)

SYNC_DURATION_BUCKETS: tuple[float, ...] = tuple(0.001 * 2**i for i in range(15))
"""Upstream's `ExponentialBuckets(0.001, 2, 15)`: 1 ms to 16.384 s."""

NETWORK_PROGRAMMING_BUCKETS: tuple[float, ...] = (
    0.0,
    0.25,
    0.5,
    *(float(s) for s in range(1, 60)),  # 1 s .. 59 s
    *(float(s) for s in range(60, 120, 5)),  # 60 s .. 115 s
    *(float(s) for s in range(120, 301, 30)),  # 2 min .. 5 min
)
"""Upstream's merged linear buckets; its `merge` starts from a 0 bucket, so we do too."""

_ALPHA = "[ALPHA] "
FAMILY = "ip_family"
"""The label upstream added (v1.33) to the metrics of its per-family proxiers."""


def family_label(family: IPFamily) -> str:
    """The label value, as Kubernetes names the family ("IPv4", "IPv6")."""
    return "IPv6" if family == IPFamily.V6 else "IPv4"


class ServeError(OSError):
    """A metrics or health server could not listen (e.g. the port is already bound)."""


class ProxyMetrics:
    """Every metric the proxy reports, in one private registry."""

    def __init__(self, *, backend: str | None = None, process_metrics: bool = True) -> None:
        """`backend` ("iptables", "nftables", "ipvs") decides which upstream failure counters
        a failed sync moves and what `/proxyMode` answers; None counts failures only in
        `kubeproxy_py_sync_failures_total{backend="unknown"}`."""
        self.backend = backend
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        if process_metrics:
            ProcessCollector(registry=registry)

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(
                name, _ALPHA + doc, [FAMILY], buckets=tuple(buckets), registry=registry
            )

        self.sync_duration = histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            SYNC_DURATION_BUCKETS,
        )
        self.sync_full_duration = histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            SYNC_DURATION_BUCKETS,
        )
        self.sync_partial_duration = histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            SYNC_DURATION_BUCKETS,
        )
        self.network_programming = histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            NETWORK_PROGRAMMING_BUCKETS,
        )
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            _ALPHA + "The last time proxy rules were successfully synced",
            [FAMILY],
            registry=registry,
        )
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            _ALPHA + "The last time a sync of proxy rules was queued",
            [FAMILY],
            registry=registry,
        )
        self.endpoint_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            _ALPHA + "Pending proxy rules Endpoint changes",
            registry=registry,
        )
        # prometheus_client strips "_total" from a counter's name and writes it back on
        # the sample, so these expose exactly upstream's names.
        self.endpoint_changes = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            _ALPHA + "Cumulative proxy rules Endpoint changes",
            registry=registry,
        )
        self.service_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            _ALPHA + "Pending proxy rules Service changes",
            registry=registry,
        )
        self.service_changes = Counter(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            _ALPHA + "Cumulative proxy rules Service changes",
            registry=registry,
        )
        self.iptables_restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            _ALPHA + "Cumulative proxy iptables restore failures",
            [FAMILY],
            registry=registry,
        )
        self.iptables_partial_restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
            _ALPHA + "Cumulative proxy iptables partial restore failures",
            [FAMILY],
            registry=registry,
        )
        self.nftables_sync_failures = Counter(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
            _ALPHA + "Cumulative proxy nftables sync failures",
            [FAMILY],
            registry=registry,
        )
        # A gauge despite the "_total" suffix, as upstream.
        self.iptables_rules = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_total",
            _ALPHA + "Total number of iptables rules owned by kube-proxy",
            [FAMILY, "table"],
            registry=registry,
        )
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            _ALPHA + "Number of services with a Local traffic policy and no endpoints",
            [FAMILY, "traffic_policy"],
            registry=registry,
        )
        self.healthz = Counter(
            "kubeproxy_proxy_healthz_total",
            _ALPHA + "Cumulative proxy healthz HTTP status",
            ["code"],
            registry=registry,
        )
        self.livez = Counter(
            "kubeproxy_proxy_livez_total",
            _ALPHA + "Cumulative proxy livez HTTP status",
            ["code"],
            registry=registry,
        )
        self.conntrack_deleted = Counter(
            "kubeproxy_conntrack_reconciler_deleted_entries_total",
            _ALPHA + "Cumulative conntrack flows deleted by conntrack reconciler",
            [FAMILY],
            registry=registry,
        )
        self.conntrack_duration = Histogram(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            _ALPHA + "ReconcileConntrackFlowsLatency latency in seconds",
            [FAMILY],
            buckets=SYNC_DURATION_BUCKETS,
            registry=registry,
        )
        self.sync_failures = Counter(
            "kubeproxy_py_sync_failures_total",
            "Backend syncs that failed, by backend (kube-proxy-py)",
            ["backend"],
            registry=registry,
        )
        self.skipped_objects = Counter(
            "kubeproxy_py_skipped_objects_total",
            "Malformed API objects, or parts of them, skipped (kube-proxy-py)",
            ["resource", "reason"],
            registry=registry,
        )
        self.sync_phases = Histogram(
            "kubeproxy_py_sync_phase_duration_seconds",
            "Time spent in each phase of a backend sync: render, read, write (kube-proxy-py)",
            ["phase"],
            buckets=SYNC_DURATION_BUCKETS,
            registry=registry,
        )
        self.conntrack_failures = Counter(
            "kubeproxy_py_conntrack_cleanup_failures_total",
            "Stale UDP conntrack cleanups that failed (retried at the next sync) (kube-proxy-py)",
            registry=registry,
        )
        self.unsupported = Counter(
            "kubeproxy_py_unsupported_total",
            "Service ports using a feature the active backend does not program, counted once "
            "per service and feature (kube-proxy-py)",
            ["feature"],
            registry=registry,
        )
        self.service_health_failures = Counter(
            "kubeproxy_py_service_health_listen_failures_total",
            "healthCheckNodePort servers that could not listen, e.g. port in use (kube-proxy-py)",
            registry=registry,
        )
        self.service_health_servers = Gauge(
            "kubeproxy_py_service_health_servers",
            "healthCheckNodePort servers currently listening, one per service (kube-proxy-py)",
            registry=registry,
        )
        self._server: HttpServer | None = None

    # -- recording (the proxier's `SyncMetrics`, the handlers' bad-input sink) -----------

    def observe_sync(self, seconds: float, *, full: bool, family: IPFamily = IPFamily.V4) -> None:
        """One successful backend write took `seconds` (full or partial)."""
        label = family_label(family)
        self.sync_duration.labels(label).observe(seconds)
        (self.sync_full_duration if full else self.sync_partial_duration).labels(label).observe(
            seconds
        )

    def observe_network_programming(
        self, seconds: float, *, family: IPFamily = IPFamily.V4
    ) -> None:
        """A change (EndpointSlice trigger time) reached the kernel `seconds` after it was made."""
        self.network_programming.labels(family_label(family)).observe(seconds)

    def set_last_sync_timestamp(self, unix_time: float, *, family: IPFamily = IPFamily.V4) -> None:
        self.last_sync.labels(family_label(family)).set(unix_time)

    def set_last_queued_timestamp(
        self, unix_time: float, *, family: IPFamily = IPFamily.V4
    ) -> None:
        self.last_queued.labels(family_label(family)).set(unix_time)

    def set_pending_changes(self, *, services: int, endpoints: int) -> None:
        self.service_changes_pending.set(services)
        self.endpoint_changes_pending.set(endpoints)

    def add_changes(self, *, services: int, endpoints: int) -> None:
        if services > 0:
            self.service_changes.inc(services)
        if endpoints > 0:
            self.endpoint_changes.inc(endpoints)

    def count_sync_failure(self, *, partial: bool, family: IPFamily = IPFamily.V4) -> None:
        """A backend sync failed: our counter, plus upstream's counter for this backend."""
        self.sync_failures.labels(self.backend or "unknown").inc()
        label = family_label(family)
        if self.backend in ("iptables", "ipvs"):  # both apply with iptables-restore upstream
            self.iptables_restore_failures.labels(label).inc()
            if partial and self.backend == "iptables":
                self.iptables_partial_restore_failures.labels(label).inc()
        elif self.backend == "nftables":
            self.nftables_sync_failures.labels(label).inc()

    def set_iptables_rules(self, table: str, count: int, family: IPFamily | None = None) -> None:
        """Rules we own in one iptables table ("nat", "filter", "mangle") after a sync."""
        self.iptables_rules.labels(family_label(family or IPFamily.V4), table).set(count)

    def observe_phase(self, phase: str, seconds: float) -> None:
        """One phase of a backend sync ("render", "read", "write") took `seconds`."""
        self.sync_phases.labels(phase).observe(seconds)

    def set_no_local_endpoints(
        self, *, internal: int, external: int, family: IPFamily = IPFamily.V4
    ) -> None:
        """Services with a Local traffic policy and no local endpoint, recounted each sync."""
        label = family_label(family)
        self.no_local_endpoints.labels(label, "internal").set(internal)
        self.no_local_endpoints.labels(label, "external").set(external)

    def count_conntrack_deleted(self, family: IPFamily, count: int) -> None:
        """Stale UDP flows deleted after a sync (upstream's reconciler counter)."""
        self.conntrack_deleted.labels(family_label(family)).inc(count)

    def observe_conntrack_cleanup(self, family: IPFamily, seconds: float) -> None:
        """One stale-flow cleanup of one family took `seconds`."""
        self.conntrack_duration.labels(family_label(family)).observe(seconds)

    def count_conntrack_failure(self) -> None:
        self.conntrack_failures.inc()

    def count_unsupported(self, feature: str) -> None:
        """A service uses `feature`, which the active backend does not program."""
        self.unsupported.labels(feature).inc()

    def count_service_health_failure(self) -> None:
        """A healthCheckNodePort server could not listen."""
        self.service_health_failures.inc()

    def set_service_health_servers(self, count: int) -> None:
        self.service_health_servers.set(count)

    def count_skipped(self, resource: str, reason: str) -> None:
        """A malformed object (or part of one) was skipped, e.g. ("service", "bad-cluster-ip")."""
        self.skipped_objects.labels(resource, reason).inc()

    def count_healthz(self, code: int) -> None:
        self.healthz.labels(str(code)).inc()

    def count_livez(self, code: int) -> None:
        self.livez.labels(str(code)).inc()

    # -- exposition and serving ----------------------------------------------------------

    def exposition(self) -> bytes:
        """The /metrics body (Prometheus text format 0.0.4), as a Go server would write it."""
        return generate_latest(_GoStyle(self.registry))

    def serve(self, address: str) -> tuple[str, int] | None:
        """Serve /metrics on `IP:port` from a daemon thread; return the bound (IP, port).

        An empty address (metrics disabled) serves nothing and returns None. Raises
        `ServeError` when the port cannot be bound.
        """
        if not address:
            log.info("metrics server disabled")
            return None
        if self._server is not None:
            raise RuntimeError("the metrics server is already running")
        self._server = start_http_server(address, self._route, name="metrics")
        return self._server.address

    def close(self) -> None:
        """Stop the metrics server if it runs; waits for its thread."""
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def _route(self, path: str) -> Response | None:
        if path == "/metrics":
            return Response(200, self.exposition(), CONTENT_TYPE_PLAIN_0_0_4)
        if path == "/healthz":
            return Response(200, b"ok", "text/plain; charset=utf-8")
        if path == "/proxyMode" and self.backend:
            return Response(200, self.backend.encode(), "text/plain; charset=utf-8")
        return None


class _GoStyle(Collector):
    """The registry's metrics without `*_created` samples and with Go-formatted `le` labels."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            samples = []
            for original in metric.samples:
                if original.name.endswith("_created"):
                    continue
                sample = original
                if "le" in original.labels:
                    labels = dict(original.labels, le=go_float(float(original.labels["le"])))
                    sample = original._replace(labels=labels)
                samples.append(sample)
            metric.samples = samples
            yield metric


def go_float(value: float) -> str:
    """A float as Go's `strconv.FormatFloat(v, 'g', -1, 64)` writes it ("1", "0.25", "1e+06")."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(str(d) for d in digits)
    point = len(text) + exponent  # position of the decimal point in `text`
    magnitude = point - 1
    prefix = "-" if sign else ""
    if magnitude < -4 or magnitude >= 6:  # Go's rule for the shortest 'g' format
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{prefix}{mantissa}e{'+' if magnitude >= 0 else '-'}{abs(magnitude):02d}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{text}"
    if point >= len(text):
        return f"{prefix}{text}{'0' * (point - len(text))}"
    return f"{prefix}{text[:point]}.{text[point:]}"


# -- the small HTTP servers (metrics here, health in proxy.health) -----------------------


@dataclass(frozen=True, slots=True)
class Response:
    """What a route answers: status, body, content type, extra headers."""

    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)


Route = Callable[[str], Response | None]
"""URL path (no query) -> the response, or None for 404. Runs on a handler thread."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restart finds the port in TIME_WAIT, not "in use"


class _Server6(_Server):
    address_family = socket.AF_INET6


@dataclass
class HttpServer:
    """A running server: where it listens, and how to stop it."""

    server: ThreadingHTTPServer
    thread: threading.Thread
    name: str

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return (host if isinstance(host, str) else bytes(host).decode()), int(port)

    def close(self, timeout: float = 5.0) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout)


def start_http_server(address: str, route: Route, *, name: str) -> HttpServer:
    """Listen on `IP:port` (port 0: any free port) and serve `route` from a daemon thread.

    Binding happens here, before returning, so a taken port fails the caller at
    start-up with `ServeError` rather than later in a thread.
    """
    try:
        host, port = split_host_port(address)
    except ValueError as err:
        raise ServeError(f"cannot serve {name} on {address!r}: {err}") from None
    server_class = _Server6 if ":" in host else _Server
    try:
        server = server_class((host, port), _handler_for(route))
    except OSError as err:
        reason = err.strerror or str(err)
        raise ServeError(err.errno, f"cannot serve {name} on {address}: {reason}") from err
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.1},
        name=f"http-{name}",
        daemon=True,
    )
    thread.start()
    running = HttpServer(server, thread, name)
    host, port = running.address
    log.info("%s server listening on %s:%d", name, host, port)
    return running


def _handler_for(route: Route) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for scrapers; every reply has a length
        server_version = "kube-proxy-py"
        timeout = 30  # an idle or stalled client cannot hold a thread for ever

        def do_GET(self) -> None:
            self._answer(with_body=True)

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def _answer(self, *, with_body: bool) -> None:
            response = route(urlsplit(self.path).path)
            if response is None:
                response = Response(404, b"404 page not found\n", "text/plain; charset=utf-8")
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for key, value in response.headers.items():
                self.send_header(key, value)
            self.end_headers()
            if with_body:
                self.wfile.write(response.body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
