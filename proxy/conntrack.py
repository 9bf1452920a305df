"""Stale UDP conntrack cleanup: which flows to delete after a sync, and deleting them.

Shared by every backend: the proxier calls `StaleFlowCleaner.after_sync(state, hint)`
once the backend has committed a sync, and never when it failed (the kernel still
holds the old rules, so the old flows are still right).

The rule is upstream's current one (`pkg/proxy/conntrack/cleanup.go`,
`CleanStaleEntries`): for a UDP service port with at least one serving endpoint,
every UDP flow to one of its frontends (ClusterIPs, externalIPs and LoadBalancer IPs
at the service port; the NodePort on any address) whose reply source is not a
serving endpoint is stale. That one rule covers both cases that hurt: a flow still
DNATed to an endpoint that is gone or no longer serving, and a flow created while
the service had no endpoint (rejected or routed elsewhere: its reply source is the
frontend itself), which would keep clients off the endpoints that just appeared.
"Serving" ignores traffic policies, topology and terminating state, as upstream, so
a change of policy never breaks a flow that still has a live endpoint.

Where we depart from upstream, and why:

- Upstream reconciles the whole table against every UDP service at every sync (one
  full dump). Here only the ports named in `SyncHint.changed` are examined (every
  port on a full sync, so start-up and recovery still see them all), and a port needs
  a cleanup only when its change can have left a stale flow: it is new, it had no
  serving endpoint before, an endpoint stopped serving, or it gained a frontend. The
  cost follows the change, not the cluster.
- A UDP port that is removed (or a frontend that a port no longer has) gets its
  flows to the old frontends deleted whatever answers them, as older kube-proxy
  releases did: the rules are gone and a kept flow would go on reaching the old
  endpoint. A frontend that a port still in the state uses is left to that port.
- A cleanup that fails is retried at the next sync for the ports still present.
- The reply source is compared as address and port (upstream: address only), so that
  a renumbered target port also moves its flows (semantics checklist: "renamed or
  renumbered named port: stale UDP conntrack removed").

`stale_udp_flows` is the pure decision; `StaleFlowCleaner` adds the kernel call
(a `proxy.kernel.conntrack.ConntrackTable`), the log lines and the metrics.

Concurrency: `after_sync` runs on the proxier's sync thread only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from proxy import model
from proxy.kernel.conntrack import ConntrackError, ConntrackTable, UdpFlowSelector
from proxy.model import (
    IPFamily,
    ProxyState,
    ServicePort,
    ServicePortName,
    ServicePortState,
    SyncHint,
)

log = logging.getLogger(__name__)

Frontend = tuple[IPFamily, str | None, int]
"""(family, destination address or None for a NodePort on any address, port)."""


def _family(ip: str) -> IPFamily:
    return IPFamily.V6 if ":" in ip else IPFamily.V4


def frontends(port: ServicePort) -> set[Frontend]:
    """Where clients reach `port`: its service IPs at the port, and its NodePort."""
    found: set[Frontend] = {
        (_family(ip), ip, port.port)
        for ip in (*port.cluster_ips, *port.external_ips, *port.load_balancer_ips)
    }
    if port.node_port:
        families = {_family(ip) for ip in port.cluster_ips} or {IPFamily.V4}
        found.update((family, None, port.node_port) for family in families)
    return found


def serving(state: ServicePortState) -> frozenset[tuple[str, int]]:
    """(address, port) of the endpoints that are serving (upstream's `IsServing`), anywhere."""
    return frozenset((ep.ip, ep.port) for ep in state.all_endpoints if ep.serving)


def _may_be_stale(new: ServicePortState, old: ServicePortState | None) -> bool:
    """Can the change from `old` to `new` have left a flow that is now wrong?"""
    if old is None:
        return True  # new port, or first sync: flows from before may be rejected ones
    before, now = serving(old), serving(new)
    if not before or before - now:
        return True  # from no endpoint to some, or an endpoint stopped serving
    return bool(frontends(new.port) - frontends(old.port))


def stale_udp_flows(
    services: Mapping[ServicePortName, ServicePortState],
    changed: Iterable[ServicePortName],
    previous: Mapping[ServicePortName, ServicePortState],
    *,
    force: Iterable[ServicePortName] = (),
) -> list[UdpFlowSelector]:
    """The UDP flows to delete after a sync that moved `changed` from `previous` to `services`.

    `force` names ports to clean whatever changed (a failed cleanup being retried).
    The result is sorted, one selector per frontend.
    """
    forced = set(force)
    keep: dict[Frontend, frozenset[tuple[str, int]]] = {}
    gone: set[Frontend] = set()
    used: set[Frontend] = set()
    for name in set(changed) | forced:
        if name.protocol != model.Protocol.UDP:
            continue
        new, old = services.get(name), previous.get(name)
        new_frontends = frontends(new.port) if new else set()
        used |= new_frontends
        if old is not None:
            gone |= frontends(old.port) - new_frontends
        if new is None:
            continue
        live = serving(new)
        # Without a serving endpoint the rules reject: nothing to clean until one appears.
        if not live or (name not in forced and not _may_be_stale(new, old)):
            continue
        for frontend in new_frontends:
            # Two ports on one frontend cannot happen with a valid API; if it does,
            # keep the flows to either port's endpoints.
            keep[frontend] = keep.get(frontend, frozenset()) | live
    # A frontend a port still uses is that port's business (cleaned above, or fine).
    for frontend in gone - used:
        keep[frontend] = frozenset()
    return sorted(
        (
            UdpFlowSelector(family=family, dst_ip=ip, dst_port=port, keep_reply_sources=kept)
            for (family, ip, port), kept in keep.items()
        ),
        key=UdpFlowSelector.sort_key,
    )


class CleanupMetrics(Protocol):
    """Where cleanups are counted (implemented by `proxy.metrics.ProxyMetrics`)."""

    def count_conntrack_deleted(self, family: IPFamily, count: int) -> None: ...
    def observe_conntrack_cleanup(self, family: IPFamily, seconds: float) -> None: ...
    def count_conntrack_failure(self) -> None: ...


class StaleFlowCleaner:
    """Runs the decision after each successful sync and deletes through `table`."""

    def __init__(
        self,
        table: ConntrackTable,
        metrics: CleanupMetrics,
        *,
        family: IPFamily | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`family`: clean only that family's flows (one cleaner per family's backend,
        run after that family's sync); None cleans both."""
        self._family = family
        self._table = table
        self._metrics = metrics
        self._clock = clock
        self._retry: set[ServicePortName] = set()

    def after_sync(self, state: ProxyState, hint: SyncHint) -> None:
        """Delete the flows the sync just made stale. Never raises: a failure is logged,
        counted, and the ports are cleaned again at the next sync."""
        selectors = stale_udp_flows(state.services, hint.changed, hint.previous, force=self._retry)
        if self._family is not None:
            selectors = [s for s in selectors if s.family is self._family]
        forced, self._retry = self._retry, set()
        if not selectors:
            return
        started = self._clock()
        try:
            deleted = self._table.delete_udp_flows(selectors)
        except ConntrackError as err:
            self._metrics.count_conntrack_failure()
            udp = model.Protocol.UDP
            self._retry = {
                name
                for name in forced | set(hint.changed)
                if name.protocol == udp and name in state.services
            }
            log.error(
                "stale UDP conntrack cleanup failed (%s); retrying at the next sync "
                "for %d service ports",
                err,
                len(self._retry),
            )
            return
        except Exception:
            # A bug in the cleanup must not stop the proxy from syncing rules.
            self._metrics.count_conntrack_failure()
            log.exception("stale UDP conntrack cleanup failed unexpectedly")
            return
        elapsed = self._clock() - started
        for family in sorted({s.family for s in selectors}):
            self._metrics.observe_conntrack_cleanup(family, elapsed)
            self._metrics.count_conntrack_deleted(family, deleted.get(family, 0))
        total = sum(deleted.values())
        log.log(
            logging.INFO if total else logging.DEBUG,
            "deleted %d stale UDP conntrack flows (%d destinations checked) in %.1f ms",
            total,
            len(selectors),
            elapsed * 1000,
        )
