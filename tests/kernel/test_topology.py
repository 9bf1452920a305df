"""The lab network itself: who reaches whom, with no proxy rules at all.

Everything later packet tests rely on is checked here first: pods reach each other
through the node's IP stack (not a bridge), the client reaches the node, the node
reaches pods, probes tell "refused" from "unreachable", and topologies are cleaned up
even after a crash.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

from lab.netns import (
    CLIENT_IP,
    NODE_IP,
    POD_GATEWAY_IP,
    Topology,
    cleanup_stale,
    list_namespaces,
)
from lab.probe import EchoReply, ProbeFailure, probe, spread
from tests.kernel.conftest import ECHO_TCP_PORT, ECHO_UDP_PORT, Lab

pytestmark = pytest.mark.kernel

PROTOS = [("tcp", ECHO_TCP_PORT), ("udp", ECHO_UDP_PORT)]


def _reply(result: EchoReply | ProbeFailure) -> EchoReply:
    assert isinstance(result, EchoReply), result
    return result


def _packets_through(lab: Lab, host_veth: str) -> int:
    """Packets the node received on a pod's host-side veth (the pod sent them)."""
    out = lab.topo.run_in(
        lab.topo.node_ns, ["cat", f"/sys/class/net/{host_veth}/statistics/rx_packets"]
    )
    return int(out.stdout)


@pytest.mark.parametrize(("proto", "port"), PROTOS)
def test_pods_reach_each_other_through_the_node(lab: Lab, proto: str, port: int) -> None:
    pod0, pod1 = lab.pods["pod0"], lab.pods["pod1"]
    before = _packets_through(lab, pod0.host_veth)
    reply = _reply(probe(pod0.netns, pod1.ip, port, proto))  # type: ignore[arg-type]
    assert (reply.pod, reply.src_ip, reply.proto, reply.port) == ("pod1", pod0.ip, proto, port)
    # Routed, not bridged: the node's end of pod0's veth saw the packets.
    assert _packets_through(lab, pod0.host_veth) > before


@pytest.mark.parametrize(("proto", "port"), PROTOS)
def test_node_reaches_every_pod_from_the_pod_gateway_address(
    lab: Lab, proto: str, port: int
) -> None:
    for name, pod in lab.pods.items():
        reply = _reply(probe(lab.topo.node_ns, pod.ip, port, proto))  # type: ignore[arg-type]
        assert (reply.pod, reply.src_ip) == (name, POD_GATEWAY_IP)


@pytest.mark.parametrize(("proto", "port"), PROTOS)
def test_client_and_pods_reach_the_node(
    make_lab: Callable[..., Lab], proto: str, port: int
) -> None:
    small = make_lab(["pod0"], node_echo=True)
    topo = small.topo
    from_client = _reply(probe(topo.client_ns, NODE_IP, port, proto))  # type: ignore[arg-type]
    assert (from_client.pod, from_client.src_ip) == ("node", CLIENT_IP)
    pod = small.pods["pod0"]
    from_pod = _reply(probe(pod.netns, NODE_IP, port, proto))  # type: ignore[arg-type]
    assert (from_pod.pod, from_pod.src_ip) == ("node", pod.ip)


def test_client_is_outside_the_cluster(lab: Lab) -> None:
    # The client routes only the service CIDR to the node; pod IPs are not its business.
    result = probe(lab.topo.client_ns, lab.pods["pod0"].ip, ECHO_TCP_PORT, "tcp")
    assert result == ProbeFailure("unreachable", "Network is unreachable")


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_closed_port_is_refused_quickly(lab: Lab, proto: str) -> None:
    started = time.monotonic()
    result = probe(lab.pods["pod0"].netns, lab.pods["pod1"].ip, 9, proto, timeout=2.0)  # type: ignore[arg-type]
    assert isinstance(result, ProbeFailure)
    assert result.kind == "refused"
    assert time.monotonic() - started < 1.0


def test_spread_counts_answers_and_failures(lab: Lab) -> None:
    pod0, pod1 = lab.pods["pod0"], lab.pods["pod1"]
    assert spread(pod0.netns, pod1.ip, ECHO_UDP_PORT, "udp", 5) == {"pod1": 5}
    assert spread(pod0.netns, pod1.ip, 9, "tcp", 3) == {"!refused": 3}


def test_udp_probes_use_a_fresh_source_port_each_time(lab: Lab) -> None:
    pod0, pod1 = lab.pods["pod0"], lab.pods["pod1"]
    ports = {_reply(probe(pod0.netns, pod1.ip, ECHO_UDP_PORT, "udp")).src_port for _ in range(20)}
    assert len(ports) == 20


def test_echo_server_answers_with_its_own_name_and_exits_cleanly_on_sigterm(lab: Lab) -> None:
    # The client namespace runs no server yet, so this one owns the ports there.
    server = lab.start_echo("extra", lab.topo.client_ns)
    reply = _reply(probe(lab.topo.client_ns, CLIENT_IP, ECHO_UDP_PORT, "udp"))
    assert (reply.pod, reply.src_ip, reply.proto, reply.port) == (
        "extra",
        CLIENT_IP,
        "udp",
        ECHO_UDP_PORT,
    )
    assert server.stop() == 0
    assert lab.echoes.pop("extra") is server


def test_pods_come_and_go(make_lab: Callable[..., Lab]) -> None:
    small = make_lab(["pod0", "pod1", "pod2"])
    gone = small.pods["pod1"]
    small.remove_pod("pod1")
    assert gone.netns not in list_namespaces()
    result = probe(small.pods["pod0"].netns, gone.ip, ECHO_TCP_PORT, "tcp", timeout=0.5)
    assert isinstance(result, ProbeFailure)
    # The lowest free address is handed out again, and the new pod is reachable.
    back = small.add_pod("pod3")
    assert back.ip == gone.ip
    reply = _reply(probe(small.pods["pod0"].netns, back.ip, ECHO_TCP_PORT, "tcp"))
    assert reply.pod == "pod3"


def test_destroy_removes_everything_and_is_idempotent() -> None:
    topo = Topology.create(pods=2)
    names = topo.namespaces
    assert set(names) <= set(list_namespaces())
    topo.destroy()
    topo.destroy()
    assert not set(names) & set(list_namespaces())


def test_cleanup_stale_removes_a_crashed_run_and_spares_a_live_one() -> None:
    crashed = Topology.create(pods=1)
    live = Topology.create(pods=1)
    try:
        # Simulate a crash: the owner recorded for `crashed` is a process that has exited.
        dead = subprocess.Popen(["true"])
        dead.wait()
        assert crashed.owner_file.exists()
        crashed.owner_file.write_text(f"{dead.pid} 1\n")
        deleted = cleanup_stale()
        assert set(deleted) == set(crashed.namespaces)
        remaining = set(list_namespaces())
        assert not set(crashed.namespaces) & remaining
        assert set(live.namespaces) <= remaining
    finally:
        crashed.destroy()  # tolerates "already gone"
        live.destroy()
