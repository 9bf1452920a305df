"""Which Service features a service uses, and reporting those the backend does not program.

A backend declares what it programs (`proxy.backends.base.supported_features`). When
the proxier recomputes a service it hands the new port states to
`UnsupportedFeatures.check`, which logs a warning and moves
`kubeproxy_py_unsupported_total{feature}` once per service and feature: again only
if the service stops using the feature and later uses it again (or is deleted and
re-created). Nothing is filtered out of the state: the backend still receives it all
and ignores what it cannot render, so traffic for the rest of the service works.

Cost: proportional to the recomputed service; the memory held is one small set per
service that uses an unsupported feature.

Concurrency: called only on the proxier's sync thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from proxy.backends.base import Feature
from proxy.model import IPFamily, ServiceKey, ServicePortState
from proxy.model import Protocol as L4Protocol

log = logging.getLogger(__name__)


def features_used(states: Iterable[ServicePortState]) -> set[Feature]:
    """Every `Feature` the ports of one service use."""
    used: set[Feature] = set()
    for state in states:
        port = state.port
        if port.session_affinity_seconds is not None:
            used.add(Feature.SESSION_AFFINITY)
        if port.external_policy_local:
            used.add(Feature.EXTERNAL_POLICY_LOCAL)
        if port.internal_policy_local:
            used.add(Feature.INTERNAL_POLICY_LOCAL)
        if port.load_balancer_ips:
            used.add(Feature.LOAD_BALANCER_IPS)
        if port.load_balancer_source_ranges:
            used.add(Feature.SOURCE_RANGES)
        if port.external_ips:
            used.add(Feature.EXTERNAL_IPS)
        if port.protocol == L4Protocol.SCTP:
            used.add(Feature.SCTP)
        for ip in port.cluster_ips:
            used.add(Feature.IPV6 if ":" in ip else Feature.IPV4)
        if any(ep.family == IPFamily.V6 for ep in state.all_endpoints):
            used.add(Feature.IPV6)
    return used


class UnsupportedCounter(Protocol):
    """Where reports are counted (implemented by `proxy.metrics.ProxyMetrics`)."""

    def count_unsupported(self, feature: str) -> None: ...


class UnsupportedFeatures:
    """Reports each service's use of features outside `supported`, once per feature."""

    def __init__(
        self, supported: Iterable[Feature], metrics: UnsupportedCounter, *, backend: str
    ) -> None:
        self._supported = frozenset(supported)
        self._metrics = metrics
        self._backend = backend
        self._reported: dict[ServiceKey, frozenset[Feature]] = {}

    def check(self, key: ServiceKey, states: Iterable[ServicePortState]) -> None:
        """`key` now has these port states (none: deleted); report what is newly unsupported."""
        missing = frozenset(features_used(states) - self._supported)
        before = self._reported.pop(key, frozenset())
        if missing:
            self._reported[key] = missing
        for feature in sorted(missing - before):
            log.warning(
                "service %s uses %s, which the %s backend does not program yet; "
                "its other traffic is still programmed",
                key,
                feature,
                self._backend,
            )
            self._metrics.count_unsupported(str(feature))

    def reported(self) -> dict[ServiceKey, frozenset[Feature]]:
        """What is currently reported, per service (for tests)."""
        return dict(self._reported)
