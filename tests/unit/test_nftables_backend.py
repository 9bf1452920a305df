"""The nftables backend against the stateful fake `nft`: packets first, script text second.

Most tests follow a packet through the maps the backend wrote ("198.19.0.10:80/TCP
lands on these endpoints", "that NodePort is rejected"); the rest assert on the
script where *what is written* is the point: a golden full table, a one-endpoint
change that is element operations only, partial syncs ending where a full sync
would, a refused transaction that changes nothing.

Addresses: node 198.18.0.1, pods in the cluster CIDR 198.18.64.0/18, service VIPs in
198.19.0.0/24.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from proxy.backends.base import BackendConfig, BackendError, available, create
from proxy.backends.nftables import render
from proxy.backends.nftables.backend import NftablesBackend, offending_lines
from proxy.kernel.nft import NftProcess, chains_by_table, failed_line
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
from tests.fakes.driver import Driven
from tests.fakes.nft_fake import FakeNft, Trace

NODE_IP = "198.18.0.1"
NODE = NodeContext("node-a", (NODE_IP,), cluster_cidrs=("198.18.64.0/18",))
FULL = SyncHint(full=True)
TABLE = "ip kube-proxy-py"


def name_of(service: str = "web", proto: Protocol = Protocol.TCP) -> ServicePortName:
    return ServicePortName(ServiceKey("shop", service), "http", proto)


def endpoints(*last_octets: int, port: int = 8080, local: bool = True) -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(ip=f"198.18.64.{octet}", port=port, is_local=local) for octet in last_octets
    )


def port_state(
    service: str = "web",
    vip: str = "198.19.0.10",
    eps: Sequence[Endpoint] = (),
    *,
    proto: Protocol = Protocol.TCP,
    node_port: int = 0,
    external: Sequence[Endpoint] | None = None,
    all_endpoints: Sequence[Endpoint] | None = None,
    internal_local: bool = False,
    external_local: bool = False,
    external_ips: tuple[str, ...] = (),
    lb_ips: tuple[str, ...] = (),
) -> ServicePortState:
    port = ServicePort(
        name=name_of(service, proto),
        cluster_ips=(vip,),
        port=80,
        node_port=node_port,
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        internal_policy_local=internal_local,
        external_policy_local=external_local,
    )
    cluster = tuple(eps)
    return ServicePortState(
        port=port,
        cluster_endpoints=cluster,
        external_endpoints=cluster if external is None else tuple(external),
        all_endpoints=tuple(all_endpoints if all_endpoints is not None else cluster),
    )


def state(*ports: ServicePortState, node: NodeContext = NODE) -> ProxyState:
    return ProxyState(node=node, services={p.name: p for p in ports})


def changed(*names: ServicePortName) -> SyncHint:
    return SyncHint(full=False, changed=frozenset(names))


@pytest.fixture
def fake() -> FakeNft:
    return FakeNft()


@pytest.fixture
def backend(fake: FakeNft) -> Driven:
    return Driven(NftablesBackend(BackendConfig(), NftProcess(fake)))


def lands(fake: FakeNft, daddr: str, port: int = 80, *, proto: str = "tcp") -> Trace:
    return fake.trace(TABLE, daddr, proto, port)


def lands_nodeport(fake: FakeNft, port: int, *, proto: str = "tcp") -> Trace:
    return fake.trace(TABLE, NODE_IP, proto, port, nodeport=True)


# -- registration ---------------------------------------------------------------------


def test_registered_as_nftables() -> None:
    assert "nftables" in available()
    assert create("nftables", BackendConfig()).name == "nftables"


# -- golden text ----------------------------------------------------------------------

GOLDEN_ONE_SERVICE = """\
add table ip kube-proxy-py
delete table ip kube-proxy-py
add table ip kube-proxy-py
add chain ip kube-proxy-py canary
add chain ip kube-proxy-py nat-prerouting { type nat hook prerouting priority -100; }
add chain ip kube-proxy-py nat-output { type nat hook output priority -100; }
add chain ip kube-proxy-py nat-postrouting { type nat hook postrouting priority 100; }
add chain ip kube-proxy-py filter-input { type filter hook input priority -110; }
add chain ip kube-proxy-py filter-forward { type filter hook forward priority -110; }
add chain ip kube-proxy-py filter-output { type filter hook output priority -110; }
add chain ip kube-proxy-py filter-prerouting { type filter hook prerouting priority -110; }
add chain ip kube-proxy-py services
add chain ip kube-proxy-py masquerading
add chain ip kube-proxy-py mark-for-masquerade
add chain ip kube-proxy-py endpoints-check
add chain ip kube-proxy-py firewall-check
add chain ip kube-proxy-py reject-chain
add map ip kube-proxy-py service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }
add map ip kube-proxy-py service-nodeports { type inet_proto . inet_service : verdict; }
add map ip kube-proxy-py no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict; }
add map ip kube-proxy-py no-endpoint-nodeports { type inet_proto . inet_service : verdict; }
add map ip kube-proxy-py ip-endpoints-tcp { typeof ip daddr . tcp dport . numgen random mod 1 : ip daddr . tcp dport; }
add map ip kube-proxy-py ip-endpoints-udp { typeof ip daddr . udp dport . numgen random mod 1 : ip daddr . udp dport; }
add map ip kube-proxy-py ip-endpoints-sctp { typeof ip daddr . sctp dport . numgen random mod 1 : ip daddr . sctp dport; }
add map ip kube-proxy-py nodeport-endpoints-tcp { typeof tcp dport . numgen random mod 1 : ip daddr . tcp dport; }
add map ip kube-proxy-py nodeport-endpoints-udp { typeof udp dport . numgen random mod 1 : ip daddr . udp dport; }
add map ip kube-proxy-py nodeport-endpoints-sctp { typeof sctp dport . numgen random mod 1 : ip daddr . sctp dport; }
add map ip kube-proxy-py short-circuit-tcp { typeof ip daddr . tcp dport . numgen random mod 1 : ip daddr . tcp dport; }
add map ip kube-proxy-py short-circuit-udp { typeof ip daddr . udp dport . numgen random mod 1 : ip daddr . udp dport; }
add map ip kube-proxy-py short-circuit-sctp { typeof ip daddr . sctp dport . numgen random mod 1 : ip daddr . sctp dport; }
add map ip kube-proxy-py nodeport-short-circuit-tcp { typeof tcp dport . numgen random mod 1 : ip daddr . tcp dport; }
add map ip kube-proxy-py nodeport-short-circuit-udp { typeof udp dport . numgen random mod 1 : ip daddr . udp dport; }
add map ip kube-proxy-py nodeport-short-circuit-sctp { typeof sctp dport . numgen random mod 1 : ip daddr . sctp dport; }
add set ip kube-proxy-py firewall-ips { type ipv4_addr . inet_proto . inet_service; }
add set ip kube-proxy-py firewall-allow { type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval; }
add set ip kube-proxy-py hairpin { type ipv4_addr . ipv4_addr; }
add rule ip kube-proxy-py nat-prerouting jump services
add rule ip kube-proxy-py nat-output jump services
add rule ip kube-proxy-py nat-postrouting jump masquerading
add rule ip kube-proxy-py filter-input ct state new jump endpoints-check
add rule ip kube-proxy-py filter-forward ct state new jump endpoints-check
add rule ip kube-proxy-py filter-output ct state new jump endpoints-check
add rule ip kube-proxy-py filter-prerouting ct state new jump firewall-check
add rule ip kube-proxy-py filter-output ct state new jump firewall-check
add rule ip kube-proxy-py firewall-check ip daddr . meta l4proto . th dport @firewall-ips ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow drop
add rule ip kube-proxy-py mark-for-masquerade meta mark set meta mark | 0x00004000
add rule ip kube-proxy-py masquerading ct status dnat ip saddr . ip daddr @hairpin masquerade fully-random
add rule ip kube-proxy-py masquerading meta mark & 0x00004000 == 0 return
add rule ip kube-proxy-py masquerading meta mark set meta mark ^ 0x00004000
add rule ip kube-proxy-py masquerading masquerade fully-random
add rule ip kube-proxy-py reject-chain reject
add rule ip kube-proxy-py endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy-py services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy-py endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy-py services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
add chain ip kube-proxy-py cluster-tcp-2
add rule ip kube-proxy-py cluster-tcp-2 ip saddr != 198.18.64.0/18 jump mark-for-masquerade
add rule ip kube-proxy-py cluster-tcp-2 dnat to ip daddr . tcp dport . numgen random mod 2 map @ip-endpoints-tcp
add chain ip kube-proxy-py nodeport-tcp-2
add rule ip kube-proxy-py nodeport-tcp-2 jump mark-for-masquerade
add rule ip kube-proxy-py nodeport-tcp-2 dnat to tcp dport . numgen random mod 2 map @nodeport-endpoints-tcp
add element ip kube-proxy-py service-ips { 198.19.0.10 . tcp . 80 : goto cluster-tcp-2 }
add element ip kube-proxy-py ip-endpoints-tcp { 198.19.0.10 . 80 . 0 : 198.18.64.7 . 8080, 198.19.0.10 . 80 . 1 : 198.18.64.8 . 8080 }
add element ip kube-proxy-py service-nodeports { tcp . 30080 : goto nodeport-tcp-2 }
add element ip kube-proxy-py nodeport-endpoints-tcp { 30080 . 0 : 198.18.64.7 . 8080, 30080 . 1 : 198.18.64.8 . 8080 }
add element ip kube-proxy-py no-endpoint-services { 198.19.0.20 . udp . 80 : goto reject-chain }
add element ip kube-proxy-py hairpin { 198.18.64.7 . 198.18.64.7, 198.18.64.8 . 198.18.64.8 }
"""  # noqa: E501


def test_full_sync_of_a_small_table_is_this_script(fake: FakeNft, backend: Driven) -> None:
    web = port_state(eps=endpoints(7, 8), node_port=30080)
    empty = port_state("empty", "198.19.0.20", proto=Protocol.UDP)
    backend.sync(state(web, empty), FULL)
    assert fake.scripts == [GOLDEN_ONE_SERVICE]


# -- packets ----------------------------------------------------------------------------


def test_cluster_ip_and_node_port_land_on_every_endpoint(fake: FakeNft, backend: Driven) -> None:
    backend.sync(state(port_state(eps=endpoints(7, 8, 9), node_port=30080)), FULL)
    expected = ("198.18.64.7:8080", "198.18.64.8:8080", "198.18.64.9:8080")
    assert lands(fake, "198.19.0.10") == Trace("dnat", "cluster-tcp-3", expected)
    assert lands_nodeport(fake, 30080) == Trace("dnat", "nodeport-tcp-3", expected)
    assert lands(fake, "198.19.0.11") == Trace("none")


def test_no_endpoints_rejects_and_local_policy_without_local_endpoints_drops(
    fake: FakeNft, backend: Driven
) -> None:
    remote = endpoints(7, local=False)
    backend.sync(
        state(
            port_state("empty", "198.19.0.20", node_port=30081),
            port_state("itp", "198.19.0.21", (), all_endpoints=remote, internal_local=True),
            port_state(
                "etp", "198.19.0.22", remote, external=(), node_port=30082, external_local=True
            ),
        ),
        FULL,
    )
    assert lands(fake, "198.19.0.20").verdict == "reject"
    assert lands_nodeport(fake, 30081).verdict == "reject"
    assert lands(fake, "198.19.0.21").verdict == "drop"
    assert lands(fake, "198.19.0.22").verdict == "dnat"
    assert lands_nodeport(fake, 30082).verdict == "drop"


def test_external_local_policy_uses_local_endpoints_except_for_pods_and_the_node(
    fake: FakeNft, backend: Driven
) -> None:
    local, remote = endpoints(7), endpoints(8, local=False)
    backend.sync(
        state(
            port_state(
                eps=(*local, *remote),
                external=local,
                node_port=30080,
                external_local=True,
                external_ips=("198.19.1.1",),
                lb_ips=("198.19.2.1",),
            )
        ),
        FULL,
    )
    everywhere = ("198.18.64.7:8080", "198.18.64.8:8080")
    assert lands(fake, "198.19.0.10").endpoints == everywhere
    for address in ("198.19.1.1", "198.19.2.1"):
        assert lands(fake, address) == Trace("dnat", "external-local-tcp-1-2", local_of(local))
        for source in ("pod", "node"):
            assert fake.trace(TABLE, address, "tcp", 80, source=source).endpoints == everywhere
    assert lands_nodeport(fake, 30080) == Trace("dnat", "nodeport-local-tcp-1-2", local_of(local))
    assert fake.trace(TABLE, NODE_IP, "tcp", 30080, nodeport=True, source="pod").endpoints == (
        everywhere
    )
    rules = fake.tables[TABLE].chains["nodeport-local-tcp-1-2"].rules
    # The client's address is kept: only the node's own traffic is marked for SNAT.
    assert [rule for rule in rules if "mark-for-masquerade" in rule] == [
        "fib saddr type local jump mark-for-masquerade"
    ]


def local_of(eps: Sequence[Endpoint]) -> tuple[str, ...]:
    return tuple(endpoint.address() for endpoint in eps)


def test_external_local_policy_without_local_endpoints_drops_outside_traffic_only(
    fake: FakeNft, backend: Driven
) -> None:
    remote = endpoints(8, 9, local=False)
    backend.sync(
        state(port_state(eps=remote, external=(), node_port=30080, external_local=True)),
        FULL,
    )
    assert lands_nodeport(fake, 30080).verdict == "drop"
    from_pod = fake.trace(TABLE, NODE_IP, "tcp", 30080, nodeport=True, source="pod")
    assert from_pod == Trace("dnat", "nodeport-local-tcp-0-2", local_of(remote))
    assert not any(
        "nodeport-endpoints" in rule
        for rule in fake.tables[TABLE].chains["nodeport-local-tcp-0-2"].rules
    )


def test_load_balancer_source_ranges_allow_only_the_listed_sources(
    fake: FakeNft, backend: Driven
) -> None:
    ranges = ("198.18.200.0/24", "198.18.0.0/24")  # the second holds the node's address
    web = port_state(eps=endpoints(7), node_port=30080, lb_ips=("198.19.2.1",))
    ranged = ServicePortState(
        port=replace(web.port, load_balancer_source_ranges=ranges),
        cluster_endpoints=web.cluster_endpoints,
        external_endpoints=web.external_endpoints,
        all_endpoints=web.all_endpoints,
    )
    backend.sync(state(ranged), FULL)
    key = "198.19.2.1 . tcp . 80"
    assert fake.elements(TABLE, "firewall-allow") == {
        f"{key} . 198.18.200.0/24": None,
        f"{key} . 198.18.0.0/24": None,
        f"{key} . 198.19.2.1/32": None,  # the node's requests, seen with the VIP as source
    }
    allowed = fake.trace(TABLE, "198.19.2.1", "tcp", 80, saddr="198.18.200.9")
    assert allowed.endpoints == ("198.18.64.7:8080",)
    assert fake.trace(TABLE, "198.19.2.1", "tcp", 80, saddr="198.18.201.9").verdict == "drop"
    # The ClusterIP and the NodePort are not subject to the ranges.
    assert fake.trace(TABLE, "198.19.0.10", "tcp", 80, saddr="198.18.201.9").verdict == "dnat"
    # Without ranges, a partial sync takes the firewall elements away again.
    backend.sync(state(web), changed(web.name))
    assert fake.elements(TABLE, "firewall-ips") == {}
    assert fake.elements(TABLE, "firewall-allow") == {}


def test_masquerade_all_and_several_cluster_cidrs(fake: FakeNft) -> None:
    backend = Driven(NftablesBackend(BackendConfig(), NftProcess(fake)))
    web = port_state(eps=endpoints(7))
    backend.sync(state(web, node=NodeContext("n", (NODE_IP,), masquerade_all=True)), FULL)
    assert fake.tables[TABLE].chains["cluster-tcp-1"].rules[0] == "jump mark-for-masquerade"
    two = NodeContext("n", (NODE_IP,), cluster_cidrs=("198.18.64.0/18", "198.18.128.0/18"))
    backend.sync(state(web, node=two), changed())  # a new context: a full sync
    assert fake.tables[TABLE].chains["cluster-tcp-1"].rules[0] == (
        "ip saddr != @cluster-cidrs jump mark-for-masquerade"
    )
    assert set(fake.elements(TABLE, "cluster-cidrs")) == {"198.18.64.0/18", "198.18.128.0/18"}


def test_nodeport_addresses_limit_where_nodeports_open(fake: FakeNft, backend: Driven) -> None:
    node = NodeContext(
        "n", (NODE_IP,), cluster_cidrs=("198.18.64.0/18",), nodeport_addresses=("primary",)
    )
    backend.sync(state(port_state(eps=endpoints(7), node_port=30080), node=node), FULL)
    assert set(fake.elements(TABLE, "nodeport-ips")) == {f"{NODE_IP}/32"}
    assert any("@nodeport-ips" in rule for rule in fake.tables[TABLE].chains["services"].rules)
    v6_only = NodeContext("n", (NODE_IP,), nodeport_addresses=("fd00::/64",))
    backend.sync(state(port_state(eps=endpoints(7), node_port=30080), node=v6_only), FULL)
    assert lands_nodeport(fake, 30080).verdict == "none"
    assert not any("nodeport" in rule for rule in fake.tables[TABLE].chains["services"].rules)


def test_ipv6_renders_an_ip6_table(fake: FakeNft) -> None:
    backend = NftablesBackend(BackendConfig(family=IPFamily.V6), NftProcess(fake))
    eps = (Endpoint(ip="fd00::7", port=8080), Endpoint(ip="198.18.64.7", port=8080))
    node = NodeContext("n", ("fd00::1",), cluster_cidrs=("fd00::/64",))
    backend.sync(state(port_state(vip="fd01::10", eps=eps), node=node), FULL)
    trace = fake.trace("ip6 kube-proxy-py", "fd01::10", "tcp", 80)
    assert trace == Trace("dnat", "cluster-tcp-1", ("fd00::7:8080",))
    assert "ip6 saddr != fd00::/64 jump mark-for-masquerade" in (
        fake.tables["ip6 kube-proxy-py"].chains["cluster-tcp-1"].rules
    )


# -- partial syncs --------------------------------------------------------------------


def test_one_endpoint_change_is_element_operations_only(fake: FakeNft, backend: Driven) -> None:
    others = [port_state(f"svc{i}", f"198.19.0.{100 + i}", endpoints(20 + i)) for i in range(5)]
    web = port_state(eps=endpoints(7, 8, 9), node_port=30080)
    backend.sync(state(web, *others), FULL)
    moved = port_state(eps=endpoints(7, 8, 10), node_port=30080)
    backend.sync(state(moved, *others), changed(web.name))
    script = fake.scripts[-1]
    verbs = {" ".join(line.split()[:2]) for line in script.splitlines()}
    assert verbs == {"delete element", "add element"}, script
    assert script == (
        f"delete element {TABLE} ip-endpoints-tcp {{ 198.19.0.10 . 80 . 2 }}\n"
        f"delete element {TABLE} nodeport-endpoints-tcp {{ 30080 . 2 }}\n"
        f"delete element {TABLE} hairpin {{ 198.18.64.9 . 198.18.64.9 }}\n"
        f"add element {TABLE} ip-endpoints-tcp {{ 198.19.0.10 . 80 . 2 : 198.18.64.10 . 8080 }}\n"
        f"add element {TABLE} nodeport-endpoints-tcp {{ 30080 . 2 : 198.18.64.10 . 8080 }}\n"
        f"add element {TABLE} hairpin {{ 198.18.64.10 . 198.18.64.10 }}\n"
    )
    assert lands(fake, "198.19.0.10").endpoints == (
        "198.18.64.7:8080",
        "198.18.64.8:8080",
        "198.18.64.10:8080",
    )


def test_growing_a_service_moves_its_dispatch_element_and_adds_a_chain_once(
    fake: FakeNft, backend: Driven
) -> None:
    web = port_state(eps=endpoints(7))
    backend.sync(state(web), FULL)
    grown = port_state(eps=endpoints(7, 8))
    backend.sync(state(grown), changed(web.name))
    assert f"add chain {TABLE} cluster-tcp-2\n" in fake.scripts[-1]
    # cluster-tcp-1 is used by nobody now: it goes, after the element that jumped to it.
    assert fake.scripts[-1].endswith(
        f"flush chain {TABLE} cluster-tcp-1\ndelete chain {TABLE} cluster-tcp-1\n"
    )
    other = port_state("other", "198.19.0.11", endpoints(9, 10))
    backend.sync(state(grown, other), changed(other.name))
    assert "add chain" not in fake.scripts[-1]  # cluster-tcp-2 exists already
    assert lands(fake, "198.19.0.11").chain == "cluster-tcp-2"


def test_shared_endpoint_keeps_its_hairpin_element_until_its_last_service_goes(
    fake: FakeNft, backend: Driven
) -> None:
    a, b = (
        port_state("a", "198.19.0.10", endpoints(7)),
        port_state("b", "198.19.0.11", endpoints(7)),
    )
    backend.sync(state(a, b), FULL)
    backend.sync(state(b), changed(a.name))
    assert "198.18.64.7 . 198.18.64.7" in fake.elements(TABLE, "hairpin")
    backend.sync(state(), changed(b.name))
    assert fake.elements(TABLE, "hairpin") == {}


def test_partial_syncs_end_where_a_full_sync_would(fake: FakeNft, backend: Driven) -> None:
    steps = [
        [port_state(eps=endpoints(7), node_port=30080)],
        [
            port_state(eps=endpoints(7, 8), node_port=30080),
            port_state("b", "198.19.0.11", endpoints(9), proto=Protocol.UDP),
            port_state("c", "198.19.0.12", ()),
        ],
        [
            port_state(eps=(), node_port=30080),
            port_state("b", "198.19.0.11", endpoints(9, 7), proto=Protocol.UDP),
            port_state("c", "198.19.0.12", endpoints(8)),
        ],
        [
            port_state("c", "198.19.0.12", endpoints(8, 9, 10), lb_ips=("198.19.2.2",)),
            port_state(
                "d",
                "198.19.0.13",
                endpoints(8, 9),
                external=endpoints(9),
                node_port=30090,
                external_local=True,
                lb_ips=("198.19.2.3",),
            ),
        ],
        [
            port_state("c", "198.19.0.12", endpoints(8, 9), lb_ips=("198.19.2.2",)),
            port_state(
                "d",
                "198.19.0.13",
                endpoints(8, 9, 10),
                external=(),
                node_port=30090,
                external_local=True,
            ),
        ],
    ]
    backend.sync(state(*steps[0]), FULL)
    previous = {p.name: p for p in steps[0]}
    for ports in steps[1:]:
        current = {p.name: p for p in ports}
        names = {n for n in previous.keys() | current.keys() if previous.get(n) != current.get(n)}
        backend.sync(state(*ports), changed(*names))
        previous = current
    after_partials = fake.ruleset()
    fresh = FakeNft()
    NftablesBackend(BackendConfig(), NftProcess(fresh)).sync(state(*steps[-1]), FULL)
    assert after_partials == fresh.ruleset()


# -- failures -------------------------------------------------------------------------


def test_a_refused_transaction_changes_nothing_and_names_the_line(
    fake: FakeNft, backend: Driven
) -> None:
    web = port_state(eps=endpoints(7, 8))
    backend.sync(state(web), FULL)
    before = fake.ruleset()
    fake.fail_next = "198.18.64.9"
    with pytest.raises(BackendError) as raised:
        backend.sync(state(port_state(eps=endpoints(7, 9))), changed(web.name))
    assert fake.ruleset() == before
    refused = [line for line in raised.value.offending_lines if "198.18.64.9" in line]
    assert refused, raised.value.offending_lines
    # Whatever the next hint says, the next sync is full and repairs everything.
    backend.sync(state(port_state(eps=endpoints(7, 9))), changed())
    assert fake.scripts[-1].startswith(f"add table {TABLE}\ndelete table {TABLE}\n")
    assert lands(fake, "198.19.0.10").endpoints == ("198.18.64.7:8080", "198.18.64.9:8080")


def test_a_wrong_hint_is_refused_by_the_kernel_then_repaired(fake: FakeNft) -> None:
    backend = NftablesBackend(BackendConfig(), NftProcess(fake))
    web = port_state(eps=endpoints(7))
    backend.sync(state(web), FULL)
    lie = port_state(eps=endpoints(5))  # not what the kernel holds
    hint = SyncHint(full=False, changed=frozenset({web.name}), previous={web.name: lie})
    with pytest.raises(BackendError):
        backend.sync(state(port_state(eps=endpoints(8))), hint)
    assert lands(fake, "198.19.0.10").endpoints == ("198.18.64.7:8080",)
    backend.sync(state(port_state(eps=endpoints(8))), hint)  # full now
    assert lands(fake, "198.19.0.10").endpoints == ("198.18.64.8:8080",)


def test_error_line_parsing_and_offending_lines() -> None:
    assert failed_line("/dev/stdin:12:5-9: Error: Could not process rule") == 12
    assert failed_line("<cmdline>:3:1-2: Error: syntax error") == 3
    assert failed_line("Error: Could not process rule: No such file or directory") is None
    script = "a\nb\nc\nd\ne\n"
    assert offending_lines(script, 3, radius=1) == ["2: b", "3: c", "4: d"]
    assert offending_lines(script, None) == []


# -- canary and cleanup ---------------------------------------------------------------


def test_canary_and_cleanup_touch_only_our_tables(fake: FakeNft, backend: Driven) -> None:
    fake.run(["nft", "-f", "-"], stdin="add table ip foreign\nadd chain ip foreign c\n")
    assert backend.drifted() is True  # nothing written yet
    backend.sync(state(port_state(eps=endpoints(7))), FULL)
    assert backend.drifted() is False
    fake.run(["nft", "-f", "-"], stdin=f"delete table {TABLE}\n")
    assert backend.drifted() is True
    backend.sync(state(port_state(eps=endpoints(7))), FULL)
    v6 = NftablesBackend(BackendConfig(family=IPFamily.V6), NftProcess(fake))
    v6.sync(state(port_state(vip="fd01::1"), node=NodeContext("n", ("fd00::1",))), FULL)
    assert backend.cleanup() is True
    assert set(fake.tables) == {"ip foreign"}
    assert backend.cleanup() is False


def test_drift_check_reads_chain_names_never_the_table(fake: FakeNft, backend: Driven) -> None:
    backend.sync(state(port_state(eps=endpoints(7))), FULL)
    fake.scripts.clear()
    assert backend.drifted() is False
    assert fake.scripts == ["list chains\n"]
    fake.run(["nft", "-f", "-"], stdin=f"delete chain {TABLE} {render.CANARY}\n")
    assert backend.drifted() is True


def test_chains_by_table_reads_nft_list_chains() -> None:
    listing = (
        "table ip kube-proxy-py {\n\tchain canary {\n\t}\n\tchain nat-prerouting {\n"
        "\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t}\n}\n"
        "table ip6 kube-proxy-py {\n}\n"
    )
    assert chains_by_table(listing) == {
        "ip kube-proxy-py": {"canary", "nat-prerouting"},
        "ip6 kube-proxy-py": set(),
    }


# -- session affinity -----------------------------------------------------------------


def with_affinity(state_: ServicePortState, seconds: int = 10800) -> ServicePortState:
    return ServicePortState(
        port=replace(state_.port, session_affinity_seconds=seconds),
        cluster_endpoints=state_.cluster_endpoints,
        external_endpoints=state_.external_endpoints,
        all_endpoints=state_.all_endpoints,
    )


def owned_by_affinity(fake: FakeNft) -> tuple[set[str], set[str]]:
    table = fake.tables[TABLE]
    return (
        {name for name in table.sets if name.startswith("affinity-")},
        {name for name in table.chains if name.startswith(("affinity-", "endpoint-"))},
    )


def test_session_affinity_remembers_clients_per_endpoint(fake: FakeNft, backend: Driven) -> None:
    web = with_affinity(port_state(eps=endpoints(7, 8), node_port=30080), seconds=600)
    backend.sync(state(web), FULL)
    everywhere = ("198.18.64.7:8080", "198.18.64.8:8080")
    cluster = lands(fake, "198.19.0.10")
    assert cluster.chain.startswith("affinity-") and cluster.endpoints == everywhere
    assert lands_nodeport(fake, 30080).chain.startswith("affinity-external-")
    assert lands_nodeport(fake, 30080).endpoints == everywhere
    sets, chains = owned_by_affinity(fake)
    assert len(sets) == 3  # one client set per endpoint, one pick map
    assert len(chains) == 4  # one chain per endpoint, the cluster and the external entry
    table = fake.tables[TABLE]
    client_sets = [name for name in sets if not name.startswith("affinity-pick-")]
    for name in client_sets:
        assert "timeout 600s" in table.sets[name].declaration
        assert "dynamic" in table.sets[name].declaration
    service_rules = table.chains[cluster.chain].rules
    assert sum(f"@{name} goto endpoint-" in rule for rule in service_rules for name in sets) == 2


def test_session_affinity_keeps_the_sets_of_endpoints_that_stay(
    fake: FakeNft, backend: Driven
) -> None:
    web = with_affinity(port_state(eps=endpoints(7, 8)))
    backend.sync(state(web), FULL)
    sets_before, _ = owned_by_affinity(fake)
    moved = with_affinity(port_state(eps=endpoints(7, 9)))
    backend.sync(state(moved), changed(web.name))
    script = fake.scripts[-1]
    sets_after, _ = owned_by_affinity(fake)
    kept = sets_before & sets_after
    assert len(kept) == 2  # 198.18.64.7's client set and the pick map stay as they were
    assert not any(f"delete set {TABLE} {name}\n" in script for name in kept)
    assert not any(f"add set {TABLE} {name} " in script for name in kept)
    assert len(sets_before - sets_after) == len(sets_after - sets_before) == 1
    assert lands(fake, "198.19.0.10").endpoints == ("198.18.64.7:8080", "198.18.64.9:8080")
    # The whole port goes: everything it owned goes with it, nothing else stays behind.
    backend.sync(state(), changed(web.name))
    assert owned_by_affinity(fake) == (set(), set())


def test_session_affinity_partial_syncs_end_where_a_full_sync_would(
    fake: FakeNft, backend: Driven
) -> None:
    steps = [
        [with_affinity(port_state(eps=endpoints(7)))],
        [with_affinity(port_state(eps=endpoints(7, 8), node_port=30080)), port_state("b")],
        [with_affinity(port_state(eps=endpoints(8, 9), node_port=30080), seconds=60)],
        [port_state(eps=endpoints(8, 9), node_port=30080)],  # affinity switched off
        [with_affinity(port_state(eps=(), node_port=30080))],
    ]
    backend.sync(state(*steps[0]), FULL)
    previous = {p.name: p for p in steps[0]}
    for ports in steps[1:]:
        current = {p.name: p for p in ports}
        names = {n for n in previous.keys() | current.keys() if previous.get(n) != current.get(n)}
        backend.sync(state(*ports), changed(*names))
        previous = current
        fresh = FakeNft()
        NftablesBackend(BackendConfig(), NftProcess(fresh)).sync(state(*ports), FULL)
        assert fake.ruleset() == fresh.ruleset(), ports
