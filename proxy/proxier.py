"""The sync function: pending changes -> node-local state -> one backend write.

Flow, one way only:

    reflector threads --(parsed values)--> ChangeTracker --checkout--> Proxier.sync
        --> topology.categorize per dirty service --> desired state (dict)
        --> backend.sync(ProxyState, SyncHint) --> metrics, health

Concurrency model: `sync` runs only on the runner's thread. Event handlers run on
the reflector threads and touch only the `ChangeTracker` (thread-safe) and the
small flags below (set under `_lock`). The desired-state dict is owned by the sync
thread; the backend gets a read-only view of it for the duration of one call.

Failure model: a `BackendError` is logged with the lines the kernel refused and
counted; the desired state stays as computed (it does not depend on the kernel), the
next attempt is a full sync, and it is retried with backoff. Changes queued for
health stay queued, so /healthz turns 503 once they have waited 2 x sync period.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Protocol

from proxy.backends.base import Backend, BackendError
from proxy.changes import ChangeTracker, Checkout, merge_endpoints
from proxy.model import (
    NodeContext,
    NodeInfo,
    ProxyState,
    ServiceKey,
    ServicePortName,
    ServicePortState,
    SyncHint,
)
from proxy.topology import categorize

log = logging.getLogger(__name__)

FULL_SYNC_PERIOD = 3600.0
"""Default time between full syncs (upstream's FullSyncPeriod); the app passes the sync period."""


class SyncMetrics(Protocol):
    """The metrics the proxier reports (implemented by `proxy.metrics.ProxyMetrics`)."""

    def observe_sync(self, seconds: float, *, full: bool) -> None: ...
    def observe_network_programming(self, seconds: float) -> None: ...
    def set_last_sync_timestamp(self, unix_time: float) -> None: ...
    def set_pending_changes(self, *, services: int, endpoints: int) -> None: ...
    def add_changes(self, *, services: int, endpoints: int) -> None: ...
    def count_sync_failure(self, *, partial: bool) -> None: ...


class SyncHealth(Protocol):
    """The health signals the proxier gives (implemented by `proxy.health.ProxyHealth`)."""

    def queued_update(self) -> None: ...
    def updated(self) -> None: ...


class Proxier:
    """Owns the desired node-local state and drives one backend."""

    def __init__(
        self,
        *,
        backend: Backend,
        tracker: ChangeTracker,
        node: NodeContext,
        metrics: SyncMetrics,
        health: SyncHealth,
        request_retry: Callable[[float], None] = lambda _delay: None,
        min_retry: float = 1.0,
        max_retry: float = 30.0,
        full_sync_period: float = FULL_SYNC_PERIOD,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._backend = backend
        self._tracker = tracker
        self._metrics = metrics
        self._health = health
        self._request_retry = request_retry
        self._min_retry = min_retry
        self._max_retry = max_retry
        self._full_sync_period = full_sync_period
        self._clock = clock
        self._wall_clock = wall_clock

        self._lock = threading.Lock()
        self._node = node
        self._zone: str | None = None
        self._services_synced = False
        self._slices_synced = False

        # Owned by the sync thread.
        self._desired: dict[ServicePortName, ServicePortState] = {}
        self._ports_of: dict[ServiceKey, tuple[ServicePortName, ...]] = {}
        self._need_full = True
        self._last_full: float | None = None
        self._failures = 0
        self._carried_trigger_times: list[float] = []
        self.syncs = 0
        """Successful backend syncs so far (for tests and the lab)."""

    # -- called from reflector threads ---------------------------------------------------

    def services_synced(self) -> None:
        with self._lock:
            self._services_synced = True

    def slices_synced(self) -> None:
        with self._lock:
            self._slices_synced = True

    def set_node(self, info: NodeInfo) -> None:
        """This node's object changed: addresses and zone affect every service."""
        with self._lock:
            ips = info.addresses or self._node.node_ips
            changed = ips != self._node.node_ips or info.zone != self._zone
            if changed:
                self._node = NodeContext(
                    node_name=self._node.node_name,
                    node_ips=ips,
                    cluster_cidrs=self._node.cluster_cidrs,
                    masquerade_all=self._node.masquerade_all,
                    nodeport_addresses=self._node.nodeport_addresses,
                )
                self._zone = info.zone
        if changed:
            self._tracker.mark_all()

    @property
    def ready(self) -> bool:
        """True once Services and EndpointSlices have both been listed."""
        with self._lock:
            return self._services_synced and self._slices_synced

    # -- called from the runner's thread -------------------------------------------------

    def sync(self) -> None:
        """One round: recompute what changed, write it, report it. Never raises."""
        if not self.ready:
            log.debug("not syncing: services or endpointslices not listed yet")
            return
        started = self._clock()
        with self._lock:
            node, zone = self._node, self._zone
        checkout = self._tracker.checkout()
        self._metrics.set_pending_changes(services=0, endpoints=0)
        self._metrics.add_changes(
            services=checkout.service_changes, endpoints=checkout.endpoint_changes
        )
        changed = self._apply(checkout, node, zone)

        full = self._need_full or self._periodic_full_due(started) or self._backend.drifted()
        trigger_times = self._carried_trigger_times + [
            t for times in checkout.trigger_times.values() for t in times
        ]
        if not full and not changed:
            self._succeeded(started, full=False, trigger_times=trigger_times, wrote=False)
            return
        hint = SyncHint(full=full, changed=frozenset(changed))
        state = ProxyState(node=node, services=MappingProxyType(self._desired))
        try:
            self._backend.sync(state, hint)
        except BackendError as err:
            self._failed(err, full=full, trigger_times=trigger_times)
            return
        except Exception as err:  # a bug in a backend must not kill the loop
            log.exception("backend %s crashed during sync", self._backend.name)
            self._failed(BackendError(str(err)), full=full, trigger_times=trigger_times)
            return
        self._succeeded(started, full=full, trigger_times=trigger_times, wrote=True)

    def _periodic_full_due(self, now: float) -> bool:
        return self._last_full is None or now - self._last_full >= self._full_sync_period

    def _apply(
        self, checkout: Checkout, node: NodeContext, zone: str | None
    ) -> set[ServicePortName]:
        """Recompute the dirty services' ports; return the ports whose state changed."""
        changed: set[ServicePortName] = set()
        for key, info in checkout.services.items():
            old_ports = self._ports_of.pop(key, ())
            new_states: dict[ServicePortName, ServicePortState] = {}
            if info is not None:
                slices = checkout.slices.get(key, ())
                for port in info.ports:
                    endpoints = merge_endpoints(port, slices, node.node_name)
                    new_states[port.name] = categorize(port, endpoints, node.node_name, zone)
            for name in old_ports:
                if name not in new_states:
                    del self._desired[name]
                    changed.add(name)
            for name, state in new_states.items():
                if self._desired.get(name) != state:
                    self._desired[name] = state
                    changed.add(name)
            if new_states:
                self._ports_of[key] = tuple(new_states)
        return changed

    def _succeeded(
        self, started: float, *, full: bool, trigger_times: list[float], wrote: bool
    ) -> None:
        now_wall = self._wall_clock()
        if wrote:
            elapsed = self._clock() - started
            self._metrics.observe_sync(elapsed, full=full)
            self.syncs += 1
            log.info(
                "synced %s: %d service ports in %.1f ms",
                "fully" if full else "partially",
                len(self._desired),
                elapsed * 1000,
            )
        for trigger in trigger_times:
            self._metrics.observe_network_programming(max(0.0, now_wall - trigger))
        self._carried_trigger_times = []
        if full:
            self._need_full = False
            self._last_full = started
        self._failures = 0
        self._metrics.set_last_sync_timestamp(now_wall)
        self._health.updated()
        services, endpoints = self._tracker.pending()
        if services or endpoints:
            # Events arrived while we synced: they are still queued for health.
            self._health.queued_update()
            self._metrics.set_pending_changes(services=services, endpoints=endpoints)

    def _failed(self, err: BackendError, *, full: bool, trigger_times: list[float]) -> None:
        self._failures += 1
        self._need_full = True
        self._carried_trigger_times = trigger_times
        self._metrics.count_sync_failure(partial=not full)
        delay = min(self._max_retry, self._min_retry * 2 ** (self._failures - 1))
        log.error(
            "%s sync failed (%s); retrying in %.1f s with a full sync",
            self._backend.name,
            err,
            delay,
        )
        for line in err.offending_lines:
            log.error("  offending input: %s", line)
        self._health.queued_update()
        self._request_retry(delay)

    # -- read-only views for tests and the lab -------------------------------------------

    def desired(self) -> dict[ServicePortName, ServicePortState]:
        """A copy of the current desired state (sync thread or tests only)."""
        return dict(self._desired)
