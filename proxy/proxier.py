"""The sync function: pending changes -> node-local state -> one backend call.

Flow, one way only:

    reflector threads --(parsed values)--> ChangeTracker --checkout--> Proxier.sync
        --> topology.categorize per dirty service --> desired state (dict)
        --> backend.sync(ProxyState, SyncHint) --> metrics, health
        --> after-sync hooks (stale UDP conntrack cleanup, health-check node ports)

What a sync does (upstream's rules since partial syncs, KEP-3453):

- Every call takes the checkout (dirty services, and this Node, under one lock),
  recomputes the dirty services only and records, for each port whose state
  changed, its state at the last successful sync (`SyncHint.previous`). Changes
  that cancel out before a sync never reach the kernel.
- A sync is partial unless a full one is due: at start-up, after any failure, when
  the backend reports drift, and otherwise once every `full_sync_period` (an hour,
  upstream's FullSyncPeriod). The runner's periodic tick (`--*-sync-period`) does
  not rewrite anything by itself: it checks the backend's canary, and writes what
  changed, if anything.
- The canary check runs at most once per `canary_period` (the sync period), never
  on the latency path of every change.

Concurrency model: `sync` runs only on the runner's thread. Event handlers run on
the reflector threads and touch only the `ChangeTracker` (thread-safe) and the two
"listed" flags below (set under `_lock`). The desired-state dict and everything
else is owned by the sync thread; the backend gets a read-only view of the dict for
the duration of one call.

Failure model: whatever goes wrong after a checkout, nothing is lost. The ports
changed since the last success stay recorded until a sync succeeds; any failure
makes the next sync full; a `BackendError` is logged with the lines the kernel
refused, counted and retried with backoff; an unexpected exception (a bug) also
marks every service for recomputation, since the checkout may be half applied. A
bug while recomputing one service keeps that service's last state and does not
stop the others. Health is only refreshed by a success, so /healthz turns 503 once
a change has waited 2 x sync period.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Protocol

from proxy.backends.base import Backend, BackendError
from proxy.changes import ChangeTracker, Checkout, merge_endpoints
from proxy.memory import freeze_long_lived, release_free_memory
from proxy.model import (
    NodeContext,
    NodeInfo,
    ProxyState,
    ServiceInfo,
    ServiceKey,
    ServicePortName,
    ServicePortState,
    SliceInfo,
    SyncHint,
)
from proxy.topology import categorize, lacks_local_endpoints

log = logging.getLogger(__name__)

FULL_SYNC_PERIOD = 3600.0
"""Time between full syncs when nothing forces one (upstream's FullSyncPeriod)."""


class SyncMetrics(Protocol):
    """The metrics the proxier reports (implemented by `proxy.metrics.ProxyMetrics`)."""

    def observe_sync(self, seconds: float, *, full: bool) -> None: ...
    def observe_network_programming(self, seconds: float) -> None: ...
    def set_last_sync_timestamp(self, unix_time: float) -> None: ...
    def set_pending_changes(self, *, services: int, endpoints: int) -> None: ...
    def add_changes(self, *, services: int, endpoints: int) -> None: ...
    def count_sync_failure(self, *, partial: bool) -> None: ...
    def set_no_local_endpoints(self, *, internal: int, external: int) -> None: ...


class SyncHealth(Protocol):
    """The health signals the proxier gives (implemented by `proxy.health.ProxyHealth`)."""

    def queued_update(self) -> None: ...
    def updated(self) -> None: ...


AfterSync = Callable[[ProxyState, SyncHint], None]
"""Work that follows a committed sync (stale conntrack cleanup, health-check servers).

Called on the sync thread right after the backend accepted `hint`'s changes, with the
state it was given; it must not keep `state.services` (a view of the proxier's dict)
beyond the call. An exception is logged and does not fail the sync."""

ServiceCheck = Callable[[ServiceKey, tuple[ServicePortState, ...]], None]
"""Told each recomputed service's new port states (empty: deleted), e.g. to report
features the backend does not program."""


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
        canary_period: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        after_sync: Sequence[AfterSync] = (),
        check_service: ServiceCheck | None = None,
    ) -> None:
        """`node` holds the node-wide settings; its addresses are replaced by the Node's
        own once it is seen. `request_retry(delay)` asks the runner for a sync later.
        `after_sync` hooks run, in order, after each committed sync; `check_service`
        sees every recomputed service."""
        self._after_sync = tuple(after_sync)
        self._check_service = check_service
        self._backend = backend
        self._tracker = tracker
        self._metrics = metrics
        self._health = health
        self._request_retry = request_retry
        self._min_retry = min_retry
        self._max_retry = max_retry
        self._full_sync_period = full_sync_period
        self._canary_period = canary_period
        self._clock = clock
        self._wall_clock = wall_clock

        self._lock = threading.Lock()
        self._services_synced = False
        self._slices_synced = False

        # Owned by the sync thread.
        self._node = node
        self._zone: str | None = None
        self._desired: dict[ServicePortName, ServicePortState] = {}
        self._ports_of: dict[ServiceKey, tuple[ServicePortName, ...]] = {}
        self._unsynced: dict[ServicePortName, ServicePortState | None] = {}
        """Ports changed since the last successful sync -> their state then (None: new)."""
        self._synced_node: NodeContext | None = None
        self._need_full = True
        self._last_full: float | None = None
        self._last_canary: float | None = None
        self._failures = 0
        self._carried_trigger_times: list[float] = []
        self._no_local_internal: set[ServicePortName] = set()
        self._no_local_external: set[ServicePortName] = set()
        self.syncs = 0
        """Successful backend syncs so far (for tests and the lab)."""

    # -- called from reflector threads ---------------------------------------------------

    def services_synced(self) -> None:
        with self._lock:
            self._services_synced = True

    def slices_synced(self) -> None:
        with self._lock:
            self._slices_synced = True

    @property
    def ready(self) -> bool:
        """True once Services and EndpointSlices have both been listed."""
        with self._lock:
            return self._services_synced and self._slices_synced

    # -- called from the runner's thread -------------------------------------------------

    def sync(self) -> bool:
        """One round: recompute what changed, write it, report it. Never raises.

        Returns False when nothing was written (not listed yet, or nothing changed and
        no full sync due): the runner then does not hold the next change back."""
        if not self.ready:
            log.debug("not syncing: services or endpointslices not listed yet")
            return False
        started = self._clock()
        checkout = self._tracker.checkout()
        # Until a sync succeeds, this checkout's trigger times stay owed to the metric.
        self._carried_trigger_times.extend(
            t for times in checkout.trigger_times.values() for t in times
        )
        try:
            return self._sync(checkout, started)
        except Exception as err:
            # A bug of ours somewhere after the checkout: the checkout may be half
            # applied, so recompute everything and write everything next time.
            log.exception("sync failed unexpectedly; the next sync recomputes every service")
            self._tracker.mark_all()
            self._failed(BackendError(f"unexpected error: {err!r}"), full=True)
            return True

    def _sync(self, checkout: Checkout, started: float) -> bool:
        self._metrics.set_pending_changes(services=0, endpoints=0)
        self._metrics.add_changes(
            services=checkout.service_changes, endpoints=checkout.endpoint_changes
        )
        if checkout.node is not None:
            self._take_node(checkout.node)
        full = self._need_full or self._full_due(started)
        if full:
            freeze_long_lived()  # what is alive now mostly lives on: stop scanning it
        self._apply(checkout)

        if not full and self._canary_due(started):
            self._last_canary = started
            if self._backend.drifted():
                log.warning("%s: our rules were removed behind our back", self._backend.name)
                full = True
        node_changed = self._node != self._synced_node
        if not full and not self._unsynced and not node_changed:
            self._succeeded(started, full=False, wrote=False)
            return False
        hint = SyncHint(
            full=full,
            changed=frozenset(self._unsynced),
            previous=MappingProxyType(
                {name: old for name, old in self._unsynced.items() if old is not None}
            ),
            node_changed=node_changed,
        )
        state = ProxyState(node=self._node, services=MappingProxyType(self._desired))
        try:
            self._backend.sync(state, hint)
        except BackendError as err:
            self._failed(err, full=full)
            return True
        self._succeeded(started, full=full, wrote=True)
        for hook in self._after_sync:
            try:
                hook(state, hint)
            except Exception:
                # The rules are committed; a follow-up job failing must not undo that.
                log.exception("after-sync step %r failed", hook)
        return True

    def _take_node(self, info: NodeInfo) -> None:
        self._zone = info.zone
        ips = info.addresses or self._node.node_ips
        if ips != self._node.node_ips:
            self._node = NodeContext(
                node_name=self._node.node_name,
                node_ips=ips,
                cluster_cidrs=self._node.cluster_cidrs,
                masquerade_all=self._node.masquerade_all,
                nodeport_addresses=self._node.nodeport_addresses,
            )

    def _full_due(self, now: float) -> bool:
        return self._last_full is None or now - self._last_full >= self._full_sync_period

    def _canary_due(self, now: float) -> bool:
        return self._last_canary is None or now - self._last_canary >= self._canary_period

    def _apply(self, checkout: Checkout) -> None:
        """Recompute the dirty services' ports into `_desired`, recording what changed."""
        node_name = self._node.node_name
        for key, info in checkout.services.items():
            try:
                new_states = self._compute(info, checkout.slices.get(key, ()), node_name)
            except Exception:
                # One service we cannot compute keeps its last state; the rest go on.
                log.exception("service %s: cannot compute its rules; keeping its last state", key)
                continue
            old_ports = self._ports_of.pop(key, ())
            for name in old_ports:
                if name not in new_states:
                    self._set_port(name, None)
            for name, state in new_states.items():
                self._set_port(name, state)
            if new_states:
                self._ports_of[key] = tuple(new_states)
            if self._check_service is not None:
                try:
                    self._check_service(key, tuple(new_states.values()))
                except Exception:  # a report, not the sync: never stop the sync for it
                    log.exception("service %s: checking its features failed", key)

    def _compute(
        self, info: ServiceInfo | None, slices: tuple[SliceInfo, ...], node_name: str
    ) -> dict[ServicePortName, ServicePortState]:
        if info is None:
            return {}
        return {
            port.name: categorize(
                port, merge_endpoints(port, slices, node_name), node_name, self._zone
            )
            for port in info.ports
        }

    def _set_port(self, name: ServicePortName, state: ServicePortState | None) -> None:
        old = self._desired.get(name)
        if old == state:
            return
        if name not in self._unsynced:
            self._unsynced[name] = old
        elif self._unsynced[name] == state:
            del self._unsynced[name]  # back to what the kernel has: nothing to write
        if state is None:
            del self._desired[name]
        else:
            self._desired[name] = state
        internal, external = lacks_local_endpoints(state) if state else (False, False)
        _toggle(self._no_local_internal, name, internal)
        _toggle(self._no_local_external, name, external)

    def _succeeded(self, started: float, *, full: bool, wrote: bool) -> None:
        now_wall = self._wall_clock()
        if wrote:
            elapsed = self._clock() - started
            self._metrics.observe_sync(elapsed, full=full)
            self.syncs += 1
            log.info(
                "synced %s: %d changed of %d service ports in %.1f ms",
                "fully" if full else "partially",
                len(self._unsynced),
                len(self._desired),
                elapsed * 1000,
            )
        for trigger in self._carried_trigger_times:
            self._metrics.observe_network_programming(max(0.0, now_wall - trigger))
        self._carried_trigger_times = []
        self._unsynced.clear()
        self._synced_node = self._node
        self._need_full = False
        if full:
            self._last_full = started
            self._last_canary = started
            release_free_memory()  # the transient peak of a full sync is over
        self._failures = 0
        self._metrics.set_no_local_endpoints(
            internal=len(self._no_local_internal), external=len(self._no_local_external)
        )
        self._metrics.set_last_sync_timestamp(now_wall)
        self._health.updated()
        services, endpoints = self._tracker.pending()
        if services or endpoints:
            # Events arrived while we synced: they are still queued for health.
            self._health.queued_update()
            self._metrics.set_pending_changes(services=services, endpoints=endpoints)

    def _failed(self, err: BackendError, *, full: bool) -> None:
        self._failures += 1
        self._need_full = True
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


def _toggle(members: set[ServicePortName], name: ServicePortName, present: bool) -> None:
    if present:
        members.add(name)
    else:
        members.discard(name)
