"""healthCheckNodePort servers opened in a backend's network namespace (`netns`).

The real proxy runs in the node's namespace and opens them where it is; a backend run
in a namespace (tests, the lab) has them opened there, next to its rules. Checked from
the lab's client, outside the node, and from this process's own namespace, where the
port must not be open.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from types import MappingProxyType

import pytest

from lab.netns import NODE_IP
from lab.probe import socket_in
from proxy.healthcheck import ServiceHealthServers
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
from tests.kernel.conftest import Lab

pytestmark = pytest.mark.kernel


class Recorder:
    def count_service_health_failure(self) -> None:
        raise AssertionError("the health-check node port could not be opened")

    def set_service_health_servers(self, count: int) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def status_from(netns: str | None, ip: str, port: int) -> int:
    sock = socket_in(netns, socket.SOCK_STREAM) if netns else socket.socket()
    with sock:
        sock.settimeout(2.0)
        sock.connect((ip, port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = sock.recv(4096).decode()
    return int(head.split()[1])


def test_servers_open_in_the_backends_namespace(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(("pod0",))
    port = free_port()
    servers = ServiceHealthServers(
        proxy_healthy=lambda: True, metrics=Recorder(), netns=lab.topo.node_ns
    )
    local = Endpoint(ip=lab.pods["pod0"].ip, port=8080, is_local=True)
    state = ServicePortState(
        port=ServicePort(
            name=ServicePortName(ServiceKey("default", "lb"), "http", Protocol.TCP),
            cluster_ips=("198.19.0.40",),
            port=80,
            node_port=30080,
            external_policy_local=True,
            health_check_node_port=port,
        ),
        cluster_endpoints=(local,),
        external_endpoints=(local,),
        all_endpoints=(local,),
    )
    proxy_state = ProxyState(
        node=NodeContext("kpy-node", (NODE_IP,)), services=MappingProxyType({state.name: state})
    )
    try:
        servers.after_sync(proxy_state, SyncHint(full=True, changed=frozenset({state.name})))
        assert status_from(lab.topo.client_ns, NODE_IP, port) == 200
        with pytest.raises(ConnectionRefusedError):
            status_from(None, "127.0.0.1", port)  # not in this process's namespace
    finally:
        servers.close()
