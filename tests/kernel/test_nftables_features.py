"""Service features the nftables backend has beyond the shared packet suite, with real
packets: externalIPs, LoadBalancer IPs with loadBalancerSourceRanges,
`externalTrafficPolicy: Local` (the client's address kept, local endpoints only for
traffic from outside, the short-circuit to every endpoint for pods and the node), and
ClientIP session affinity.

All pods of the lab run on the node; a test that needs "remote" endpoints marks some
as not local in the state it hands the backend (they stay reachable, which is what
lets the short-circuit be seen).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from lab.netns import CLUSTER_CIDR, NODE_IP
from lab.probe import EchoReply, ProbeFailure, probe, spread
from proxy.backends.base import BackendConfig, create
from proxy.model import (
    Endpoint,
    NodeContext,
    Protocol,
    ProxyState,
    ServiceKey,
    ServicePort,
    ServicePortName,
    ServicePortState,
    SyncHint,
)
from tests.fakes.driver import Driven
from tests.kernel.conftest import ECHO_TCP_PORT, Lab

pytestmark = pytest.mark.kernel

NAME = ServicePortName(ServiceKey("default", "lb"), "http", Protocol.TCP)
VIP = "198.19.0.30"
EXTERNAL_IP = "198.19.6.1"
LB_IP = "198.19.5.1"
NODE_PORT = 30090
FULL = SyncHint(full=True)
REQUESTS = 40
QUICK = 0.5


@pytest.fixture
def backend(lab: Lab) -> Iterator[object]:
    made = create("nftables", BackendConfig(netns=lab.topo.node_ns))
    yield made
    made.cleanup()


def sync(
    backend: object,
    lab: Lab,
    *,
    local: Sequence[str],
    remote: Sequence[str] = (),
    external_local: bool = False,
    ranges: tuple[str, ...] = (),
) -> None:
    ips = lab.pod_ips()
    cluster = tuple(
        Endpoint(ip=ips[name], port=ECHO_TCP_PORT, is_local=name in local)
        for name in (*local, *remote)
    )
    external = tuple(e for e in cluster if e.is_local) if external_local else cluster
    port = ServicePort(
        name=NAME,
        cluster_ips=(VIP,),
        port=80,
        node_port=NODE_PORT,
        external_ips=(EXTERNAL_IP,),
        load_balancer_ips=(LB_IP,),
        load_balancer_source_ranges=ranges,
        external_policy_local=external_local,
    )
    node = NodeContext("kpy-node", (NODE_IP,), cluster_cidrs=(CLUSTER_CIDR,))
    state = ProxyState(node, {NAME: ServicePortState(port, cluster, external, cluster)})
    backend.sync(state, FULL)  # type: ignore[attr-defined]


def answered_by(netns: str, dst: str, port: int = 80) -> set[str]:
    return set(spread(netns, dst, port, "tcp", REQUESTS, timeout=QUICK))


def source_seen(netns: str, dst: str, port: int = 80) -> str:
    reply = probe(netns, dst, port, "tcp")
    assert isinstance(reply, EchoReply), reply
    return reply.src_ip


def dropped(netns: str, dst: str, port: int = 80) -> bool:
    result = probe(netns, dst, port, "tcp", timeout=QUICK)
    return isinstance(result, ProbeFailure) and result.kind == "timeout"


def test_external_and_load_balancer_ips_reach_every_endpoint_masqueraded(
    lab: Lab, backend: object
) -> None:
    sync(backend, lab, local=["pod0", "pod1", "pod2"])
    client = lab.topo.client_ns
    for address in (EXTERNAL_IP, LB_IP):
        assert answered_by(client, address) == {"pod0", "pod1", "pod2"}
        assert source_seen(client, address) in lab.topo.node_addresses


def test_load_balancer_source_ranges_let_only_the_listed_sources_in(
    lab: Lab, backend: object
) -> None:
    pod = lab.pods["pod1"].netns
    client = lab.topo.client_ns
    sync(backend, lab, local=["pod0"], ranges=(CLUSTER_CIDR,))
    assert answered_by(pod, LB_IP) == {"pod0"}
    assert dropped(client, LB_IP)
    # Not subject to the ranges: the ClusterIP, the external IP, the NodePort.
    assert answered_by(client, VIP) == {"pod0"}
    assert answered_by(client, EXTERNAL_IP) == {"pod0"}
    assert answered_by(client, NODE_IP, NODE_PORT) == {"pod0"}
    sync(backend, lab, local=["pod0"], ranges=(CLUSTER_CIDR, f"{lab.topo.client_ip}/32"))
    assert answered_by(client, LB_IP) == {"pod0"}


def test_external_local_policy_keeps_the_client_and_short_circuits_pods(
    lab: Lab, backend: object
) -> None:
    client = lab.topo.client_ns
    pod = lab.pods["pod1"].netns
    sync(backend, lab, local=["pod0"], remote=["pod1", "pod2"], external_local=True)
    for dst, port in ((NODE_IP, NODE_PORT), (LB_IP, 80), (EXTERNAL_IP, 80)):
        # From outside: the local endpoint only, and the client's own address.
        assert answered_by(client, dst, port) == {"pod0"}, (dst, port)
        assert source_seen(client, dst, port) == lab.topo.client_ip
        # From a pod on this node: every endpoint, as if through an outside balancer.
        assert answered_by(pod, dst, port) == {"pod0", "pod1", "pod2"}, (dst, port)
    # The ClusterIP is not external: every endpoint, from anywhere.
    assert answered_by(client, VIP) == {"pod0", "pod1", "pod2"}


def test_external_local_policy_without_local_endpoints_drops_only_outside_traffic(
    lab: Lab, backend: object
) -> None:
    sync(backend, lab, local=[], remote=["pod1", "pod2"], external_local=True)
    assert dropped(lab.topo.client_ns, NODE_IP, NODE_PORT)
    assert dropped(lab.topo.client_ns, LB_IP)
    assert answered_by(lab.pods["pod0"].netns, NODE_IP, NODE_PORT) == {"pod1", "pod2"}


def test_session_affinity_keeps_a_client_on_one_endpoint_until_it_goes(lab: Lab) -> None:
    made = create("nftables", BackendConfig(netns=lab.topo.node_ns))
    driven = Driven(made)
    try:
        ips = lab.pod_ips()

        def affinity_state(names: Sequence[str]) -> ProxyState:
            eps = tuple(Endpoint(ip=ips[name], port=ECHO_TCP_PORT) for name in names)
            port = ServicePort(
                name=NAME,
                cluster_ips=(VIP,),
                port=80,
                node_port=NODE_PORT,
                session_affinity_seconds=600,
            )
            node = NodeContext("kpy-node", (NODE_IP,), cluster_cidrs=(CLUSTER_CIDR,))
            return ProxyState(node, {NAME: ServicePortState(port, eps, eps, eps)})

        driven.sync(affinity_state(["pod0", "pod1", "pod2"]), FULL)
        client = lab.topo.client_ns
        for dst, port in ((VIP, 80), (NODE_IP, NODE_PORT)):
            chosen = answered_by(client, dst, port)
            assert len(chosen) == 1, (dst, chosen)  # 40 connections, one endpoint
        first = answered_by(client, VIP).pop()
        # That endpoint goes: the client moves to another one and stays there.
        rest = [name for name in ("pod0", "pod1", "pod2") if name != first]
        driven.sync(affinity_state(rest), SyncHint(full=False, changed=frozenset({NAME})))
        moved = answered_by(client, VIP)
        assert len(moved) == 1 and moved <= set(rest), moved
    finally:
        made.cleanup()
