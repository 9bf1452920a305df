"""`NetlinkConntrack` against a real conntrack table, in the lab's node namespace.

The iptables backend programs a UDP service in a fresh lab; real datagrams from the
client create DNATed flows; then selectors delete exactly the flows they select and
nothing else (another service's flows, flows to the kept endpoint), checked with the
`conntrack` tool, which shares no code with ours. Nothing is flushed; the lab's
namespaces are the test's own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest

from lab.netns import CLUSTER_CIDR, NODE_IP
from lab.probe import EchoReply, probe
from proxy.backends.base import BackendConfig
from proxy.backends.base import create as create_backend
from proxy.kernel import conntrack as conntrack_module
from proxy.kernel.conntrack import NetlinkConntrack, UdpFlowSelector
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
from tests.kernel.conftest import ECHO_UDP_PORT, Lab

pytestmark = pytest.mark.kernel

DNS_VIP = "198.19.0.30"
OTHER_VIP = "198.19.0.31"
NODE_PORT = 30053
FLOWS = 24
"""Probes per destination; each has its own source port, so each is its own flow."""


def udp_port(service: str, vip: str, ips: list[str], node_port: int = 0) -> ServicePortState:
    endpoints = tuple(Endpoint(ip=ip, port=ECHO_UDP_PORT) for ip in ips)
    return ServicePortState(
        port=ServicePort(
            name=ServicePortName(ServiceKey("default", service), "dns", Protocol.UDP),
            cluster_ips=(vip,),
            port=53,
            node_port=node_port,
        ),
        cluster_endpoints=endpoints,
        external_endpoints=endpoints,
        all_endpoints=endpoints,
    )


def flows(lab: Lab) -> list[tuple[str, int, str]]:
    """(original destination, destination port, reply source) of every UDP flow."""
    out = lab.topo.run_in(lab.topo.node_ns, ["conntrack", "-L", "-p", "udp"]).stdout
    found = []
    for line in out.splitlines():
        dsts = re.findall(r"dst=(\S+)", line)
        srcs = re.findall(r"src=(\S+)", line)
        dports = re.findall(r"dport=(\d+)", line)
        if len(dsts) == 2 and len(srcs) == 2 and dports:
            found.append((dsts[0], int(dports[0]), srcs[1]))
    return found


@pytest.fixture
def programmed(make_lab: Callable[..., Lab]) -> Iterator[tuple[Lab, dict[str, str]]]:
    lab = make_lab(("pod0", "pod1"))
    ips = lab.pod_ips()
    backend = create_backend("iptables", BackendConfig(netns=lab.topo.node_ns, variant="nft"))
    services = [
        udp_port("dns", DNS_VIP, [ips["pod0"], ips["pod1"]], NODE_PORT),
        udp_port("other", OTHER_VIP, [ips["pod0"]]),
    ]
    node = NodeContext("kpy-node", (NODE_IP,), (CLUSTER_CIDR,))
    backend.sync(ProxyState(node, {s.name: s for s in services}), SyncHint(full=True))
    try:
        yield lab, ips
    finally:
        backend.cleanup()


def send(lab: Lab, dst: str, port: int) -> set[str]:
    answered = set()
    for _ in range(FLOWS):
        reply = probe(lab.topo.client_ns, dst, port, "udp")
        assert isinstance(reply, EchoReply), reply
        answered.add(reply.pod)
    return answered


@pytest.mark.parametrize(
    "dump_cost",
    [pytest.param(0, id="a-filtered-dump-per-selector"), pytest.param(10**9, id="one-udp-dump")],
)
def test_selected_flows_go_and_every_other_flow_stays(
    programmed: tuple[Lab, dict[str, str]], dump_cost: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conntrack_module, "FILTERED_DUMP_COST", dump_cost)
    lab, ips = programmed
    # P(24 datagrams all land on one of two endpoints) = 2 * 2**-24.
    assert send(lab, DNS_VIP, 53) == {"pod0", "pod1"}
    assert send(lab, NODE_IP, NODE_PORT) == {"pod0", "pod1"}
    assert send(lab, OTHER_VIP, 53) == {"pod0"}
    before = flows(lab)
    to_pod0 = [f for f in before if f[:2] in {(DNS_VIP, 53), (NODE_IP, NODE_PORT)}]
    to_pod0 = [f for f in to_pod0 if f[2] == ips["pod0"]]
    assert to_pod0

    table = NetlinkConntrack(netns=lab.topo.node_ns)
    keep = frozenset({(ips["pod1"], ECHO_UDP_PORT)})
    deleted = table.delete_udp_flows(
        [
            UdpFlowSelector(IPFamily.V4, 53, DNS_VIP, keep),
            UdpFlowSelector(IPFamily.V4, NODE_PORT, None, keep),
        ]
    )
    assert deleted == {IPFamily.V4: len(to_pod0)}
    after = flows(lab)
    assert sorted(after) == sorted(f for f in before if f not in to_pod0)
    # The other service's flows to pod0 are untouched.
    assert (OTHER_VIP, 53, ips["pod0"]) in after
    # Deleting again finds nothing: a flow already gone is not an error.
    assert table.delete_udp_flows([UdpFlowSelector(IPFamily.V4, 53, DNS_VIP, keep)]) == {
        IPFamily.V4: 0
    }
