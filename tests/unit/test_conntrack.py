"""Stale UDP conntrack cleanup: the pure decision, and the cleaner against a fake table."""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType

from proxy.conntrack import StaleFlowCleaner, stale_udp_flows
from proxy.kernel.conntrack import UdpFlowSelector
from proxy.model import (
    Endpoint,
    IPFamily,
    NodeContext,
    Protocol,
    ProxyState,
    ServiceKey,
    ServicePort,
    ServicePortName,
    ServicePortState,
    SyncHint,
)
from tests.fakes.conntrack_fake import FakeConntrack, flow

V4 = IPFamily.V4
VIP = "198.19.0.10"
NODE = "198.18.0.2"
CLIENT = "198.18.0.100"


def name(service: str = "dns", proto: Protocol = Protocol.UDP) -> ServicePortName:
    return ServicePortName(ServiceKey("ns", service), "dns", proto)


def ep(
    ip: str,
    *,
    port: int = 5353,
    ready: bool = True,
    serving: bool = True,
    terminating: bool = False,
) -> Endpoint:
    return Endpoint(ip=ip, port=port, ready=ready, serving=serving, terminating=terminating)


def port_state(
    endpoints: Iterable[Endpoint],
    *,
    service: str = "dns",
    proto: Protocol = Protocol.UDP,
    vip: str = VIP,
    port: int = 53,
    node_port: int = 0,
    external_ips: tuple[str, ...] = (),
    lb_ips: tuple[str, ...] = (),
) -> ServicePortState:
    eps = tuple(endpoints)
    usable = tuple(e for e in eps if e.ready)
    return ServicePortState(
        port=ServicePort(
            name=name(service, proto),
            cluster_ips=(vip,),
            port=port,
            node_port=node_port,
            external_ips=external_ips,
            load_balancer_ips=lb_ips,
        ),
        cluster_endpoints=usable,
        external_endpoints=usable,
        all_endpoints=eps,
    )


def decide(
    new: Iterable[ServicePortState],
    old: Iterable[ServicePortState] = (),
    changed: Iterable[ServicePortName] | None = None,
) -> list[UdpFlowSelector]:
    services = {s.name: s for s in new}
    previous = {s.name: s for s in old}
    names = set(services) | set(previous) if changed is None else set(changed)
    return stale_udp_flows(services, names, previous)


def sel(ip: str | None, port: int, *keep: str) -> UdpFlowSelector:
    """Keep the flows to these endpoint addresses (at the echo port 5353)."""
    return UdpFlowSelector(V4, port, ip, frozenset((address, 5353) for address in keep))


# -- the decision ------------------------------------------------------------------------


def test_an_endpoint_removed_cleans_flows_to_every_frontend_not_going_to_the_rest() -> None:
    old = port_state([ep("198.18.64.1"), ep("198.18.64.2")], node_port=30053)
    new = port_state([ep("198.18.64.2")], node_port=30053)
    assert decide([new], [old]) == [
        sel(None, 30053, "198.18.64.2"),
        sel(VIP, 53, "198.18.64.2"),
    ]


def test_from_zero_to_some_endpoints_cleans_flows_cached_while_rejected() -> None:
    old = port_state([], external_ips=("198.18.0.50",), lb_ips=("198.18.0.60",))
    new = port_state([ep("198.18.64.1")], external_ips=("198.18.0.50",), lb_ips=("198.18.0.60",))
    assert decide([new], [old]) == [
        sel("198.18.0.50", 53, "198.18.64.1"),
        sel("198.18.0.60", 53, "198.18.64.1"),
        sel(VIP, 53, "198.18.64.1"),
    ]


def test_a_new_port_is_cleaned_as_if_it_had_had_no_endpoints() -> None:
    assert decide([port_state([ep("198.18.64.1")])]) == [sel(VIP, 53, "198.18.64.1")]


def test_adding_an_endpoint_to_a_served_port_cleans_nothing() -> None:
    old = port_state([ep("198.18.64.1")])
    new = port_state([ep("198.18.64.1"), ep("198.18.64.2")])
    assert decide([new], [old]) == []


def test_no_serving_endpoint_now_means_nothing_to_clean() -> None:
    old = port_state([ep("198.18.64.1")])
    new = port_state([ep("198.18.64.1", ready=False, serving=False)])
    assert decide([new], [old]) == []


def test_terminating_but_serving_endpoints_keep_their_flows_as_upstream() -> None:
    old = port_state([ep("198.18.64.1"), ep("198.18.64.2")])
    new = port_state([ep("198.18.64.1", ready=False, terminating=True)])
    assert decide([new], [old]) == [sel(VIP, 53, "198.18.64.1")]


def test_tcp_and_sctp_ports_are_never_cleaned() -> None:
    for proto in (Protocol.TCP, Protocol.SCTP):
        old = port_state([ep("198.18.64.1"), ep("198.18.64.2")], proto=proto)
        new = port_state([ep("198.18.64.2")], proto=proto)
        assert decide([new], [old]) == []


def test_a_removed_port_loses_every_flow_to_its_frontends() -> None:
    old = port_state([ep("198.18.64.1")], node_port=30053)
    assert decide([], [old]) == [sel(None, 30053), sel(VIP, 53)]


def test_a_renumbered_port_cleans_the_old_frontend_and_the_new_one() -> None:
    old = port_state([ep("198.18.64.1")], port=53)
    new = port_state([ep("198.18.64.1")], port=54)
    assert decide([new], [old]) == [sel(VIP, 53), sel(VIP, 54, "198.18.64.1")]


def test_a_frontend_taken_over_by_another_changed_port_is_left_to_that_port() -> None:
    old = port_state([ep("198.18.64.1")], service="old", node_port=30053)
    new = port_state([ep("198.18.64.9")], service="new", vip="198.19.0.11", node_port=30053)
    assert decide([new], [old]) == [
        sel(None, 30053, "198.18.64.9"),
        sel(VIP, 53),
        sel("198.19.0.11", 53, "198.18.64.9"),
    ]


def test_a_renumbered_target_port_moves_the_flows_to_the_old_one() -> None:
    old = port_state([ep("198.18.64.1", port=5353)])
    new = port_state([ep("198.18.64.1", port=5354)])
    assert decide([new], [old]) == [
        UdpFlowSelector(V4, 53, VIP, frozenset({("198.18.64.1", 5354)}))
    ]


def test_a_cluster_port_equal_to_a_node_port_sorts_without_error() -> None:
    new = port_state([ep("198.18.64.1")], port=30053, node_port=30053)
    assert decide([new]) == [sel(None, 30053, "198.18.64.1"), sel(VIP, 30053, "198.18.64.1")]


def test_only_changed_ports_are_examined() -> None:
    unchanged = port_state([ep("198.18.64.1")], service="other", vip="198.19.0.11")
    assert decide([unchanged], changed=[]) == []


# -- the cleaner -------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.deleted: list[tuple[IPFamily, int]] = []
        self.durations: list[tuple[IPFamily, float]] = []
        self.failures = 0

    def count_conntrack_deleted(self, family: IPFamily, count: int) -> None:
        self.deleted.append((family, count))

    def observe_conntrack_cleanup(self, family: IPFamily, seconds: float) -> None:
        self.durations.append((family, seconds))

    def count_conntrack_failure(self) -> None:
        self.failures += 1


def proxy_state(*ports: ServicePortState) -> ProxyState:
    return ProxyState(
        node=NodeContext("n1", (NODE,)), services=MappingProxyType({p.name: p for p in ports})
    )


def hint(changed: Iterable[ServicePortState], previous: Iterable[ServicePortState]) -> SyncHint:
    return SyncHint(
        full=False,
        changed=frozenset(s.name for s in changed),
        previous=MappingProxyType({s.name: s for s in previous}),
    )


def test_the_cleaner_deletes_exactly_the_stale_flows_and_counts_them() -> None:
    table = FakeConntrack(
        [
            flow(CLIENT, 20001, VIP, 53, "198.18.64.1", 5353),  # to the removed endpoint: goes
            flow(CLIENT, 20002, VIP, 53, "198.18.64.2", 5353),  # to the remaining one: stays
            flow(CLIENT, 20003, NODE, 30053, "198.18.64.1", 5353),  # NodePort, removed: goes
            flow(CLIENT, 20004, "198.19.0.99", 53, "198.18.64.1", 5353),  # another VIP: stays
            flow(CLIENT, 20005, VIP, 53, "198.18.64.2", 5354),  # old target port: goes
        ]
    )
    metrics = Recorder()
    cleaner = StaleFlowCleaner(table, metrics)
    old = port_state([ep("198.18.64.1"), ep("198.18.64.2")], node_port=30053)
    new = port_state([ep("198.18.64.2")], node_port=30053)
    cleaner.after_sync(proxy_state(new), hint([new], [old]))
    assert [f.src_port for f in table.flows] == [20002, 20004]
    assert metrics.deleted == [(V4, 3)]
    assert len(metrics.durations) == 1


def test_nothing_to_clean_touches_no_table() -> None:
    table = FakeConntrack()
    cleaner = StaleFlowCleaner(table, Recorder())
    old = port_state([ep("198.18.64.1")])
    new = port_state([ep("198.18.64.1"), ep("198.18.64.2")])
    cleaner.after_sync(proxy_state(new), hint([new], [old]))
    assert table.calls == []


def test_a_failure_is_counted_never_raised_and_retried_at_the_next_sync() -> None:
    table = FakeConntrack([flow(CLIENT, 20001, VIP, 53, "198.18.64.1", 5353)])
    table.fail_next = 1
    metrics = Recorder()
    cleaner = StaleFlowCleaner(table, metrics)
    old = port_state([ep("198.18.64.1"), ep("198.18.64.2")])
    new = port_state([ep("198.18.64.2")])
    cleaner.after_sync(proxy_state(new), hint([new], [old]))
    assert metrics.failures == 1
    assert len(table.flows) == 1
    # The next sync changes nothing about this port, yet the cleanup is done again.
    cleaner.after_sync(proxy_state(new), hint([], []))
    assert table.flows == []
    assert metrics.deleted == [(V4, 1)]
    # And only once: a later empty sync does not touch the table.
    cleaner.after_sync(proxy_state(new), hint([], []))
    assert len(table.calls) == 2
