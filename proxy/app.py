"""Assemble and run the proxy: settings in, threads out, never a flush on the way out.

Threads (all daemons, started here, stopped by `Proxy.stop`):

- one reflector per watched resource (Services, EndpointSlices, this Node), each
  listing then watching and calling its handler on its own thread;
- the sync runner, the only thread that calls the backends (one per IP family the
  node serves: IPv4 and, where the kernel and the tools have it, IPv6, as upstream
  runs dual-stack wherever both families work);
- the metrics and health HTTP servers, and one per healthCheckNodePort
  (`proxy.healthcheck`, opened and closed by the sync thread after each sync).

After each committed sync of a family the sync thread also deletes that family's
stale UDP conntrack flows (`proxy.conntrack`) in this process's network namespace,
the node's.

The main thread only waits for SIGTERM/SIGINT. Stopping stops the threads and leaves
the kernel exactly as the last successful sync left it (kube-proxy's promise: a
restart or upgrade keeps traffic flowing).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import FrameType

from proxy.backends.base import (
    Backend,
    BackendConfig,
    BackendMetrics,
    FamilyProbe,
    Feature,
    UnknownBackendError,
    create,
    known,
    supported_features,
)
from proxy.changes import ChangeTracker
from proxy.config import Settings
from proxy.conntrack import StaleFlowCleaner
from proxy.features import UnsupportedFeatures
from proxy.handlers import NodeHandler, ServiceHandler, SliceHandler
from proxy.health import ProxyHealth
from proxy.healthcheck import ServiceHealthServers
from proxy.kernel.conntrack import NetlinkConntrack
from proxy.kube.client import ENDPOINTSLICES, NODES, SERVICES, RawApi, load_api_config
from proxy.kube.listwatch import metadata_only
from proxy.kube.reflector import Reflector
from proxy.memory import defer_collection
from proxy.metrics import ProxyMetrics
from proxy.model import IPFamily, NodeContext, NodeInfo, ProxyState, SyncHint
from proxy.parse import PROXY_LABEL_SELECTOR
from proxy.proxier import Proxier
from proxy.runner import BoundedFrequencyRunner

log = logging.getLogger("proxy")


def backend_config(
    settings: Settings,
    *,
    family: IPFamily = IPFamily.V4,
    metrics: BackendMetrics | None = None,
    request_sync: Callable[[float], None] | None = None,
) -> BackendConfig:
    """What a backend needs of the settings, plus where it reports and asks for syncs."""
    config = BackendConfig(
        family=family,
        masquerade_bit=settings.masquerade_bit,
        localhost_nodeports=settings.localhost_nodeports,
        sync_period=settings.sync_period,
        ipvs=settings.ipvs,
    )
    if metrics is not None:
        config = replace(config, metrics=metrics)
    if request_sync is not None:
        config = replace(config, request_sync=request_sync)
    return config


def cleanup(settings: Settings) -> int:
    """`--cleanup`: remove everything every backend owns; exit 0 also when nothing was there."""
    removed = False
    for name in known():
        for family in IPFamily:
            try:
                backend = create(name, backend_config(settings, family=family))
            except UnknownBackendError as err:
                # One backend that cannot load must not keep the others' rules in place.
                log.warning("cleanup skips %s: %s", name, err)
                break
            if isinstance(backend, FamilyProbe) and backend.unusable_reason() is not None:
                continue  # nothing of ours can be in a family the node cannot serve
            removed = backend.cleanup() or removed
    log.info("cleanup done: %s", "rules removed" if removed else "nothing to remove")
    return 0


@dataclass
class Proxy:
    """A running proxy: the pieces, kept for tests and the lab."""

    settings: Settings
    backend: Backend
    metrics: ProxyMetrics
    health: ProxyHealth
    tracker: ChangeTracker
    proxier: Proxier
    runner: BoundedFrequencyRunner
    reflectors: list[Reflector] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    service_health: ServiceHealthServers | None = None

    def stop(self) -> None:
        """Stop every thread; the kernel keeps the last synced rules."""
        self.stopping.set()
        for reflector in self.reflectors:
            reflector.stop()
        self.runner.stop(timeout=10)
        for thread in self.threads:
            thread.join(timeout=10)
        self.metrics.close()
        self.health.close()
        if self.service_health is not None:
            self.service_health.close()


def start(settings: Settings) -> Proxy:
    """Build every piece and start the threads; returns once the servers listen."""
    defer_collection()  # until the first full sync: the initial lists fill the heap
    api = RawApi(load_api_config(settings.kubeconfig, settings.master))
    metrics = ProxyMetrics(backend=settings.proxy_mode)

    def queued() -> None:
        health.queued_update()
        metrics.set_last_queued_timestamp(time.time())
        # As upstream: no sync is asked for before both lists are in; otherwise every
        # object of the initial lists would wake the sync thread for nothing.
        if proxier.ready:
            runner.request()

    def sync() -> bool:
        return proxier.sync()

    tracker = ChangeTracker(on_queued=queued)
    runner = BoundedFrequencyRunner(
        sync,
        min_interval=settings.min_sync_period,
        max_interval=settings.sync_period,
    )
    configs: dict[IPFamily, BackendConfig] = {}

    def config_for(family: IPFamily, sink: BackendMetrics) -> BackendConfig:
        configs[family] = backend_config(
            settings, family=family, metrics=sink, request_sync=runner.retry
        )
        return configs[family]

    backends = family_backends(settings.proxy_mode, config_for, metrics)
    families = [family for family, _ in backends]
    backend = backends[0][1]
    netns = configs[families[0]].netns
    health = ProxyHealth(timeout=2 * settings.sync_period, metrics=metrics, families=families)
    node = NodeContext(
        node_name=settings.node_name,
        node_ips=(),
        cluster_cidrs=settings.cluster_cidrs,
        masquerade_all=settings.masquerade_all,
        nodeport_addresses=settings.nodeport_addresses,
    )
    # After each committed sync: health-check node ports follow (quick), then stale
    # UDP flows go (one netlink dump per changed frontend; the first sync after a start
    # may read the whole UDP table). Both in the backend's network namespace: this
    # process's, the node's, unless a test runs the backend elsewhere.
    # One cleaner per family: each family's flows go once its rules are committed.
    conntrack = NetlinkConntrack(netns)
    cleaners = {f: StaleFlowCleaner(conntrack, metrics, family=f) for f in families}
    service_health = ServiceHealthServers(
        proxy_healthy=health.is_healthy, metrics=metrics, netns=netns
    )

    def after_sync(state: ProxyState, hint: SyncHint, family: IPFamily) -> None:
        if family is families[0]:  # the servers serve every family: follow the primary
            service_health.after_sync(state, hint)
        cleaners[family].after_sync(state, hint)

    supported = served_features(supported_features(backend), families)
    features = UnsupportedFeatures(supported, metrics, backend=backend.name)
    proxier = Proxier(
        backends=backends,
        tracker=tracker,
        node=node,
        metrics=metrics,
        health=health,
        request_retry=runner.retry,
        min_retry=max(settings.min_sync_period, 1.0),
        max_retry=settings.sync_period,
        canary_period=settings.sync_period,
        after_sync=(after_sync,),
        check_service=features.check,
    )
    metrics.serve(settings.metrics_bind_address)
    health.serve(settings.healthz_bind_address)

    def services_synced() -> None:
        proxier.services_synced()
        if proxier.ready:
            runner.request()

    def slices_synced() -> None:
        proxier.slices_synced()
        if proxier.ready:
            runner.request()

    def node_changed(info: NodeInfo) -> None:
        health.sync_node(info.eligible)
        tracker.set_node(info)

    proxy = Proxy(
        settings, backend, metrics, health, tracker, proxier, runner, service_health=service_health
    )
    count_bad = metrics.count_skipped
    proxy.reflectors = [
        Reflector(
            api,
            SERVICES,
            ServiceHandler(tracker, services_synced, count_bad),
            label_selector=PROXY_LABEL_SELECTOR,
            # Handlers keep parsed values; the reflector's store needs only names.
            store_transform=metadata_only,
        ),
        Reflector(
            api,
            ENDPOINTSLICES,
            SliceHandler(tracker, slices_synced, count_bad),
            label_selector=PROXY_LABEL_SELECTOR,
            store_transform=metadata_only,
        ),
        Reflector(
            api,
            NODES,
            NodeHandler(node_changed),
            field_selector=f"metadata.name={settings.node_name}",
        ),
    ]
    # As upstream's SyncLoop: healthy while starting, until a queued change grows old.
    health.updated()
    runner.start()
    for reflector in proxy.reflectors:
        thread = threading.Thread(
            target=reflector.run,
            args=(proxy.stopping,),
            name=f"watch-{reflector.name}",
            daemon=True,
        )
        thread.start()
        proxy.threads.append(thread)
    log.info(
        "proxy started: node %s, mode %s, backend %s, families %s",
        settings.node_name,
        settings.proxy_mode,
        backend.name,
        "+".join(f"IPv{family.value}" for family in families),
    )
    return proxy


class _FamilyMetrics:
    """The metrics sink of one family's backend: its rule counts carry its family
    (`ip_family`), its phase timings are shared."""

    def __init__(self, sink: BackendMetrics, family: IPFamily) -> None:
        self._sink = sink
        self._family = family

    def set_iptables_rules(self, table: str, count: int, family: IPFamily | None = None) -> None:
        self._sink.set_iptables_rules(table, count, self._family)

    def observe_phase(self, phase: str, seconds: float) -> None:
        self._sink.observe_phase(phase, seconds)


def family_backends(
    mode: str,
    config_for: Callable[[IPFamily, BackendMetrics], BackendConfig],
    metrics: BackendMetrics,
) -> list[tuple[IPFamily, Backend]]:
    """One backend per IP family this node can serve in `mode`, IPv4 first.

    As upstream: dual-stack wherever both families work, single-stack otherwise with
    a line saying why. IPv6 needs the kernel's IPv6 (`/proc/net/if_inet6`) and the
    backend's own tools (`FamilyProbe`).
    """
    backends: list[tuple[IPFamily, Backend]] = []
    for family in IPFamily:
        sink = _FamilyMetrics(metrics, family)
        backend = create(mode, config_for(family, sink))
        reason = _family_unusable(family, backend)
        if reason is None:
            backends.append((family, backend))
        elif family is IPFamily.V4:
            log.warning("IPv4 cannot be served here (%s); trying IPv6 only", reason)
        else:
            log.info("single-stack IPv4: IPv6 cannot be served here (%s)", reason)
    if not backends:
        raise UnknownBackendError(f"proxy mode {mode!r}: neither IPv4 nor IPv6 works here")
    return backends


def served_features(declared: frozenset[Feature], families: list[IPFamily]) -> frozenset[Feature]:
    """What the node programs: what the backend declares, less a family it cannot serve
    here (a single-stack node reports a Service's IPv6 ClusterIP as unsupported)."""
    family_of = {Feature.IPV4: IPFamily.V4, Feature.IPV6: IPFamily.V6}
    return frozenset(f for f in declared if family_of.get(f, families[0]) in families)


def _family_unusable(family: IPFamily, backend: Backend) -> str | None:
    if family is IPFamily.V6 and not os.path.exists("/proc/net/if_inet6"):
        return "the kernel has no IPv6"
    if isinstance(backend, FamilyProbe):
        return backend.unusable_reason()
    return None


def run(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; return the process exit code."""
    if settings.cleanup:
        return cleanup(settings)
    proxy = start(settings)
    done = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping (rules stay in place)", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    proxy.stop()
    return 0
