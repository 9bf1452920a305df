"""Assemble and run the proxy: settings in, threads out, never a flush on the way out.

Threads (all daemons, started here, stopped by `Proxy.stop`):

- one reflector per watched resource (Services, EndpointSlices, this Node), each
  listing then watching and calling its handler on its own thread;
- the sync runner, the only thread that calls the backend;
- the metrics and health HTTP servers, and one per healthCheckNodePort
  (`proxy.healthcheck`, opened and closed by the sync thread after each sync).

After each committed sync the sync thread also deletes stale UDP conntrack flows
(`proxy.conntrack`) in this process's network namespace, the node's.

The main thread only waits for SIGTERM/SIGINT. Stopping stops the threads and leaves
the kernel exactly as the last successful sync left it (kube-proxy's promise: a
restart or upgrade keeps traffic flowing).
"""

from __future__ import annotations

import logging
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
from proxy.model import NodeContext, NodeInfo
from proxy.parse import PROXY_LABEL_SELECTOR
from proxy.proxier import Proxier
from proxy.runner import BoundedFrequencyRunner

log = logging.getLogger("proxy")


def backend_config(
    settings: Settings,
    *,
    metrics: BackendMetrics | None = None,
    request_sync: Callable[[float], None] | None = None,
) -> BackendConfig:
    """What a backend needs of the settings, plus where it reports and asks for syncs."""
    config = BackendConfig(
        masquerade_bit=settings.masquerade_bit,
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
        try:
            backend = create(name, backend_config(settings))
        except UnknownBackendError as err:
            # One backend that cannot load must not keep the others' rules in place.
            log.warning("cleanup skips %s: %s", name, err)
            continue
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
    health = ProxyHealth(timeout=2 * settings.sync_period, metrics=metrics)

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
    config = backend_config(settings, metrics=metrics, request_sync=runner.retry)
    backend = create(settings.proxy_mode, config)
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
    cleaner = StaleFlowCleaner(NetlinkConntrack(config.netns), metrics)
    service_health = ServiceHealthServers(
        proxy_healthy=health.is_healthy, metrics=metrics, netns=config.netns
    )
    features = UnsupportedFeatures(supported_features(backend), metrics, backend=backend.name)
    proxier = Proxier(
        backend=backend,
        tracker=tracker,
        node=node,
        metrics=metrics,
        health=health,
        request_retry=runner.retry,
        min_retry=max(settings.min_sync_period, 1.0),
        max_retry=settings.sync_period,
        canary_period=settings.sync_period,
        after_sync=(service_health.after_sync, cleaner.after_sync),
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
        "proxy started: node %s, mode %s, backend %s",
        settings.node_name,
        settings.proxy_mode,
        backend.name,
    )
    return proxy


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
