"""Stale UDP conntrack cleanup and healthCheckNodePort servers, in the real proxy process.

The proxy runs in the lab's node namespace against the lab API; every change goes
through the API, the EndpointSlice writer, the proxy's watch, a sync, then the
after-sync cleanup. Each UDP test keeps ONE socket with a fixed source port for its
whole life: conntrack pins such a flow to the endpoint its first datagram reached, so
only the cleanup can move it. Without the cleanup each wait below times out (the
datagrams sent while waiting keep the stale flow alive), so these tests fail if the
cleanup is missing or deletes the wrong flows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from lab.cluster import NAMESPACE, LabCluster
from lab.probe import EchoReply, ProbeFailure, probe, socket_in
from lab.slicewriter import LabPod

pytestmark = pytest.mark.e2e

SEND_TIMEOUT = 0.3
FIXED_PORTS = iter(range(19001, 19100))
"""Source ports for the pinned flows, one per flow: below both `lab.probe`'s cycle
(20000-31999) and the kernel's ephemeral range, so no other socket can hold one."""


@pytest.fixture(scope="module")
def lab() -> Iterator[LabCluster]:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("end-to-end tests must run as root on CI")
        pytest.skip("end-to-end tests need root (network namespaces, iptables)")
    cluster = LabCluster.start(bookmark_interval=2.0)
    try:
        cluster.add_pod("client", {"app": "client"})
        cluster.start_proxy("--iptables-min-sync-period=100ms", "--iptables-sync-period=30s")
        cluster.wait_proxy_ready()
        yield cluster
    finally:
        log = cluster.proxy_log.read_text(errors="replace") if cluster.proxy_log.exists() else ""
        cluster.close()
        print("---- proxy log (tail) ----\n" + "\n".join(log.splitlines()[-40:]))


class PinnedFlow:
    """A UDP socket in `netns` with a fixed source port, connected to `dst:port`."""

    def __init__(self, netns: str, dst: str, port: int) -> None:
        self.sock = socket_in(netns, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", next(FIXED_PORTS)))
        self.sock.settimeout(SEND_TIMEOUT)
        self.sock.connect((dst, port))

    def send(self) -> EchoReply | ProbeFailure:
        """One datagram; the echo's answer, or why none came."""
        try:
            with contextlib.suppress(PermissionError):  # an OUTPUT verdict in netns
                self.sock.send(b"probe\n")
            data = self.sock.recv(4096)
        except TimeoutError:
            return ProbeFailure("timeout")
        except ConnectionRefusedError:
            return ProbeFailure("refused")
        return EchoReply.parse(data.decode())

    def answered_by(self) -> str | None:
        reply = self.send()
        return reply.pod if isinstance(reply, EchoReply) else None

    def close(self) -> None:
        self.sock.close()


def udp_service(lab: LabCluster, name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"}],
            **spec,
        },
    }
    return lab.api.create("services", body, namespace=NAMESPACE)


def stale_flows_deleted(lab: LabCluster) -> float:
    return lab.metrics().get("kubeproxy_conntrack_reconciler_deleted_entries_total", 0.0)


def move_off_an_endpoint(
    lab: LabCluster, netns: str, dst: str, port: int, pods: dict[str, LabPod], *, delete: bool
) -> None:
    """The flow's endpoint goes (`delete`) or stops being ready (it still answers if
    reached); the SAME source port then reaches the one left.

    The pinned flow starts only once the service answers (probes from fresh source
    ports), so its first datagram is DNATed to an endpoint: this checks the cleanup of
    a removed endpoint alone, not the one of a flow cached before the rules existed.
    """
    lab.wait_for(
        "the service to answer",
        lambda: isinstance(probe(netns, dst, port, "udp", timeout=SEND_TIMEOUT), EchoReply),
    )
    flow = PinnedFlow(netns, dst, port)
    try:
        _move(lab, flow, pods, delete=delete)
    finally:
        flow.close()


def _move(lab: LabCluster, flow: PinnedFlow, pods: dict[str, LabPod], *, delete: bool) -> None:
    first = flow.answered_by()
    assert first in pods
    # Pinned: the same source port keeps reaching the same endpoint.
    assert {flow.answered_by() for _ in range(5)} == {first}
    deleted_before = stale_flows_deleted(lab)
    if delete:
        lab.remove_pod(first)
    else:
        # Not ready (nor serving): out of the slice's usable endpoints, still alive.
        lab.writer.set_pod(dataclasses.replace(pods[first], ready=False))
    (left,) = [pod for pod in pods if pod != first]
    lab.wait_for(
        f"the pinned flow to move from {first} to {left}",
        lambda: flow.answered_by() == left,
        timeout=15,
    )
    assert stale_flows_deleted(lab) > deleted_before


def test_a_pinned_clusterip_flow_moves_off_a_removed_endpoint(lab: LabCluster) -> None:
    pods = {name: lab.add_pod(name, {"app": "dnsa"}) for name in ("dnsa-1", "dnsa-2")}
    vip = udp_service(lab, "dnsa")["spec"]["clusterIP"]
    move_off_an_endpoint(lab, lab.topology.pods["client"].netns, vip, 53, pods, delete=True)


def test_a_pinned_nodeport_flow_from_outside_moves_off_an_endpoint_no_longer_ready(
    lab: LabCluster,
) -> None:
    # Not deleted: deleting the pod's link would let the kernel drop the masqueraded
    # flow by itself (masquerade forgets flows through a vanished interface).
    pods = {name: lab.add_pod(name, {"app": "dnsb"}) for name in ("dnsb-1", "dnsb-2")}
    service = udp_service(lab, "dnsb", type="NodePort")
    node_port = service["spec"]["ports"][0]["nodePort"]
    client, node_ip = lab.topology.client_ns, lab.topology.node_ip
    move_off_an_endpoint(lab, client, node_ip, node_port, pods, delete=False)


def test_a_flow_cached_before_a_service_had_endpoints_reaches_its_first_endpoint(
    lab: LabCluster,
) -> None:
    # A datagram to the NodePort before the service exists is delivered to the node
    # itself (nothing listens: refused) and leaves a confirmed, un-NATed flow. The
    # service then appears without endpoints (rejected), then gets one: 0 -> 1.
    node_port = free_node_port(lab)
    flow = PinnedFlow(lab.topology.client_ns, lab.topology.node_ip, node_port)
    try:
        assert isinstance(flow.send(), ProbeFailure)
        udp_service(lab, "dnsc", type="NodePort", ports=[_port(node_port)])
        lab.wait_for("the empty service to be programmed", lambda: _has_port(lab, node_port))
        assert isinstance(flow.send(), ProbeFailure)  # keeps the cached flow alive
        lab.add_pod("dnsc-1", {"app": "dnsc"})
        lab.wait_for(
            "the pinned flow to reach the first endpoint",
            lambda: flow.answered_by() == "dnsc-1",
            timeout=15,
        )
    finally:
        flow.close()


def free_node_port(lab: LabCluster) -> int:
    """A NodePort no service holds yet (the API would refuse a taken one)."""
    services = lab.api.list("services", namespace=NAMESPACE)
    taken = {p.get("nodePort") for svc in services for p in svc["spec"].get("ports", [])}
    return next(port for port in range(31053, 32768) if port not in taken)


def _port(node_port: int) -> dict[str, Any]:
    return {
        "name": "dns",
        "port": 53,
        "protocol": "UDP",
        "targetPort": "dns",
        "nodePort": node_port,
    }


def _has_port(lab: LabCluster, node_port: int) -> bool:
    rules = lab.topology.run_in(lab.topology.node_ns, ["iptables-save"]).stdout
    rules += lab.topology.run_in(lab.topology.node_ns, ["iptables-legacy-save"]).stdout
    return f"--dport {node_port}" in rules


# -- healthCheckNodePort -----------------------------------------------------------------


def http_get_from_client(
    lab: LabCluster, port: int, *, ipv6: bool = False
) -> tuple[int, dict[str, str], str]:
    """GET / on the node's address from the client namespace: (status, headers, body)."""
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    node_ip = lab.topology.node_ip6 if ipv6 else lab.topology.node_ip
    with socket_in(lab.topology.client_ns, socket.SOCK_STREAM, family) as sock:
        sock.settimeout(2.0)
        sock.connect((node_ip, port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: lb-probe\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).decode().partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def test_health_check_node_port_answers_for_a_local_service(lab: LabCluster) -> None:
    service = lab.api.create(
        "services",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "lb", "namespace": NAMESPACE},
            "spec": {
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Local",
                "selector": {"app": "lb"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            },
        },
        namespace=NAMESPACE,
    )
    health_port = service["spec"]["healthCheckNodePort"]

    def answer() -> tuple[int, dict[str, Any]]:
        code, headers, body = http_get_from_client(lab, health_port)
        assert headers["content-type"] == "application/json"
        assert headers["x-content-type-options"] == "nosniff"
        return code, json.loads(body)

    # No endpoint on this node: 503, and the LB should not send traffic here.
    lab.wait_for("the health-check node port to open", lambda: answer()[0] == 503)
    _, body = answer()
    assert body == {
        "service": {"namespace": NAMESPACE, "name": "lb"},
        "localEndpoints": 0,
        "serviceProxyHealthy": True,
    }
    lab.add_pod("lb-1", {"app": "lb"})
    lab.wait_for("200 with a local endpoint", lambda: answer()[0] == 200)
    assert answer()[1]["localEndpoints"] == 1
    # A dual-stack node answers on its IPv6 address too (upstream: a server per family).
    assert http_get_from_client(lab, health_port, ipv6=True)[0] == 200
    lab.remove_pod("lb-1")
    lab.wait_for("503 again without one", lambda: answer()[0] == 503)
    # The service goes: so does its server.
    lab.delete_service("lb")

    def closed() -> bool:
        try:
            http_get_from_client(lab, health_port)
        except ConnectionRefusedError:
            return True
        return False

    lab.wait_for("the health-check node port to close", closed)
