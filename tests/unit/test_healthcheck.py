"""healthCheckNodePort servers: real sockets on loopback, driven as the proxier does."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterable, Iterator
from types import MappingProxyType

import pytest

from proxy.healthcheck import ServiceHealthServers, health_body, listen_addresses, wanted
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

LOOPBACK = NodeContext("n1", ("127.0.0.1",), nodeport_addresses=("127.0.0.0/8",))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def local_state(
    service: str,
    health_port: int,
    endpoints: Iterable[Endpoint] = (),
    *,
    port_name: str = "http",
    local_policy: bool = True,
) -> ServicePortState:
    eps = tuple(endpoints)
    return ServicePortState(
        port=ServicePort(
            name=ServicePortName(ServiceKey("ns", service), port_name, Protocol.TCP),
            cluster_ips=("198.19.0.10",),
            port=80,
            node_port=30080,
            external_policy_local=local_policy,
            health_check_node_port=health_port if local_policy else 0,
        ),
        cluster_endpoints=eps,
        external_endpoints=tuple(e for e in eps if e.is_local),
        all_endpoints=eps,
    )


def ep(ip: str, *, local: bool = True, ready: bool = True) -> Endpoint:
    return Endpoint(ip=ip, port=8080, ready=ready, is_local=local)


class Recorder:
    def __init__(self) -> None:
        self.failures = 0
        self.open = -1

    def count_service_health_failure(self) -> None:
        self.failures += 1

    def set_service_health_servers(self, count: int) -> None:
        self.open = count


class Driver:
    """Hands the servers what a proxier would after each sync."""

    def __init__(self, servers: ServiceHealthServers, node: NodeContext = LOOPBACK) -> None:
        self.servers = servers
        self.node = node
        self.state: dict[ServicePortName, ServicePortState] = {}

    def sync(self, *ports: ServicePortState, removed: Iterable[ServicePortName] = ()) -> None:
        changed = {p.name for p in ports} | set(removed)
        for name in removed:
            self.state.pop(name, None)
        self.state.update({p.name: p for p in ports})
        state = ProxyState(node=self.node, services=MappingProxyType(self.state))
        self.servers.after_sync(state, SyncHint(full=False, changed=frozenset(changed)))


@pytest.fixture
def made() -> Iterator[tuple[ServiceHealthServers, Recorder, list[bool]]]:
    healthy = [True]
    metrics = Recorder()
    servers = ServiceHealthServers(proxy_healthy=lambda: healthy[0], metrics=metrics)
    yield servers, metrics, healthy
    servers.close()


def get(port: int, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_the_body_is_upstreams_byte_for_byte() -> None:
    assert health_body(ServiceKey("ns", "web"), 2, True) == (
        b'{\n\t"service": {\n\t\t"namespace": "ns",\n\t\t"name": "web"\n\t},\n'
        b'\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}'
    )


def test_local_endpoints_are_ready_local_ones_counted_once_per_address() -> None:
    http_port = local_state("web", 31000, [ep("198.18.64.1"), ep("198.18.64.2", local=False)])
    dns_port = local_state(
        "web", 31000, [ep("198.18.64.1"), ep("198.18.64.3", ready=False)], port_name="dns"
    )
    assert wanted([http_port, dns_port]) == (31000, 1)
    assert wanted([local_state("web", 31000, local_policy=False)]) == (0, 0)


def test_listen_addresses_follow_node_port_addresses() -> None:
    single = NodeContext("n1", ("198.18.0.2", "198.18.1.2"))
    assert listen_addresses(single) == ("0.0.0.0",)
    node = NodeContext("n1", ("198.18.0.2", "198.18.1.2", "2001:2::2", "2001:2::3"))
    assert listen_addresses(node) == ("::",)  # dual-stack: :: takes IPv4 too
    narrowed = NodeContext(
        "n1", node.node_ips, nodeport_addresses=("198.18.1.0/24", "2001:2::3/128")
    )
    assert listen_addresses(narrowed) == ("198.18.1.2", "2001:2::3")
    primary = NodeContext("n1", node.node_ips, nodeport_addresses=("primary",))
    assert listen_addresses(primary) == ("198.18.0.2", "2001:2::2")  # first of each family
    everything = NodeContext("n1", node.node_ips, nodeport_addresses=("0.0.0.0/0",))
    assert listen_addresses(everything) == ("::",)


def test_503_without_local_endpoints_200_with_and_503_when_the_proxy_is_unhealthy(
    made: tuple[ServiceHealthServers, Recorder, list[bool]],
) -> None:
    servers, metrics, healthy = made
    port = free_port()
    driver = Driver(servers)
    driver.sync(local_state("web", port, [ep("198.18.64.1", local=False)]))
    code, headers, body = get(port, "/any/path")
    assert code == 503
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b'"localEndpoints": 0' in body
    driver.sync(local_state("web", port, [ep("198.18.64.1")]))
    assert get(port)[0] == 200
    healthy[0] = False
    code, _, body = get(port)
    assert code == 503
    assert b'"serviceProxyHealthy": false' in body
    assert metrics.open == 1


def test_servers_close_when_the_service_goes_and_move_with_its_port(
    made: tuple[ServiceHealthServers, Recorder, list[bool]],
) -> None:
    servers, metrics, _ = made
    first, second = free_port(), free_port()
    driver = Driver(servers)
    web = local_state("web", first, [ep("198.18.64.1")])
    driver.sync(web)
    assert get(first)[0] == 200
    driver.sync(local_state("web", second, [ep("198.18.64.1")]))
    assert get(second)[0] == 200
    with pytest.raises(ConnectionRefusedError):
        get(first)
    driver.sync(removed=[web.name])
    with pytest.raises(ConnectionRefusedError):
        get(second)
    assert servers.ports() == {}
    assert metrics.open == 0


def test_a_port_in_use_is_logged_with_the_service_counted_and_retried(
    made: tuple[ServiceHealthServers, Recorder, list[bool]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    servers, metrics, _ = made
    taken, fine = free_port(), free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", taken))
    blocker.listen()
    driver = Driver(servers)
    try:
        driver.sync(
            local_state("blocked", taken, [ep("198.18.64.1")]),
            local_state("web", fine, [ep("198.18.64.2")]),
        )
        assert metrics.failures == 1
        assert "ns/blocked" in caplog.text
        assert get(fine)[0] == 200  # the others keep working
        assert set(servers.ports()) == {ServiceKey("ns", "web")}
    finally:
        blocker.close()
    # Once the port is free, the next sync (about anything) opens it.
    driver.sync(local_state("web", fine, [ep("198.18.64.2"), ep("198.18.64.3")]))
    assert get(taken)[0] == 200
    assert metrics.open == 2


def test_a_change_of_node_addresses_reopens_the_servers_there(
    made: tuple[ServiceHealthServers, Recorder, list[bool]],
) -> None:
    servers, _, _ = made
    port = free_port()
    node = NodeContext("n1", ("127.0.0.2",), nodeport_addresses=("127.0.0.0/8",))
    driver = Driver(servers, node)
    driver.sync(local_state("web", port, [ep("198.18.64.1")]))
    with pytest.raises(ConnectionRefusedError):
        get(port)  # listening on 127.0.0.2 only
    driver.node = LOOPBACK
    driver.sync()
    assert get(port)[0] == 200
