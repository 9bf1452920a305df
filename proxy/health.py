"""Proxy health: upstream's "no queued change older than the timeout" rule, and its server.

The rule is kube-proxy's (`pkg/proxy/healthcheck/proxier_health.go`, v1.33+), kept
per IP family as upstream keeps it per proxier (`families`, IPv4 only until
dual-stack; a signal without a family applies to every family):

- `queued_update()` records when the oldest change still waiting for the kernel
  arrived (later calls keep the oldest); `updated()` records a successful sync and
  forgets the queued change.
- A family is healthy before its first `updated()` (upstream calls it when the sync
  loop starts, so a proxy whose first sync never succeeds is judged from then), when
  nothing is queued, or while the oldest queued change is younger than `timeout`
  (2 x the sync period); unhealthy once it is `timeout` old or older. The proxy is
  healthy when every family is.
- `/healthz` additionally needs the Node to be eligible (not being deleted, not
  tainted `ToBeDeletedByClusterAutoscaler`: `sync_node`); `/livez` ignores the Node.
  Eligible until told otherwise, as upstream.

Both answer 200 or 503 with upstream's headers and its JSON body (Go's
`json.Marshal` of `ProxyHealth`, field for field and in order):
`{"lastUpdated":T,"currentTime":T,"nodeEligible":true,"healthy":true,
"status":{"IPv4":{"lastUpdated":T,"healthy":true}}}`; `/livez` has no `nodeEligible`,
and `status` is left out while no family has synced. `healthy` is the proxier's
health alone (a 503 for an ineligible Node can say `"healthy":true`). Times are RFC
3339 in UTC with the fraction's trailing zeros dropped, as Go writes a `time.Time`
("2024-05-01T12:00:00.123456Z"; Go's zero time "0001-01-01T00:00:00Z" before any
sync). The top-level `lastUpdated` is the latest family's, except that a 200 answer
reports it equal to `currentTime`, as upstream does for compatibility with older
releases; the per-family ones are always the real times. The older fields
(`lastUpdated`, `currentTime`, `nodeEligible`) keep their names, so old probes and
scripts still read them. Each answer is counted in `kubeproxy_proxy_healthz_total{code}`
/ `kubeproxy_proxy_livez_total{code}`.

Clocks are injected: `clock` (monotonic) measures ages, `wall_clock` only dates the
JSON, so a wall-clock jump never flips health. Concurrency: the sync thread, the
Node reflector thread and the HTTP handler threads call in; one lock guards the
per-family fields, and nothing blocks while holding it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Protocol

from proxy.metrics import HttpServer, Response, family_label, start_http_server
from proxy.model import IPFamily

GO_ZERO_TIME = "0001-01-01T00:00:00Z"
"""How Go's JSON writes `time.Time{}`: the lastUpdated of a proxy that never synced."""

_JSON = "application/json"
_HEADERS = {"X-Content-Type-Options": "nosniff"}


class HealthCounter(Protocol):
    """Where answers are counted (implemented by `proxy.metrics.ProxyMetrics`)."""

    def count_healthz(self, code: int) -> None: ...
    def count_livez(self, code: int) -> None: ...


@dataclass(frozen=True, slots=True)
class FamilyStatus:
    """One family's proxier: its last successful sync (wall time) and health."""

    last_updated: float
    healthy: bool


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """One evaluation of the rule, with the times the JSON body reports."""

    healthy: bool
    """The proxiers' health alone (what /livez answers): every family healthy."""
    node_eligible: bool
    last_updated: float | None
    """Wall time of the latest successful sync of any family; None before the first."""
    current_time: float
    """Wall time of the evaluation."""
    families: Mapping[IPFamily, FamilyStatus] = field(default_factory=lambda: MappingProxyType({}))
    """Per family that has synced (or started its sync loop)."""

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
        families: Iterable[IPFamily] = (IPFamily.V4,),
    ) -> None:
        """`timeout`: how long a queued change may wait (upstream: 2 x sync period).
        `families`: the proxiers (IP families) judged; a signal without a family
        applies to all of them."""
        self.timeout = timeout
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._families = tuple(dict.fromkeys(families))
        self._lock = threading.Lock()
        self._last_updated: dict[IPFamily, float] = {}  # monotonic
        self._oldest_queued: dict[IPFamily, float] = {}  # monotonic
        self._node_eligible = True
        self._server: HttpServer | None = None

    # -- signals -------------------------------------------------------------------------

    def queued_update(self, family: IPFamily | None = None) -> None:
        """A change arrived that the kernel does not have yet (keeps the oldest such time)."""
        now = self._clock()
        with self._lock:
            for one in self._which(family):
                self._oldest_queued.setdefault(one, now)

    def updated(self, family: IPFamily | None = None) -> None:
        """The kernel now matches everything queued so far (or the sync loop just started)."""
        now = self._clock()
        with self._lock:
            for one in self._which(family):
                self._oldest_queued.pop(one, None)
                self._last_updated[one] = now

    def _which(self, family: IPFamily | None) -> tuple[IPFamily, ...]:
        return self._families if family is None else (family,)

    def sync_node(self, eligible: bool) -> None:
        """This Node's state: False while it is being deleted or tainted for deletion."""
        with self._lock:
            self._node_eligible = eligible

    # -- evaluation ----------------------------------------------------------------------

    def status(self) -> HealthStatus:
        """Evaluate the rule now."""
        with self._lock:
            last_updated, oldest_queued = dict(self._last_updated), dict(self._oldest_queued)
            node_eligible = self._node_eligible
        now, wall_now = self._clock(), self._wall_clock()
        families: dict[IPFamily, FamilyStatus] = {}
        # As upstream, only a family that has synced (or started) can be unhealthy.
        for family, updated in sorted(last_updated.items()):
            queued = oldest_queued.get(family)
            families[family] = FamilyStatus(
                last_updated=wall_now - (now - updated),
                healthy=queued is None or now - queued < self.timeout,
            )
        latest = max((f.last_updated for f in families.values()), default=None)
        return HealthStatus(
            healthy=all(f.healthy for f in families.values()),
            node_eligible=node_eligible,
            last_updated=latest,
            current_time=wall_now,
            families=MappingProxyType(families),
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
        return Response(code, _body(status, code, with_node=True), _JSON, _HEADERS)

    def livez(self) -> Response:
        """The /livez answer (and count it)."""
        status = self.status()
        code = 200 if status.healthy else 503
        if self._metrics is not None:
            self._metrics.count_livez(code)
        return Response(code, _body(status, code, with_node=False), _JSON, _HEADERS)

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


def _body(status: HealthStatus, code: int, *, with_node: bool) -> bytes:
    """Upstream's JSON: Go's `json.Marshal(ProxyHealth)`, compact, fields in Go's order."""
    if code == 200:
        last = go_json_time(status.current_time)  # upstream: healthy reports "now"
    elif status.last_updated is None:
        last = GO_ZERO_TIME
    else:
        last = go_json_time(status.last_updated)
    document: dict[str, object] = {
        "lastUpdated": last,
        "currentTime": go_json_time(status.current_time),
    }
    if with_node:
        document["nodeEligible"] = status.node_eligible
    document["healthy"] = status.healthy
    if status.families:  # `omitempty`
        document["status"] = {
            family_label(family): {
                "lastUpdated": go_json_time(one.last_updated),
                "healthy": one.healthy,
            }
            for family, one in status.families.items()
        }
    return json.dumps(document, separators=(",", ":")).encode()


def go_json_time(unix_time: float) -> str:
    """A UTC time as Go's JSON writes it (RFC 3339, fraction without trailing zeros).

    "2024-05-01T12:00:00Z", "2024-05-01T12:00:00.5Z". Python's float clock resolves
    microseconds, so at most 6 digits.
    """
    moment = datetime.fromtimestamp(unix_time, UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return f"{text}Z"
