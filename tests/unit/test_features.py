"""What a backend declares it supports, and reporting services that use anything else."""

from __future__ import annotations

from proxy.backends.base import DEFAULT_FEATURES, Feature, supported_features
from proxy.features import UnsupportedFeatures, features_used
from proxy.model import (
    Endpoint,
    Protocol,
    ServiceKey,
    ServicePort,
    ServicePortName,
    ServicePortState,
)

KEY = ServiceKey("ns", "web")


def state(
    *, ips: tuple[str, ...] = ("198.19.0.10",), proto: Protocol = Protocol.TCP, **port_args: object
) -> ServicePortState:
    port = ServicePort(
        name=ServicePortName(KEY, "http", proto),
        cluster_ips=ips,
        port=80,
        **port_args,  # type: ignore[arg-type]
    )
    endpoint = Endpoint(ip="198.18.64.1", port=8080)
    return ServicePortState(port, (endpoint,), (endpoint,), (endpoint,))


class Counter:
    def __init__(self) -> None:
        self.counted: list[str] = []

    def count_unsupported(self, feature: str) -> None:
        self.counted.append(feature)


def test_the_default_is_everything_the_iptables_backend_programs() -> None:
    assert frozenset(Feature) == DEFAULT_FEATURES
    assert {Feature.SESSION_AFFINITY, Feature.EXTERNAL_IPS, Feature.SCTP} <= DEFAULT_FEATURES

    class Plain:
        pass

    class Narrow:
        supported_features = frozenset({Feature.IPV4})

    assert supported_features(Plain()) == DEFAULT_FEATURES
    assert supported_features(Narrow()) == {Feature.IPV4}


def test_features_used_by_a_service() -> None:
    assert features_used([state()]) == {Feature.IPV4}
    rich = state(
        proto=Protocol.SCTP,
        session_affinity_seconds=10800,
        external_policy_local=True,
        internal_policy_local=True,
        load_balancer_ips=("198.18.0.60",),
        load_balancer_source_ranges=("198.18.0.0/24",),
        external_ips=("198.18.0.50",),
    )
    assert features_used([rich]) == set(Feature) - {Feature.IPV6}
    assert Feature.IPV6 in features_used([state(ips=("fd00::10",))])


def test_an_unsupported_feature_is_reported_once_per_service_until_it_comes_back() -> None:
    counter = Counter()
    check = UnsupportedFeatures({Feature.IPV4, Feature.EXTERNAL_IPS}, counter, backend="test").check
    check(KEY, (state(session_affinity_seconds=60),))
    check(KEY, (state(session_affinity_seconds=60),))  # recomputed, same use: not again
    check(ServiceKey("ns", "other"), (state(session_affinity_seconds=60),))
    assert counter.counted == ["session-affinity", "session-affinity"]
    check(KEY, ())  # deleted
    check(KEY, (state(session_affinity_seconds=60, external_ips=("198.18.0.50",)),))
    assert counter.counted == ["session-affinity"] * 3  # externalIPs are supported here
