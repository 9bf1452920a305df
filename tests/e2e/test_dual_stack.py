"""Dual-stack: one proxy process programs IPv4 and IPv6, proven by packets of both families.

The lab is dual-stack (`lab.netns`: IPv6 in 2001:2::/48 mirrors the IPv4 plan), its API
allocates a ClusterIP of each family to a `RequireDualStack` Service and its slice
writer publishes one EndpointSlice per family, as the EndpointSlice controller does.
The proxy runs as users run it; the checks are real connections and datagrams from
the client outside the cluster and from a pod, over each family.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lab.cluster import HEALTHZ_PORT, LabCluster
from lab.probe import EchoReply, ProbeFailure, probe, spread

pytestmark = pytest.mark.e2e

APP = {"app": "dual"}
PORTS = [
    {"name": "http", "port": 80, "targetPort": "http"},
    {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"},
]


@pytest.fixture(scope="module")
def lab() -> Iterator[LabCluster]:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("end-to-end tests must run as root on CI")
        pytest.skip("end-to-end tests need root (network namespaces, ip6tables)")
    cluster = LabCluster.start(bookmark_interval=2.0)
    try:
        for index in (1, 2):
            cluster.add_pod(f"dual-{index}", APP)
        cluster.start_proxy("--iptables-min-sync-period=100ms", "--iptables-sync-period=30s")
        yield cluster
    finally:
        log = cluster.proxy_log.read_text(errors="replace") if cluster.proxy_log.exists() else ""
        cluster.close()
        print("---- proxy log (tail) ----\n" + "\n".join(log.splitlines()[-40:]))


def seen_by(lab: LabCluster, netns: str, ip: str, port: int, proto: str, n: int) -> set[str]:
    return set(spread(netns, ip, port, proto, n))  # type: ignore[arg-type]


def test_both_families_of_a_dual_stack_service_answer(lab: LabCluster) -> None:
    lab.wait_proxy_ready()
    service = lab.create_service("dual", APP, PORTS, service_type="NodePort", dual_stack=True)
    v4, v6 = service["spec"]["clusterIPs"]
    assert ":" in v6 and ":" not in v4
    node_port = service["spec"]["ports"][0]["nodePort"]
    client = lab.topology.client_ns
    both = {"dual-1", "dual-2"}
    for ip in (v4, v6):
        lab.wait_for(
            f"TCP to {ip} spreads", lambda ip=ip: seen_by(lab, client, ip, 80, "tcp", 14) == both
        )
        lab.wait_for(
            f"UDP to {ip} spreads", lambda ip=ip: seen_by(lab, client, ip, 53, "udp", 14) == both
        )
    lab.wait_for(
        "the IPv6 NodePort spreads",
        lambda: seen_by(lab, client, lab.topology.node_ip6, node_port, "tcp", 14) == both,
    )
    # From a pod over IPv6: the endpoint sees the pod's own IPv6 address (no masquerade
    # inside the cluster CIDR), and never an IPv4 one.
    pod = lab.topology.pods["dual-1"]
    replies = [probe(pod.netns, v6, 80, "tcp") for _ in range(6)]
    assert all(isinstance(r, EchoReply) for r in replies), replies
    assert {r.src_ip for r in replies if isinstance(r, EchoReply)} <= {
        pod.ip6,
        lab.topology.pod_gateway_ip6,  # hairpin to itself is masqueraded to the gateway
    }
    # From outside over IPv6: the client's address is masqueraded to the node's.
    outside = probe(client, v6, 80, "tcp")
    assert isinstance(outside, EchoReply)
    assert ":" in outside.src_ip and outside.src_ip != lab.topology.client_ip6


def test_an_ipv6_endpoint_change_converges_and_no_endpoints_rejects(lab: LabCluster) -> None:
    lab.wait_proxy_ready()
    service = lab.api.get("services", "dual", namespace="default")
    v6 = service["spec"]["clusterIPs"][1]
    client = lab.topology.client_ns
    lab.add_pod("dual-3", APP)
    lab.wait_for(
        "a new pod joins the IPv6 ClusterIP",
        lambda: seen_by(lab, client, v6, 80, "tcp", 20) == {"dual-1", "dual-2", "dual-3"},
    )
    for name in ("dual-1", "dual-2", "dual-3"):
        lab.remove_pod(name)

    def refused() -> bool:
        # Over veth the ICMPv6 error can come back while connect() still holds the
        # socket lock; the kernel then drops it (TcpExtLockDroppedIcmps) and only the
        # SYN retransmitted after 1 s is refused. Wait long enough for that one.
        result = probe(client, v6, 80, "tcp", timeout=2.5)
        return isinstance(result, ProbeFailure) and result.kind == "refused"

    lab.wait_for("the IPv6 ClusterIP without endpoints is rejected", refused)
    # Health covers both families: 200 means the IPv6 side is in sync too.
    assert lab.http_get(HEALTHZ_PORT, "/healthz")[0] == 200


def test_the_ipv6_rules_are_in_ip6tables_and_the_log_names_both_families(
    lab: LabCluster,
) -> None:
    lab.wait_proxy_ready()
    saved = "".join(
        lab.topology.run_in(lab.topology.node_ns, [tool, "-t", "nat"]).stdout
        for tool in ("ip6tables-nft-save", "ip6tables-legacy-save")
    )
    assert ":KPY-SERVICES" in saved
    assert "families IPv4+IPv6" in lab.proxy_log.read_text(errors="replace")
