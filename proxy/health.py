"""Proxy health: upstream's "no queued change older than the timeout" rule, and its server.

The rule is kube-proxy's (`pkg/proxy/healthcheck/proxier_health.go`), for our one
proxier:

- `queued_update()` records when the oldest change still waiting for the kernel
  arrived (later calls keep the oldest); `updated()` records a successful sync and
  forgets the queued change.
- Healthy while starting (before the first `updated()`: upstream calls it when the
  sync loop starts, so a proxy whose first sync never succeeds is judged from then),
  or when nothing is queued, or while the oldest queued change is younger than
  `timeout` (2 x the sync period). Unhealthy once it is `timeout` old or older.
- `/healthz` additionally needs the Node to be eligible (not being deleted, not
  tainted `ToBeDeletedByClusterAutoscaler`: `sync_node`); `/livez` ignores the Node.
  Eligible until told otherwise, as upstream.

Both answer 200 or 503 with upstream's headers and JSON body, byte for byte in
layout: `{"lastUpdated": "<t>","currentTime": "<t>", "nodeEligible": true}` (livez
without nodeEligible), the times as Go's `time.Time.String()` writes them in UTC
("2024-05-01 12:00:00.123456 +0000 UTC"; a proxy that never synced reports Go's zero
time). A healthy answer reports lastUpdated = currentTime, as upstream does for
compatibility with older releases. Each answer is counted in
`kubeproxy_proxy_healthz_total{code}` / `kubeproxy_proxy_livez_total{code}`.

Clocks are injected: `clock` (monotonic) measures ages, `wall_clock` only dates the
JSON, so a wall-clock jump never flips health. Concurrency: the sync thread, the
Node reflector thread and the HTTP handler threads call in; one lock guards the
three fields, and nothing blocks while holding it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from proxy.metrics import HttpServer, Response, start_http_server

GO_ZERO_TIME = "0001-01-01 00:00:00 +0000 UTC"
"""How Go prints `time.Time{}`: the lastUpdated of a proxy that never synced."""

_JSON = "application/json"
_HEADERS = {"X-Content-Type-Options": "nosniff"}


class HealthCounter(Protocol):
    """Where answers are counted (implemented by `proxy.metrics.ProxyMetrics`)."""

    def count_healthz(self, code: int) -> None: ...
    def count_livez(self, code: int) -> None: ...


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """One evaluation of the rule, with the times the JSON body reports."""

    healthy: bool
    """The proxier's health alone (what /livez answers)."""
    node_eligible: bool
    last_updated: float | None
    """Wall time of the last successful sync; None before the first."""
    current_time: float
    """Wall time of the evaluation."""

    @property
    def serving(self) -> bool:
        """What /healthz answers: healthy and the Node eligible."""
        return self.healthy and self.node_eligible


class ProxyHealth:
    """Tracks queued and applied changes; answers /healthz and /livez."""

    def __init__(
        self,
        *,
        timeout: float,
        metrics: HealthCounter | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`timeout`: how long a queued change may wait (upstream: 2 x sync period)."""
        self.timeout = timeout
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._last_updated: float | None = None  # monotonic
        self._oldest_queued: float | None = None  # monotonic
        self._node_eligible = True
        self._server: HttpServer | None = None

    # -- signals -------------------------------------------------------------------------

    def queued_update(self) -> None:
        """A change arrived that the kernel does not have yet (keeps the oldest such time)."""
        now = self._clock()
        with self._lock:
            if self._oldest_queued is None:
                self._oldest_queued = now

    def updated(self) -> None:
        """The kernel now matches everything queued so far (or the sync loop just started)."""
        now = self._clock()
        with self._lock:
            self._oldest_queued = None
            self._last_updated = now

    def sync_node(self, eligible: bool) -> None:
        """This Node's state: False while it is being deleted or tainted for deletion."""
        with self._lock:
            self._node_eligible = eligible

    # -- evaluation ----------------------------------------------------------------------

    def status(self) -> HealthStatus:
        """Evaluate the rule now."""
        with self._lock:
            last_updated, oldest_queued = self._last_updated, self._oldest_queued
            node_eligible = self._node_eligible
        now, wall_now = self._clock(), self._wall_clock()
        healthy = (
            last_updated is None  # starting up
            or oldest_queued is None  # fully synced
            or now - oldest_queued < self.timeout  # a change waits, but is not late yet
        )
        return HealthStatus(
            healthy=healthy,
            node_eligible=node_eligible,
            last_updated=None if last_updated is None else wall_now - (now - last_updated),
            current_time=wall_now,
        )

    def is_healthy(self) -> bool:
        """The proxier's health, ignoring the Node (upstream's `IsHealthy`, /livez)."""
        return self.status().healthy

    def node_eligible(self) -> bool:
        with self._lock:
            return self._node_eligible

    def healthz(self) -> Response:
        """The /healthz answer (and count it)."""
        status = self.status()
        code = 200 if status.serving else 503
        if self._metrics is not None:
            self._metrics.count_healthz(code)
        last, now = _times(status, code)
        eligible = "true" if status.node_eligible else "false"
        body = f'{{"lastUpdated": "{last}","currentTime": "{now}", "nodeEligible": {eligible}}}'
        return Response(code, body.encode(), _JSON, _HEADERS)

    def livez(self) -> Response:
        """The /livez answer (and count it)."""
        status = self.status()
        code = 200 if status.healthy else 503
        if self._metrics is not None:
            self._metrics.count_livez(code)
        last, now = _times(status, code)
        body = f'{{"lastUpdated": "{last}","currentTime": "{now}"}}'
        return Response(code, body.encode(), _JSON, _HEADERS)

    # -- serving -------------------------------------------------------------------------

    def serve(self, address: str) -> tuple[str, int] | None:
        """Serve /healthz and /livez on `IP:port` from a daemon thread; return (IP, port).

        An empty address (health disabled) serves nothing and returns None. Raises
        `proxy.metrics.ServeError` when the port cannot be bound.
        """
        if not address:
            return None
        if self._server is not None:
            raise RuntimeError("the health server is already running")
        self._server = start_http_server(address, self._route, name="health")
        return self._server.address

    def close(self) -> None:
        """Stop the health server if it runs; waits for its thread."""
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def _route(self, path: str) -> Response | None:
        if path == "/healthz":
            return self.healthz()
        if path == "/livez":
            return self.livez()
        return None


def _times(status: HealthStatus, code: int) -> tuple[str, str]:
    now = go_time_string(status.current_time)
    if code == 200:
        return now, now  # upstream: a healthy answer reports lastUpdated = now
    last = GO_ZERO_TIME if status.last_updated is None else go_time_string(status.last_updated)
    return last, now


def go_time_string(unix_time: float) -> str:
    """Go's `time.Time.String()` for a UTC time: "2006-01-02 15:04:05.999999999 +0000 UTC".

    Trailing zeros of the fraction are dropped, and the dot with them when it is
    whole seconds. Python's float clock resolves microseconds, so at most 6 digits.
    """
    moment = datetime.fromtimestamp(unix_time, UTC)
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return f"{text} +0000 UTC"
