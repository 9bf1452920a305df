"""The Service features of issue 13, proven with real packets, once per packet backend.

Every test is marked with the feature it proves (`FEATURES` in conftest) and runs for
each backend of `PACKET_BACKENDS`; a backend that lacks a feature declares it in
`NOT_IMPLEMENTED` and the test becomes a strict xfail. `scripts/conformance.py` turns
the junit XML of this module into docs/conformance.md.

The node-local state is computed the way the proxier computes it: `proxy.topology.
categorize` over the endpoints (and, for LoadBalancer status, `proxy.parse.parse_service`
over the Service's JSON), so the backend only renders what the core decided. In the
lab every pod runs on the node namespace; pod1 and pod2 are declared to run on another
node ("node-b") where a traffic policy needs remote endpoints, and are still reachable,
as remote pods would be over the pod network.

Probes come from a pod (inside the cluster CIDR), from the node itself, and from the
client outside the cluster; the echo servers say which endpoint answered and which
source address it saw. Probes expected to fail use a short timeout and distinguish
DROP (a timeout) from REJECT (refused at once). External and load-balancer IPs are
taken from 198.19.200.0/24, inside the service range the client routes via the node.
"""

from __future__ import annotations

import gzip
import os
import secrets
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from lab.innetns import run_in_netns
from lab.netns import CLIENT_IP, CLUSTER_CIDR, CLUSTER_CIDR6, NODE_IP
from lab.probe import EchoReply, ProbeFailure, Proto, probe, spread
from proxy.backends.base import create as create_backend
from proxy.conntrack import StaleFlowCleaner
from proxy.kernel.conntrack import NetlinkConntrack
from proxy.model import (
    Endpoint,
    IPFamily,
    NodeContext,
    Protocol,
    ProxyState,
    ServiceInfo,
    ServiceKey,
    ServicePort,
    ServicePortName,
    ServicePortState,
    SyncHint,
)
from proxy.parse import parse_service
from proxy.topology import categorize
from tests.fakes.driver import Driven
from tests.kernel.conftest import (
    ECHO_TCP_PORT,
    ECHO_UDP_PORT,
    BackendVariant,
    Lab,
    build_lab,
)

pytestmark = pytest.mark.kernel

NODE_NAME = "kpy-node"
OTHER_NODE = "node-b"
SERVICE_PORT = {"tcp": 80, "udp": 53}
NODE_PORT = {"tcp": 30180, "udp": 30153}
ECHO_PORT = {"tcp": ECHO_TCP_PORT, "udp": ECHO_UDP_PORT}
PROTOS: list[Proto] = ["tcp", "udp"]
VIP = "198.19.1.10"
EXTERNAL_IP = "198.19.200.1"
LB_IP = "198.19.200.2"
PROXY_MODE_LB_IP = "198.19.200.3"
REQUESTS = 40
"""Probes per spread: with 3 endpoints P(one unseen) = 3 * (2/3)**40, about 1e-7."""
QUICK = 0.5
"""Timeout for probes that are expected to go unanswered."""
FULL = SyncHint(full=True)


# ---------------------------------------------------------------- building states


def port_name(service: str, proto: Proto) -> ServicePortName:
    return ServicePortName(ServiceKey("features", service), proto, Protocol(proto.upper()))


def endpoints(
    lab: Lab, proto: Proto, local: Iterable[str], remote: Iterable[str] = ()
) -> list[Endpoint]:
    """Endpoints on pods by name: `local` on this node, `remote` on another one."""
    ips = lab.pod_ips()
    here = [
        Endpoint(ips[pod], ECHO_PORT[proto], node_name=NODE_NAME, is_local=True) for pod in local
    ]
    there = [Endpoint(ips[pod], ECHO_PORT[proto], node_name=OTHER_NODE) for pod in remote]
    return here + there


def service_port(service: str, proto: Proto, **fields: Any) -> ServicePort:
    return ServicePort(
        name=port_name(service, proto), cluster_ips=(VIP,), port=SERVICE_PORT[proto], **fields
    )


def categorized(port: ServicePort, eps: Sequence[Endpoint]) -> ServicePortState:
    """What the proxier hands the backend: the core's choice of endpoints."""
    return categorize(port, tuple(eps), NODE_NAME, None)


def state(*ports: ServicePortState) -> ProxyState:
    node = NodeContext(node_name=NODE_NAME, node_ips=(NODE_IP,), cluster_cidrs=(CLUSTER_CIDR,))
    return ProxyState(node=node, services={p.name: p for p in ports})


# ---------------------------------------------------------------- fixtures and probes


@pytest.fixture(scope="module")
def packet_lab(
    backend_variant: BackendVariant, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lab]:
    """Three pods with echo servers, one topology per backend variant."""
    built = build_lab(
        tmp_path_factory.mktemp(f"features-{backend_variant.id}"), ["pod0", "pod1", "pod2"]
    )
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def backend(packet_lab: Lab, backend_variant: BackendVariant) -> Iterator[Driven]:
    """A fresh backend on the node namespace; whatever it wrote is removed afterwards."""
    made = Driven(
        create_backend(backend_variant.backend, backend_variant.config(packet_lab.topo.node_ns))
    )
    yield made
    made.cleanup()


def origin_ns(lab: Lab, origin: str) -> str:
    """A probe's namespace: "client" (outside), "node", or a pod by name."""
    if origin == "client":
        return lab.topo.client_ns
    if origin == "node":
        return lab.topo.node_ns
    return lab.pods[origin].netns


def answers(lab: Lab, origin: str, dst: str, port: int, proto: Proto, n: int) -> list[EchoReply]:
    """`n` probes that must all be answered."""
    replies: list[EchoReply] = []
    for _ in range(n):
        result = probe(origin_ns(lab, origin), dst, port, proto)
        assert isinstance(result, EchoReply), (origin, dst, port, proto, result)
        replies.append(result)
    return replies


def dropped(lab: Lab, origin: str, dst: str, port: int, proto: Proto) -> None:
    """DROP: no answer and no refusal (a REJECT would be refused at once)."""
    for _ in range(2):
        result = probe(origin_ns(lab, origin), dst, port, proto, timeout=QUICK)
        assert result == ProbeFailure("timeout"), (origin, dst, port, proto, result)


def pods_of(replies: Iterable[EchoReply]) -> set[str]:
    return {reply.pod for reply in replies}


# ---------------------------------------------------------------- session affinity


@pytest.mark.feature("session-affinity")
@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("origin", ["pod2", "client"])
def test_session_affinity_pins_a_client_to_one_endpoint(
    packet_lab: Lab, backend: Driven, origin: str, proto: Proto
) -> None:
    """Without affinity 40 probes over 3 endpoints all land on one with P = 3 * 3**-40."""
    port = service_port("sticky", proto, session_affinity_seconds=600)
    eps = endpoints(packet_lab, proto, ["pod0", "pod1", "pod2"])
    backend.sync(state(categorized(port, eps)), FULL)
    replies = answers(packet_lab, origin, VIP, SERVICE_PORT[proto], proto, REQUESTS)
    assert len(pods_of(replies)) == 1, Counter(reply.pod for reply in replies)


@pytest.mark.feature("session-affinity")
def test_session_affinity_expires_after_its_timeout(packet_lab: Lab, backend: Driven) -> None:
    """timeoutSeconds 1: probes 1.3 s apart each find the entry expired and choose
    afresh; had the timeout been ignored all 11 would land on one endpoint, which
    random choices do with P = 3**-10 (about 2e-5)."""
    port = service_port("sticky", "tcp", session_affinity_seconds=1)
    eps = endpoints(packet_lab, "tcp", ["pod0", "pod1", "pod2"])
    backend.sync(state(categorized(port, eps)), FULL)
    seen: list[str] = []
    for _ in range(11):
        seen.extend(r.pod for r in answers(packet_lab, "client", VIP, 80, "tcp", 1))
        time.sleep(1.3)
    assert len(set(seen)) > 1, seen


@pytest.mark.feature("session-affinity")
def test_without_affinity_the_same_client_spreads(packet_lab: Lab, backend: Driven) -> None:
    """The control for the test above: the same service minus affinity spreads."""
    port = service_port("sticky", "tcp")
    backend.sync(state(categorized(port, endpoints(packet_lab, "tcp", ["pod0", "pod1"]))), FULL)
    seen = spread(packet_lab.topo.client_ns, VIP, SERVICE_PORT["tcp"], "tcp", REQUESTS)
    assert set(seen) == {"pod0", "pod1"}, seen


# ---------------------------------------------------------------- externalTrafficPolicy


def external_local(lab: Lab, proto: Proto, local: Sequence[str]) -> ServicePortState:
    """NodePort + external IP + LB IP, externalTrafficPolicy Local, the other pods remote."""
    port = service_port(
        "etp",
        proto,
        node_port=NODE_PORT[proto],
        external_ips=(EXTERNAL_IP,),
        load_balancer_ips=(LB_IP,),
        external_policy_local=True,
    )
    remote = [pod for pod in ("pod0", "pod1", "pod2") if pod not in local]
    return categorized(port, endpoints(lab, proto, local, remote))


def external_destinations(proto: Proto) -> list[tuple[str, int]]:
    return [
        (NODE_IP, NODE_PORT[proto]),
        (EXTERNAL_IP, SERVICE_PORT[proto]),
        (LB_IP, SERVICE_PORT[proto]),
    ]


@pytest.mark.feature("external-traffic-policy-local")
@pytest.mark.parametrize("proto", PROTOS)
def test_external_local_serves_outside_clients_from_local_endpoints_with_their_address(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    backend.sync(state(external_local(packet_lab, proto, ["pod0"])), FULL)
    for dst, port in external_destinations(proto):
        replies = answers(packet_lab, "client", dst, port, proto, 12)
        assert pods_of(replies) == {"pod0"}, (dst, port)
        assert {reply.src_ip for reply in replies} == {CLIENT_IP}, (dst, port)


@pytest.mark.feature("external-traffic-policy-local")
@pytest.mark.parametrize("proto", PROTOS)
def test_external_local_short_circuits_pods_and_the_node_to_every_endpoint(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    backend.sync(state(external_local(packet_lab, proto, ["pod0"])), FULL)
    pod2_ip = packet_lab.pods["pod2"].ip
    for dst, port in external_destinations(proto):
        from_pod = answers(packet_lab, "pod2", dst, port, proto, REQUESTS)
        assert pods_of(from_pod) == {"pod0", "pod1", "pod2"}, (dst, port)
        # Not hairpinned: the pod's own address is kept (short-circuit, no masquerade).
        assert {r.src_ip for r in from_pod if r.pod != "pod2"} == {pod2_ip}, (dst, port)
        from_node = answers(packet_lab, "node", dst, port, proto, REQUESTS)
        assert pods_of(from_node) == {"pod0", "pod1", "pod2"}, (dst, port)
        assert {r.src_ip for r in from_node} <= packet_lab.topo.node_addresses, (dst, port)


@pytest.mark.feature("external-traffic-policy-local")
@pytest.mark.parametrize("proto", PROTOS)
def test_external_local_without_a_local_endpoint_drops_outside_traffic(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    backend.sync(state(external_local(packet_lab, proto, [])), FULL)
    for dst, port in external_destinations(proto):
        dropped(packet_lab, "client", dst, port, proto)
        # Pods still get through (short-circuited to the cluster-wide endpoints).
        assert pods_of(answers(packet_lab, "pod2", dst, port, proto, 6)) <= {"pod0", "pod1", "pod2"}


@pytest.mark.feature("external-traffic-policy-local")
@pytest.mark.parametrize("proto", PROTOS)
def test_both_policies_local_still_short_circuit_pods_to_every_endpoint(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    """internalTrafficPolicy Local as well: the ClusterIP and outside clients use pod0
    only, while pods reaching the external addresses get the cluster-wide set."""
    port = service_port(
        "both",
        proto,
        node_port=NODE_PORT[proto],
        load_balancer_ips=(LB_IP,),
        external_policy_local=True,
        internal_policy_local=True,
    )
    backend.sync(
        state(categorized(port, endpoints(packet_lab, proto, ["pod0"], ["pod1", "pod2"]))), FULL
    )
    assert pods_of(answers(packet_lab, "pod2", VIP, SERVICE_PORT[proto], proto, 12)) == {"pod0"}
    assert pods_of(answers(packet_lab, "client", LB_IP, SERVICE_PORT[proto], proto, 12)) == {"pod0"}
    from_pod = answers(packet_lab, "pod2", LB_IP, SERVICE_PORT[proto], proto, REQUESTS)
    assert pods_of(from_pod) == {"pod0", "pod1", "pod2"}


# ---------------------------------------------------------------- internalTrafficPolicy


@pytest.mark.feature("internal-traffic-policy-local")
@pytest.mark.parametrize("proto", PROTOS)
def test_internal_local_uses_only_local_endpoints(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    port = service_port("itp", proto, internal_policy_local=True)
    eps = endpoints(packet_lab, proto, ["pod0"], ["pod1", "pod2"])
    backend.sync(state(categorized(port, eps)), FULL)
    replies = answers(packet_lab, "pod2", VIP, SERVICE_PORT[proto], proto, REQUESTS)
    assert pods_of(replies) == {"pod0"}


@pytest.mark.feature("internal-traffic-policy-local")
@pytest.mark.parametrize("proto", PROTOS)
def test_internal_local_without_a_local_endpoint_drops_not_rejects(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    port = service_port("itp", proto, internal_policy_local=True)
    backend.sync(state(categorized(port, endpoints(packet_lab, proto, [], ["pod1"]))), FULL)
    dropped(packet_lab, "pod2", VIP, SERVICE_PORT[proto], proto)
    # The same service with no endpoint anywhere is rejected: the two are told apart.
    backend.sync(state(categorized(port, [])), SyncHint(full=False, changed=frozenset({port.name})))
    result = probe(packet_lab.pods["pod2"].netns, VIP, SERVICE_PORT[proto], proto, timeout=2.0)
    assert result == ProbeFailure("refused", "Connection refused"), result


# ---------------------------------------------------------------- LoadBalancer


def lb_service_json(proto: Proto, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "features", "name": "lb"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": VIP,
            "ports": [
                {
                    "name": proto,
                    "port": SERVICE_PORT[proto],
                    "protocol": proto.upper(),
                    "nodePort": NODE_PORT[proto],
                }
            ],
            **spec,
        },
        "status": {
            "loadBalancer": {
                "ingress": [
                    {"ip": LB_IP, "ipMode": "VIP"},
                    {"ip": PROXY_MODE_LB_IP, "ipMode": "Proxy"},
                    {"hostname": "lb.example.test"},
                ]
            }
        },
    }


def parsed_port(raw: dict[str, Any]) -> ServicePort:
    parsed = parse_service(raw)
    assert isinstance(parsed, ServiceInfo)
    (port,) = parsed.ports
    return port


@pytest.mark.feature("load-balancer-ip")
@pytest.mark.parametrize("proto", PROTOS)
def test_load_balancer_ip_spreads_and_proxy_mode_ingress_is_left_alone(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    port = parsed_port(lb_service_json(proto))
    assert port.load_balancer_ips == (LB_IP,)
    backend.sync(
        state(categorized(port, endpoints(packet_lab, proto, ["pod0", "pod1", "pod2"]))), FULL
    )
    for origin in ("client", "pod2", "node"):
        replies = answers(packet_lab, origin, LB_IP, SERVICE_PORT[proto], proto, REQUESTS)
        assert pods_of(replies) == {"pod0", "pod1", "pod2"}, origin
    outside = answers(packet_lab, "client", LB_IP, SERVICE_PORT[proto], proto, 10)
    assert {r.src_ip for r in outside} <= packet_lab.topo.node_addresses  # Cluster: masqueraded
    # ipMode Proxy: the load balancer itself delivers to the nodes; no rule for that IP.
    result = probe(
        packet_lab.topo.client_ns, PROXY_MODE_LB_IP, SERVICE_PORT[proto], proto, timeout=QUICK
    )
    assert isinstance(result, ProbeFailure), result


@pytest.mark.feature("load-balancer-source-ranges")
@pytest.mark.parametrize("proto", PROTOS)
def test_source_ranges_admit_listed_sources_and_the_node_and_drop_the_rest(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    ranges = [f"{CLIENT_IP}/32", f"{NODE_IP}/32"]
    port = parsed_port(lb_service_json(proto, loadBalancerSourceRanges=ranges))
    backend.sync(state(categorized(port, endpoints(packet_lab, proto, ["pod0", "pod1"]))), FULL)
    assert pods_of(answers(packet_lab, "client", LB_IP, SERVICE_PORT[proto], proto, 6)) <= {
        "pod0",
        "pod1",
    }
    assert pods_of(answers(packet_lab, "node", LB_IP, SERVICE_PORT[proto], proto, 6)) <= {
        "pod0",
        "pod1",
    }
    dropped(packet_lab, "pod2", LB_IP, SERVICE_PORT[proto], proto)
    # The ranges guard the LB IP only: the ClusterIP and the NodePort stay open.
    assert answers(packet_lab, "pod2", VIP, SERVICE_PORT[proto], proto, 3)
    assert answers(packet_lab, "client", NODE_IP, NODE_PORT[proto], proto, 3)


@pytest.mark.feature("load-balancer-source-ranges")
@pytest.mark.parametrize("proto", PROTOS)
def test_source_ranges_without_the_client_or_the_node_drop_both(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    open_port = parsed_port(lb_service_json(proto))
    eps = endpoints(packet_lab, proto, ["pod0"])
    backend.sync(state(categorized(open_port, eps)), FULL)
    for origin in ("client", "node"):  # without ranges both get in: the drops below are the ranges'
        assert pods_of(answers(packet_lab, origin, LB_IP, SERVICE_PORT[proto], proto, 3)) == {
            "pod0"
        }
    port = parsed_port(lb_service_json(proto, loadBalancerSourceRanges=["198.18.250.0/24"]))
    backend.sync(
        state(categorized(port, eps)), SyncHint(full=False, changed=frozenset({port.name}))
    )
    dropped(packet_lab, "client", LB_IP, SERVICE_PORT[proto], proto)
    dropped(packet_lab, "node", LB_IP, SERVICE_PORT[proto], proto)


# ---------------------------------------------------------------- externalIPs


@pytest.mark.feature("external-ips")
@pytest.mark.parametrize("proto", PROTOS)
def test_external_ip_spreads_and_masquerades_with_cluster_policy(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    port = service_port("eip", proto, external_ips=(EXTERNAL_IP,))
    backend.sync(
        state(categorized(port, endpoints(packet_lab, proto, ["pod0", "pod1", "pod2"]))), FULL
    )
    for origin in ("client", "pod2", "node"):
        replies = answers(packet_lab, origin, EXTERNAL_IP, SERVICE_PORT[proto], proto, REQUESTS)
        assert pods_of(replies) == {"pod0", "pod1", "pod2"}, origin
        if origin == "client":
            assert {r.src_ip for r in replies} <= packet_lab.topo.node_addresses


@pytest.mark.feature("external-ips")
@pytest.mark.parametrize("proto", PROTOS)
def test_external_ip_with_local_policy_keeps_the_client_on_the_local_endpoint(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    port = service_port("eip", proto, external_ips=(EXTERNAL_IP,), external_policy_local=True)
    eps = endpoints(packet_lab, proto, ["pod1"], ["pod0", "pod2"])
    backend.sync(state(categorized(port, eps)), FULL)
    replies = answers(packet_lab, "client", EXTERNAL_IP, SERVICE_PORT[proto], proto, 12)
    assert pods_of(replies) == {"pod1"}
    assert {r.src_ip for r in replies} == {CLIENT_IP}


# ---------------------------------------------------------------- localhost NodePorts


@pytest.mark.feature("localhost-nodeports")
@pytest.mark.parametrize("proto", PROTOS)
def test_node_ports_answer_on_localhost_from_the_node(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    port = service_port("lo", proto, node_port=NODE_PORT[proto])
    backend.sync(state(categorized(port, endpoints(packet_lab, proto, ["pod0", "pod1"]))), FULL)
    replies = answers(packet_lab, "node", "127.0.0.1", NODE_PORT[proto], proto, REQUESTS)
    assert pods_of(replies) == {"pod0", "pod1"}
    assert {r.src_ip for r in replies} <= packet_lab.topo.node_addresses  # never 127.0.0.1
    sysctl = "/proc/sys/net/ipv4/conf/all/route_localnet"
    assert packet_lab.topo.run_in(packet_lab.topo.node_ns, ["cat", sysctl]).stdout.strip() == "1"


# ---------------------------------------------------------------- SCTP

# This kernel may have netfilter's SCTP support (conntrack, the sctp match) without SCTP
# sockets (CONFIG_IP_SCTP). The probe then crafts the first packet of an association
# (an INIT chunk) on a raw socket and catches it on raw sockets in the endpoint pods:
# which pod received it, from which source, on which port, is exactly what the rules
# decided. Only a kernel without netfilter SCTP makes the test skip.

SCTP = 132
_SCTP_INIT = 1


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def sctp_init(sport: int, dport: int, tag: int) -> bytes:
    """An SCTP packet holding one INIT chunk, checksummed (RFC 9260, CRC32c little-endian)."""
    chunk = struct.pack("!BBHIIHHI", _SCTP_INIT, 0, 20, tag, 65536, 10, 10, tag)
    header = struct.pack("!HHII", sport, dport, 0, 0)
    packet = header + chunk
    checksum = struct.pack("<I", crc32c(packet))
    return packet[:8] + checksum + packet[12:]


@dataclass(frozen=True, slots=True)
class SctpSeen:
    pod: str
    src_ip: str
    dport: int


def _sctp_receivers(lab: Lab) -> dict[str, socket.socket]:
    return {
        name: run_in_netns(pod.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, SCTP))
        for name, pod in lab.pods.items()
    }


def sctp_probe(
    lab: Lab, origin: str, dst: str, dport: int, *, timeout: float = 1.0
) -> SctpSeen | None:
    """Send one INIT from `origin`; the pod that got it, or None when none did in time."""
    sport = 20000 + secrets.randbelow(20000)
    # The INIT's initiate tag names the probe: masquerade (hairpin) rewrites the port.
    tag = secrets.randbits(31) | 1
    receivers = _sctp_receivers(lab)
    try:
        sender = run_in_netns(
            origin_ns(lab, origin), lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, SCTP)
        )
        with sender:
            sender.sendto(sctp_init(sport, dport, tag), (dst, 0))
        deadline = time.monotonic() + timeout
        names = {sock.fileno(): name for name, sock in receivers.items()}
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(receivers.values()), [], [], left)
            for sock in ready:
                data = sock.recv(65535)
                ihl = (data[0] & 0x0F) * 4
                _, got_dport = struct.unpack("!HH", data[ihl : ihl + 4])
                (got_tag,) = struct.unpack("!I", data[ihl + 16 : ihl + 20])
                if got_tag == tag:  # ours, not a stray one
                    return SctpSeen(names[sock.fileno()], socket.inet_ntoa(data[12:16]), got_dport)
        return None
    finally:
        for sock in receivers.values():
            sock.close()


def _netfilter_sctp_or_skip() -> None:
    """Skip, naming why, only when this kernel can neither speak nor track SCTP."""
    if os.path.exists("/proc/net/sctp"):
        return  # SCTP sockets, hence netfilter SCTP as well
    try:
        config = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return  # cannot tell: try, and let the packets decide
    if "CONFIG_NF_CT_PROTO_SCTP=y" not in config:
        pytest.skip(
            "kernel without SCTP: no /proc/net/sctp and no CONFIG_NF_CT_PROTO_SCTP "
            "(modprobe sctp first where it is a module)"
        )


@pytest.mark.feature("sctp")
def test_sctp_cluster_ip_and_node_port_reach_every_endpoint(
    packet_lab: Lab, backend: Driven
) -> None:
    _netfilter_sctp_or_skip()
    name = ServicePortName(ServiceKey("features", "sctp"), "sctp", Protocol.SCTP)
    port = ServicePort(name=name, cluster_ips=(VIP,), port=9, node_port=30109)
    ips = packet_lab.pod_ips()
    eps = [
        Endpoint(ips[p], 7777, node_name=NODE_NAME, is_local=True) for p in ("pod0", "pod1", "pod2")
    ]
    backend.sync(state(categorized(port, eps)), FULL)
    for origin, dst, dport in [("pod2", VIP, 9), ("client", VIP, 9), ("client", NODE_IP, 30109)]:
        seen: list[SctpSeen] = []
        for _ in range(REQUESTS):
            got = sctp_probe(packet_lab, origin, dst, dport)
            assert got is not None, (origin, dst, dport)
            seen.append(got)
        assert {s.pod for s in seen} == {"pod0", "pod1", "pod2"}, (origin, dst)
        assert {s.dport for s in seen} == {7777}
        if origin == "client":
            assert {s.src_ip for s in seen} <= packet_lab.topo.node_addresses
    # An SCTP service without endpoints: nothing gets through.
    backend.sync(state(categorized(port, [])), SyncHint(full=False, changed=frozenset({name})))
    assert sctp_probe(packet_lab, "pod2", VIP, 9, timeout=QUICK) is None


# ---------------------------------------------------------------- IPV6 (dual-stack)

# A dual-stack node runs one backend per family (`proxy.app.family_backends`); here the
# IPv6 one, on the lab's IPv6 plan (2001:2::/48, see lab.netns), with a dual-stack
# service whose IPv4 half this backend must ignore.

VIP6 = "2001:2:0:ff::10"
EMPTY_VIP6 = "2001:2:0:ff::20"


@pytest.fixture
def backend6(packet_lab: Lab, backend_variant: BackendVariant) -> Iterator[Driven]:
    config = replace(backend_variant.config(packet_lab.topo.node_ns), family=IPFamily.V6)
    made = Driven(create_backend(backend_variant.backend, config))
    yield made
    made.cleanup()


def dual_stack_state(lab: Lab, proto: Proto) -> ProxyState:
    pods = lab.pods
    eps = [
        Endpoint(pods[name].ip6, ECHO_PORT[proto], node_name=NODE_NAME, is_local=True)
        for name in ("pod0", "pod1")
    ] + [Endpoint(pods[name].ip, ECHO_PORT[proto], node_name=NODE_NAME) for name in ("pod0",)]
    web = ServicePort(
        name=port_name("dual", proto),
        cluster_ips=(VIP, VIP6),
        port=SERVICE_PORT[proto],
        node_port=NODE_PORT[proto],
    )
    empty = ServicePort(name=port_name("empty6", proto), cluster_ips=(EMPTY_VIP6,), port=81)
    node = NodeContext(
        node_name=NODE_NAME,
        node_ips=(NODE_IP, lab.topo.node_ip6),
        cluster_cidrs=(CLUSTER_CIDR, CLUSTER_CIDR6),
    )
    ports = (categorized(web, eps), categorized(empty, ()))
    return ProxyState(node=node, services={p.name: p for p in ports})


@pytest.mark.feature("ipv6")
@pytest.mark.parametrize("proto", PROTOS)
def test_ipv6_cluster_ip_and_node_port_spread_over_the_ipv6_endpoints(
    packet_lab: Lab, backend6: Driven, proto: Proto
) -> None:
    backend6.sync(dual_stack_state(packet_lab, proto), FULL)
    topo = packet_lab.topo
    from_pod = answers(packet_lab, "pod2", VIP6, SERVICE_PORT[proto], proto, REQUESTS)
    assert pods_of(from_pod) == {"pod0", "pod1"}
    assert {r.src_ip for r in from_pod} == {packet_lab.pods["pod2"].ip6}  # inside: kept
    from_client = answers(packet_lab, "client", VIP6, SERVICE_PORT[proto], proto, REQUESTS)
    assert pods_of(from_client) == {"pod0", "pod1"}
    assert topo.client_ip6 not in {r.src_ip for r in from_client}  # outside: masqueraded
    node_port = answers(packet_lab, "client", topo.node_ip6, NODE_PORT[proto], proto, REQUESTS)
    assert pods_of(node_port) == {"pod0", "pod1"}


@pytest.mark.feature("ipv6")
def test_ipv6_service_without_endpoints_is_rejected(packet_lab: Lab, backend6: Driven) -> None:
    backend6.sync(dual_stack_state(packet_lab, "tcp"), FULL)
    # Over veth the ICMPv6 error can come back while connect() still holds the socket
    # lock, and the kernel drops it; the SYN retransmitted after 1 s is then refused.
    result = probe(packet_lab.topo.client_ns, EMPTY_VIP6, 81, "tcp", timeout=2.5)
    assert result == ProbeFailure("refused", "Connection refused"), result


# ---------------------------------------------------------------- stale UDP conntrack

# The cleanup is the core's (`proxy.conntrack`, after any backend's committed sync);
# these tests run it after this backend's sync, as the proxier's after-sync hook does,
# and prove with one UDP socket pinned to a source port that its flow moves.


class PinnedUdp:
    """A UDP socket in `netns` with one source port for its whole life."""

    _ports = iter(range(19101, 19199))

    def __init__(self, netns: str, dst: str, port: int) -> None:
        self.sock = run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.sock.bind(("0.0.0.0", next(self._ports)))
        self.sock.settimeout(QUICK)
        self.sock.connect((dst, port))

    def answered_by(self) -> str | None:
        try:
            self.sock.send(b"probe\n")
            data = self.sock.recv(4096)
        except OSError:
            return None
        return EchoReply.parse(data.decode()).pod

    def close(self) -> None:
        self.sock.close()


def clean_stale_flows(
    lab: Lab,
    synced: ProxyState,
    hint: SyncHint,
    previous: dict[ServicePortName, ServicePortState],
) -> None:
    """What the proxier's after-sync hook does for this family once the rules are in."""
    cleaner = StaleFlowCleaner(NetlinkConntrack(lab.topo.node_ns), _NoCleanupMetrics())
    cleaner.after_sync(synced, SyncHint(hint.full, hint.changed, previous, hint.node_changed))


class _NoCleanupMetrics:
    def count_conntrack_deleted(self, family: IPFamily, count: int) -> None:
        pass

    def observe_conntrack_cleanup(self, family: IPFamily, seconds: float) -> None:
        pass

    def count_conntrack_failure(self) -> None:
        pass


@pytest.mark.feature("stale-udp-conntrack")
def test_a_pinned_udp_flow_moves_off_a_removed_endpoint(packet_lab: Lab, backend: Driven) -> None:
    port = service_port("dns", "udp")
    before = state(categorized(port, endpoints(packet_lab, "udp", ["pod0", "pod1"])))
    backend.sync(before, FULL)
    flow = PinnedUdp(packet_lab.pods["pod2"].netns, VIP, SERVICE_PORT["udp"])
    try:
        first = flow.answered_by()
        assert first in {"pod0", "pod1"}
        assert {flow.answered_by() for _ in range(5)} == {first}  # conntrack pins it
        kept = "pod1" if first == "pod0" else "pod0"
        after = state(categorized(port, endpoints(packet_lab, "udp", [kept])))
        hint = SyncHint(full=False, changed=frozenset({port.name}))
        previous = dict(backend.synced)
        backend.sync(after, hint)
        # The removed endpoint still runs: without the cleanup the flow would stay on it.
        assert flow.answered_by() == first
        clean_stale_flows(packet_lab, after, hint, previous)
        assert flow.answered_by() == kept
    finally:
        flow.close()


@pytest.mark.feature("stale-udp-conntrack")
def test_a_udp_flow_cached_before_the_service_existed_reaches_its_first_endpoint(
    packet_lab: Lab, backend: Driven
) -> None:
    """Datagrams sent to a VIP before any rule exists for it are routed like any other
    address, and conntrack remembers that flow without NAT: without the cleanup, the
    same source port would never reach the service (a REJECTed first packet is not a
    problem: it is dropped before conntrack confirms its flow)."""
    port = service_port("dns0", "udp")
    backend.sync(state(), FULL)
    flow = PinnedUdp(packet_lab.pods["pod2"].netns, VIP, SERVICE_PORT["udp"])
    try:
        assert flow.answered_by() is None  # no service yet: nobody answers
        after = state(categorized(port, endpoints(packet_lab, "udp", ["pod0"])))
        hint = SyncHint(full=False, changed=frozenset({port.name}))
        previous = dict(backend.synced)
        backend.sync(after, hint)
        clean_stale_flows(packet_lab, after, hint, previous)
        assert flow.answered_by() == "pod0"
    finally:
        flow.close()


# ---------------------------------------------------------------- nodePortAddresses


@pytest.mark.feature("nodeport-addresses")
@pytest.mark.parametrize("allowed", [(), ("198.18.0.0/24",), ("primary",)])
def test_node_ports_open_only_on_the_addresses_node_port_addresses_allows(
    packet_lab: Lab, backend: Driven, allowed: tuple[str, ...]
) -> None:
    """The node has two addresses: its uplink's (198.18.0.2, its Node address) and the pod
    gateway on every pod veth (198.18.64.1). Unset, NodePorts answer on both; a CIDR or
    "primary" (the Node's first address of the family) leaves the gateway out."""
    port = service_port("np", "tcp", node_port=NODE_PORT["tcp"])
    node = NodeContext(
        node_name=NODE_NAME,
        node_ips=(NODE_IP,),
        cluster_cidrs=(CLUSTER_CIDR,),
        nodeport_addresses=allowed,
    )
    desired = categorized(port, endpoints(packet_lab, "tcp", ["pod0", "pod1"]))
    backend.sync(ProxyState(node=node, services={port.name: desired}), FULL)
    on_node_ip = answers(packet_lab, "client", NODE_IP, NODE_PORT["tcp"], "tcp", REQUESTS)
    assert pods_of(on_node_ip) == {"pod0", "pod1"}
    gateway = packet_lab.topo.pod_gateway_ip
    result = probe(packet_lab.pods["pod2"].netns, gateway, NODE_PORT["tcp"], "tcp", timeout=QUICK)
    if allowed:
        assert result == ProbeFailure("refused", "Connection refused"), result  # nobody listens
    else:
        assert isinstance(result, EchoReply) and result.pod in {"pod0", "pod1"}, result
