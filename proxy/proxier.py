"""The sync function: pending changes -> node-local state -> one backend call.

Flow, one way only:

    reflector threads --(parsed values)--> ChangeTracker --checkout--> Proxier.sync
        --> topology.categorize per dirty service --> desired state (dict)
        --> backend.sync(ProxyState, SyncHint) per IP family --> metrics, health
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

Dual-stack: one backend per IP family (upstream runs one proxier per family behind
its meta-proxier). Each backend is a lane with its own record of what it owes: the
ports changed since *its* last success with their states then, its own full-sync
and canary schedule and its own failures. A family whose kernel refuses a write is
retried with a full sync alone; the other family goes on with partial syncs. The
endpoints of each family are categorized apart (`_compute`), as upstream's
per-family proxiers see only their family's slices: the terminating fallback and
the topology decision of one family never depend on the other's endpoints.

Concurrency model: `sync` runs only on the runner's thread. Event handlers run on
the reflector threads and touch only the `ChangeTracker` (thread-safe) and the two
"listed" flags below (set under `_lock`). The desired-state dict and everything
else is owned by the sync thread; the backend gets a read-only view of the dict for
the duration of one call.

Failure model: whatever goes wrong after a checkout, nothing is lost. The ports
changed since a lane's last success stay recorded until it succeeds; any failure
makes that lane's next sync full; a `BackendError` is logged with the lines the kernel
refused, counted and retried with backoff; an unexpected exception (a bug) also
marks every service for recomputation, since the checkout may be half applied. A
bug while recomputing one service keeps that service's last state and does not
stop the others. Health is only refreshed when every lane succeeded, so /healthz
turns 503 once a change has waited 2 x sync period.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, ItemsView, Iterator, Mapping, Sequence, ValuesView
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from proxy.backends.base import Backend, BackendError
from proxy.changes import ChangeTracker, Checkout, merge_endpoints
from proxy.memory import freeze_long_lived, release_free_memory
from proxy.model import (
    IPFamily,
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
    """The metrics the proxier reports (implemented by `proxy.metrics.ProxyMetrics`).

    Per-family figures carry the lane's family, as upstream's per-family proxiers
    report theirs with `ip_family`."""

    def observe_sync(self, seconds: float, *, full: bool, family: IPFamily = ...) -> None: ...
    def observe_network_programming(self, seconds: float, *, family: IPFamily = ...) -> None: ...
    def set_last_sync_timestamp(self, unix_time: float, *, family: IPFamily = ...) -> None: ...
    def set_pending_changes(self, *, services: int, endpoints: int) -> None: ...
    def add_changes(self, *, services: int, endpoints: int) -> None: ...
    def count_sync_failure(self, *, partial: bool, family: IPFamily = ...) -> None: ...
    def set_no_local_endpoints(
        self, *, internal: int, external: int, family: IPFamily = ...
    ) -> None: ...


class SyncHealth(Protocol):
    """The health signals the proxier gives (implemented by `proxy.health.ProxyHealth`)."""

    def queued_update(self, family: IPFamily | None = None) -> None: ...
    def updated(self, family: IPFamily | None = None) -> None: ...


AfterSync = Callable[[ProxyState, SyncHint, IPFamily], None]
"""Work that follows a committed sync of one family (stale conntrack cleanup,
health-check servers).

Called on the sync thread right after that family's backend accepted `hint`'s changes,
with the state it was given; it must not keep `state.services` (a view of the
proxier's dict) beyond the call. An exception is logged and does not fail the sync."""

ServiceCheck = Callable[[ServiceKey, tuple[ServicePortState, ...]], None]
"""Told each recomputed service's new port states (empty: deleted), e.g. to report
features the backend does not program."""


@dataclass(eq=False)
class _Lane:
    """One backend (one IP family) and what it owes: see "Dual-stack" above."""

    family: IPFamily
    backend: Backend
    unsynced: dict[ServicePortName, ServicePortState | None] = field(default_factory=dict)
    """Ports changed since this lane's last successful sync -> their state then (None: new)."""
    synced_node: NodeContext | None = None
    need_full: bool = True
    last_full: float | None = None
    last_canary: float | None = None
    failures: int = 0
    trigger_times: list[float] = field(default_factory=list)
    """Trigger times of the changes this lane has not written yet (network programming)."""


class Proxier:
    """Owns the desired node-local state and drives one backend per IP family."""

    def __init__(
        self,
        *,
        backend: Backend | None = None,
        backends: Sequence[tuple[IPFamily, Backend]] = (),
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
        """`backend` (IPv4 only) or `backends` (one per family, primary first).
        `node` holds the node-wide settings; its addresses are replaced by the Node's
        own once it is seen. `request_retry(delay)` asks the runner for a sync later.
        `after_sync` hooks run, in order, after each family's committed sync;
        `check_service` sees every recomputed service."""
        chosen = [*([(IPFamily.V4, backend)] if backend is not None else []), *backends]
        if not chosen:
            raise ValueError("a proxier needs at least one backend")
        self._lanes = [_Lane(family, b) for family, b in chosen]
        self._after_sync = tuple(after_sync)
        self._check_service = check_service
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
        self._no_local_internal: set[ServicePortName] = set()
        self._no_local_external: set[ServicePortName] = set()
        self.syncs = 0
        """Successful sync rounds that wrote something (for tests and the lab)."""

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
        # Until a lane succeeds, this checkout's trigger times stay owed to its metric.
        triggers = [t for times in checkout.trigger_times.values() for t in times]
        for lane in self._lanes:
            lane.trigger_times.extend(triggers)
        try:
            return self._sync(checkout, started)
        except Exception as err:
            # A bug of ours somewhere after the checkout: the checkout may be half
            # applied, so recompute everything and write everything next time.
            log.exception("sync failed unexpectedly; the next sync recomputes every service")
            self._tracker.mark_all()
            for lane in self._lanes:
                self._failed(lane, BackendError(f"unexpected error: {err!r}"), full=True)
            return True

    def _sync(self, checkout: Checkout, started: float) -> bool:
        self._metrics.set_pending_changes(services=0, endpoints=0)
        self._metrics.add_changes(
            services=checkout.service_changes, endpoints=checkout.endpoint_changes
        )
        if checkout.node is not None:
            self._take_node(checkout.node)
        fulls = [lane.need_full or self._full_due(lane, started) for lane in self._lanes]
        if any(fulls):
            freeze_long_lived()  # what is alive now mostly lives on: stop scanning it
        self._apply(checkout)

        state = ProxyState(node=self._node, services=MappingProxyType(self._desired))
        changed = max(len(lane.unsynced) for lane in self._lanes)
        wrote = failed = False
        for lane, full in zip(self._lanes, fulls, strict=True):
            outcome = self._sync_lane(lane, state, full, started)
            wrote = wrote or outcome is not None
            failed = failed or outcome is False
        if failed:
            return True
        self._round_succeeded(started, full=any(fulls), wrote=wrote, changed=changed)
        return wrote

    def _sync_lane(self, lane: _Lane, state: ProxyState, full: bool, started: float) -> bool | None:
        """Sync one lane: None when it had nothing to write, else whether it succeeded."""
        if not full and self._canary_due(lane, started):
            lane.last_canary = started
            if lane.backend.drifted():
                log.warning("%s: our rules were removed behind our back", lane.backend.name)
                full = True
        node_changed = self._node != lane.synced_node
        if not full and not lane.unsynced and not node_changed:
            # Nothing owed (changes that cancelled out): this family's kernel already
            # matches, so the changes' trigger times are met now.
            now_wall = self._wall_clock()
            self._observe_programming(lane, now_wall)
            self._metrics.set_last_sync_timestamp(now_wall, family=lane.family)
            self._health.updated(lane.family)
            return None
        v6 = lane.family is IPFamily.V6
        hint = SyncHint(
            full=full,
            changed=frozenset(lane.unsynced),
            previous=MappingProxyType(
                {
                    name: old
                    for name, old in lane.unsynced.items()
                    if old is not None and _has_cluster_ip(old, v6)
                }
            ),
            node_changed=node_changed,
        )
        # The backend sees only the ports with a ClusterIP of its family (upstream's
        # per-family service tracker skips the others), so a single-stack IPv4 service
        # opens no IPv6 NodePort; the hooks below get every port.
        view = ProxyState(node=state.node, services=FamilyServices(state.services, v6=v6))
        try:
            lane.backend.sync(view, hint)
        except BackendError as err:
            self._failed(lane, err, full=full)
            return False
        self._lane_succeeded(lane, started, full=full, changed=len(hint.changed))
        for hook in self._after_sync:
            try:
                hook(state, hint, lane.family)
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

    def _full_due(self, lane: _Lane, now: float) -> bool:
        return lane.last_full is None or now - lane.last_full >= self._full_sync_period

    def _canary_due(self, lane: _Lane, now: float) -> bool:
        return lane.last_canary is None or now - lane.last_canary >= self._canary_period

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
        families = {s.family for s in slices}
        if len(families) < 2:
            return {
                port.name: categorize(
                    port, merge_endpoints(port, slices, node_name), node_name, self._zone
                )
                for port in info.ports
            }
        by_family = {f: tuple(s for s in slices if s.family is f) for f in sorted(families)}
        return {
            port.name: _joined(
                [
                    categorize(
                        port, merge_endpoints(port, of_family, node_name), node_name, self._zone
                    )
                    for of_family in by_family.values()
                ]
            )
            for port in info.ports
        }

    def _set_port(self, name: ServicePortName, state: ServicePortState | None) -> None:
        old = self._desired.get(name)
        if old == state:
            return
        for lane in self._lanes:
            unsynced = lane.unsynced
            if name not in unsynced:
                unsynced[name] = old
            elif unsynced[name] == state:
                del unsynced[name]  # back to what this lane's kernel has: nothing to write
        if state is None:
            del self._desired[name]
        else:
            self._desired[name] = state
        internal, external = lacks_local_endpoints(state) if state else (False, False)
        _toggle(self._no_local_internal, name, internal)
        _toggle(self._no_local_external, name, external)

    def _lane_succeeded(self, lane: _Lane, started: float, *, full: bool, changed: int) -> None:
        family = lane.family
        elapsed = self._clock() - started
        self._metrics.observe_sync(elapsed, full=full, family=family)
        now_wall = self._wall_clock()
        self._observe_programming(lane, now_wall)
        self._metrics.set_last_sync_timestamp(now_wall, family=family)
        self._health.updated(family)
        if len(self._lanes) > 1:
            log.debug(
                "IPv%d synced %s: %d changed in %.1f ms",
                family.value,
                "fully" if full else "partially",
                changed,
                elapsed * 1000,
            )
        lane.unsynced.clear()
        lane.synced_node = self._node
        lane.need_full = False
        lane.failures = 0
        if full:
            lane.last_full = started
            lane.last_canary = started

    def _observe_programming(self, lane: _Lane, now_wall: float) -> None:
        for trigger in lane.trigger_times:
            self._metrics.observe_network_programming(
                max(0.0, now_wall - trigger), family=lane.family
            )
        lane.trigger_times = []

    def _round_succeeded(self, started: float, *, full: bool, wrote: bool, changed: int) -> None:
        """Every lane is in sync with the desired state: report it."""
        if wrote:
            elapsed = self._clock() - started
            self.syncs += 1
            log.info(
                "synced %s: %d changed of %d service ports in %.1f ms",
                "fully" if full else "partially",
                changed,
                len(self._desired),
                elapsed * 1000,
            )
        if full:
            release_free_memory()  # the transient peak of a full sync is over
        # Counted over both families' endpoints (categorized apart), reported once.
        self._metrics.set_no_local_endpoints(
            internal=len(self._no_local_internal), external=len(self._no_local_external)
        )
        services, endpoints = self._tracker.pending()
        if services or endpoints:
            # Events arrived while we synced: they are still queued for health.
            self._health.queued_update()
            self._metrics.set_pending_changes(services=services, endpoints=endpoints)

    def _failed(self, lane: _Lane, err: BackendError, *, full: bool) -> None:
        lane.failures += 1
        lane.need_full = True
        self._metrics.count_sync_failure(partial=not full, family=lane.family)
        delay = min(self._max_retry, self._min_retry * 2 ** (lane.failures - 1))
        log.error(
            "%s sync failed (%s); retrying in %.1f s with a full sync",
            lane.backend.name,
            err,
            delay,
        )
        for line in err.offending_lines:
            log.error("  offending input: %s", line)
        self._health.queued_update(lane.family)
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


def _joined(states: Sequence[ServicePortState]) -> ServicePortState:
    """One port's state from its per-family states (each categorized on its own)."""
    first = states[0]
    return ServicePortState(
        port=first.port,
        cluster_endpoints=tuple(ep for st in states for ep in st.cluster_endpoints),
        external_endpoints=tuple(ep for st in states for ep in st.external_endpoints),
        all_endpoints=tuple(ep for st in states for ep in st.all_endpoints),
    )


def _has_cluster_ip(state: ServicePortState, v6: bool) -> bool:
    return any((":" in ip) is v6 for ip in state.port.cluster_ips)


class FamilyServices(Mapping[ServicePortName, ServicePortState]):
    """A read-only view of the desired ports that have a ClusterIP of one family.

    What one family's backend is given: upstream's per-family proxiers never see a
    service without a ClusterIP of their family. Lookups are O(1); iterating filters as
    it goes, so a partial sync that looks at its changed ports costs no more than before.
    """

    __slots__ = ("_services", "_v6")

    def __init__(self, services: Mapping[ServicePortName, ServicePortState], *, v6: bool) -> None:
        self._services = services
        self._v6 = v6

    def __getitem__(self, name: ServicePortName) -> ServicePortState:
        state = self._services[name]
        if not _has_cluster_ip(state, self._v6):
            raise KeyError(name)
        return state

    def __contains__(self, name: object) -> bool:
        state = self._services.get(name) if isinstance(name, ServicePortName) else None
        return state is not None and _has_cluster_ip(state, self._v6)

    def __iter__(self) -> Iterator[ServicePortName]:
        v6 = self._v6
        return (name for name, state in self._services.items() if _has_cluster_ip(state, v6))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def items(self) -> ItemsView[ServicePortName, ServicePortState]:
        return _FilteredItems(self)

    def values(self) -> ValuesView[ServicePortState]:
        return _FilteredValues(self)


class _FilteredItems(ItemsView[ServicePortName, ServicePortState]):
    _mapping: FamilyServices

    def __iter__(self) -> Iterator[tuple[ServicePortName, ServicePortState]]:
        view = self._mapping
        v6 = view._v6
        return ((n, s) for n, s in view._services.items() if _has_cluster_ip(s, v6))


class _FilteredValues(ValuesView[ServicePortState]):
    _mapping: FamilyServices

    def __iter__(self) -> Iterator[ServicePortState]:
        view = self._mapping
        v6 = view._v6
        return (s for s in view._services.values() if _has_cluster_ip(s, v6))
