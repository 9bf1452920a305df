"""Endpoint choice per traffic policy, terminating fallback and topology hints."""

from __future__ import annotations

from dataclasses import replace

from proxy.model import Endpoint, Protocol, ServiceKey, ServicePort, ServicePortName
from proxy.topology import categorize

PORT = ServicePort(
    name=ServicePortName(ServiceKey("ns", "web"), "http", Protocol.TCP),
    cluster_ips=("198.19.0.10",),
    port=80,
)


def ep(
    last: int,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    local: bool = False,
    zones: frozenset[str] | None = None,
) -> Endpoint:
    return Endpoint(
        ip=f"198.18.64.{last}",
        port=8080,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=terminating,
        node_name="me" if local else "other",
        is_local=local,
        zone_hints=zones,
    )


def ips(endpoints: tuple[Endpoint, ...]) -> list[str]:
    return [e.ip.rsplit(".", 1)[1] for e in endpoints]


def test_ready_endpoints_only() -> None:
    state = categorize(PORT, [ep(1), ep(2, ready=False)], "me", None)
    assert ips(state.cluster_endpoints) == ["1"]
    assert state.external_endpoints == state.cluster_endpoints
    assert len(state.all_endpoints) == 2


def test_terminating_fallback_when_nothing_is_ready() -> None:
    endpoints = [
        ep(1, ready=False, serving=True, terminating=True),
        ep(2, ready=False, serving=False, terminating=True),
        ep(3, ready=False),
    ]
    assert ips(categorize(PORT, endpoints, "me", None).cluster_endpoints) == ["1"]


def test_no_fallback_while_something_is_ready() -> None:
    endpoints = [ep(1, ready=False, serving=True, terminating=True), ep(2)]
    assert ips(categorize(PORT, endpoints, "me", None).cluster_endpoints) == ["2"]


def test_internal_policy_local() -> None:
    port = replace(PORT, internal_policy_local=True)
    state = categorize(port, [ep(1, local=True), ep(2)], "me", None)
    assert ips(state.cluster_endpoints) == ["1"]
    none_local = categorize(port, [ep(2)], "me", None)
    assert none_local.cluster_endpoints == ()


def test_external_policy_local_keeps_cluster_for_cluster_ip() -> None:
    port = replace(PORT, node_port=30080, external_policy_local=True)
    state = categorize(port, [ep(1, local=True), ep(2)], "me", None)
    assert ips(state.cluster_endpoints) == ["1", "2"]
    assert ips(state.external_endpoints) == ["1"]


def test_local_terminating_fallback_is_separate_from_cluster() -> None:
    port = replace(PORT, node_port=30080, external_policy_local=True)
    endpoints = [ep(1, ready=False, serving=True, terminating=True, local=True), ep(2)]
    state = categorize(port, endpoints, "me", None)
    assert ips(state.cluster_endpoints) == ["2"]
    assert ips(state.external_endpoints) == ["1"]


def test_zone_hints_used_only_when_every_ready_endpoint_is_hinted() -> None:
    a, b = frozenset({"a"}), frozenset({"b"})
    hinted = [ep(1, zones=a), ep(2, zones=b)]
    assert ips(categorize(PORT, hinted, "me", "a").cluster_endpoints) == ["1"]
    partly = [ep(1, zones=a), ep(2)]
    assert ips(categorize(PORT, partly, "me", "a").cluster_endpoints) == ["1", "2"]
    # No endpoint hinted for our zone: ignore hints rather than black-hole.
    assert ips(categorize(PORT, hinted, "me", "c").cluster_endpoints) == ["1", "2"]


def test_both_policies_local_keep_the_cluster_set_for_the_short_circuit() -> None:
    """Upstream's UsesClusterEndpoints: an externally reachable port always needs the
    cluster set, for pods and the node reaching its external addresses."""
    eps = (ep(1, local=True), ep(2), ep(3))
    both = replace(PORT, node_port=30080, internal_policy_local=True, external_policy_local=True)
    state = categorize(both, eps, "me", None)
    assert ips(state.cluster_endpoints) == ips(state.external_endpoints) == ["1"]
    assert state.short_circuit_endpoints is not None
    assert ips(state.short_circuit_endpoints) == ["1", "2", "3"]
    # Only then: one Local policy, or no external address, needs no separate set.
    for port in (
        replace(PORT, node_port=30080, external_policy_local=True),
        replace(PORT, node_port=30080, internal_policy_local=True),
        replace(PORT, internal_policy_local=True, external_policy_local=True),
    ):
        assert categorize(port, eps, "me", None).short_circuit_endpoints is None
