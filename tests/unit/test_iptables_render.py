"""Rendering of the iptables ruleset: golden text, naming, per-policy shapes, speed.

These tests read the text that `iptables-restore` receives; what the text *does* to
packets is tested in test_iptables_backend.py through the fake and the tracer.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from proxy.backends.iptables import render
from proxy.model import (
    Endpoint,
    IPFamily,
    NodeContext,
    Protocol,
    ServiceKey,
    ServicePort,
    ServicePortName,
    ServicePortState,
)

NODE = NodeContext("node-a", ("198.18.0.1",), cluster_cidrs=("198.18.64.0/18",))


def port_name(
    name: str = "web", port: str = "http", proto: Protocol = Protocol.TCP
) -> ServicePortName:
    return ServicePortName(ServiceKey("shop", name), port, proto)


def port_state(
    name: ServicePortName,
    vip: str | tuple[str, ...] = "198.19.0.10",
    *,
    port: int = 80,
    node_port: int = 0,
    cluster: Sequence[str] = (),
    external: Sequence[str] | None = None,
    all_endpoints: Sequence[Endpoint] = (),
    target_port: int = 8080,
    external_policy_local: bool = False,
    internal_policy_local: bool = False,
) -> ServicePortState:
    vips = (vip,) if isinstance(vip, str) else vip
    service_port = ServicePort(
        name,
        vips,
        port,
        node_port=node_port,
        external_policy_local=external_policy_local,
        internal_policy_local=internal_policy_local,
    )
    cluster_eps = tuple(Endpoint(ip, target_port) for ip in cluster)
    external_eps = (
        cluster_eps if external is None else tuple(Endpoint(ip, target_port) for ip in external)
    )
    return ServicePortState(service_port, cluster_eps, external_eps, tuple(all_endpoints))


def context(node: NodeContext = NODE, family: IPFamily = IPFamily.V4) -> render.RenderContext:
    return render.RenderContext.build(
        node, family=family, masquerade_bit=14, localhost_nodeports=True
    )


def full_text(states: dict[ServicePortName, ServicePortState], node: NodeContext = NODE) -> str:
    ctx = context(node)
    ports = [render.render_port(name, state, ctx) for name, state in states.items()]
    return render.render_full(ctx=ctx, ports=ports)


GOLDEN = """\
*nat
:KPY-SERVICES - [0:0]
:KPY-NODEPORTS - [0:0]
:KPY-POSTROUTING - [0:0]
:KPY-MARK-MASQ - [0:0]
:KPY-PROXY-CANARY - [0:0]
:KPY-EXT-67NZLRHBNDSAWJRO - [0:0]
:KPY-SEP-FVVY72AF7Y3TD2VF - [0:0]
:KPY-SEP-UPY7TNE7HISHJAJD - [0:0]
:KPY-SVC-67NZLRHBNDSAWJRO - [0:0]
-A KPY-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KPY-POSTROUTING -j MARK --xor-mark 0x4000
-A KPY-POSTROUTING -m comment --comment "kpy service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KPY-MARK-MASQ -j MARK --or-mark 0x4000
-A KPY-SVC-67NZLRHBNDSAWJRO ! -s 198.18.64.0/18 -d 198.19.0.10/32 -p tcp -m comment --comment "shop/web:http cluster IP" -m tcp --dport 80 -j KPY-MARK-MASQ
-A KPY-SVC-67NZLRHBNDSAWJRO -m comment --comment "shop/web:http -> 198.18.64.7:8080" -m statistic --mode random --probability 0.5000000000 -j KPY-SEP-UPY7TNE7HISHJAJD
-A KPY-SVC-67NZLRHBNDSAWJRO -m comment --comment "shop/web:http -> 198.18.64.8:8080" -j KPY-SEP-FVVY72AF7Y3TD2VF
-A KPY-EXT-67NZLRHBNDSAWJRO -m comment --comment "masquerade traffic for shop/web:http external destinations" -j KPY-MARK-MASQ
-A KPY-EXT-67NZLRHBNDSAWJRO -j KPY-SVC-67NZLRHBNDSAWJRO
-A KPY-SEP-UPY7TNE7HISHJAJD -s 198.18.64.7/32 -j KPY-MARK-MASQ
-A KPY-SEP-UPY7TNE7HISHJAJD -p tcp -m tcp -j DNAT --to-destination 198.18.64.7:8080
-A KPY-SEP-FVVY72AF7Y3TD2VF -s 198.18.64.8/32 -j KPY-MARK-MASQ
-A KPY-SEP-FVVY72AF7Y3TD2VF -p tcp -m tcp -j DNAT --to-destination 198.18.64.8:8080
-A KPY-SERVICES -d 198.19.0.10/32 -p tcp -m comment --comment "shop/web:http cluster IP" -m tcp --dport 80 -j KPY-SVC-67NZLRHBNDSAWJRO
-A KPY-SERVICES -m comment --comment "kpy service nodeports; NOTE: this must be the last rule" -m addrtype --dst-type LOCAL -j KPY-NODEPORTS
-A KPY-NODEPORTS -p tcp -m comment --comment "shop/web:http" -m tcp --dport 30080 -j KPY-EXT-67NZLRHBNDSAWJRO
-I PREROUTING 1 -m comment --comment "kpy service portals" -j KPY-SERVICES
-I OUTPUT 1 -m comment --comment "kpy service portals" -j KPY-SERVICES
-I POSTROUTING 1 -m comment --comment "kpy postrouting rules" -j KPY-POSTROUTING
COMMIT
*filter
:KPY-SERVICES - [0:0]
:KPY-EXTERNAL-SERVICES - [0:0]
:KPY-PROXY-FIREWALL - [0:0]
:KPY-FORWARD - [0:0]
:KPY-FIREWALL - [0:0]
:KPY-PROXY-CANARY - [0:0]
-A KPY-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KPY-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KPY-FORWARD -m comment --comment "kpy forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KPY-FORWARD -m comment --comment "kpy forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KPY-SERVICES -d 198.19.0.53/32 -p udp -m comment --comment "shop/dns has no endpoints" -m udp --dport 53 -j REJECT
-I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment "kpy service portals" -j KPY-SERVICES
-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment "kpy service portals" -j KPY-SERVICES
-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment "kpy externally-visible service portals" -j KPY-EXTERNAL-SERVICES
-I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment "kpy externally-visible service portals" -j KPY-EXTERNAL-SERVICES
-I FORWARD 1 -m comment --comment "kpy forwarding rules" -j KPY-FORWARD
-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment "kpy load balancer firewall" -j KPY-PROXY-FIREWALL
-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment "kpy load balancer firewall" -j KPY-PROXY-FIREWALL
-I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment "kpy load balancer firewall" -j KPY-PROXY-FIREWALL
-I INPUT 1 -m comment --comment "kpy firewall" -j KPY-FIREWALL
-I OUTPUT 1 -m comment --comment "kpy firewall" -j KPY-FIREWALL
COMMIT
*mangle
:KPY-PROXY-CANARY - [0:0]
COMMIT
"""  # noqa: E501


def test_golden_first_full_sync_of_a_nodeport_service_and_an_empty_one() -> None:
    """The whole restore input for two services on a fresh node, as documentation.

    shop/web:http is ClusterIP 198.19.0.10:80 plus NodePort 30080 with two endpoints;
    shop/dns (UDP 53) has none, so it is only a REJECT in filter. On a fresh node the
    jumps from the built-in chains are missing, so they are inserted last.
    """
    web, dns = port_name(), port_name("dns", "", Protocol.UDP)
    states = {
        web: port_state(web, node_port=30080, cluster=("198.18.64.7", "198.18.64.8")),
        dns: port_state(dns, "198.19.0.53", port=53),
    }
    ctx = context()
    ports = [render.render_port(name, state, ctx) for name, state in states.items()]
    text = render.render_full(ctx=ctx, ports=ports, insert_jumps=render.JUMP_RULES)
    assert text == GOLDEN


def test_jump_lines_read_as_iptables_save_prints_them() -> None:
    assert [render.jump_line(jump) for jump in render.JUMP_RULES[:1]] == [
        '-A PREROUTING -m comment --comment "kpy service portals" -j KPY-SERVICES'
    ]


def test_chain_names_hash_like_upstream() -> None:
    # The literal values of upstream's proxier_test.go (hash inputs, not addresses).
    name = ServicePortName(ServiceKey("ns1", "svc1"), "p80", Protocol.TCP)
    assert render.port_hash(name) == "XPGD46QRK7WJZT7O"
    assert render.endpoint_chain(name, Endpoint("10.180.0.1", 80)) == "KPY-SEP-SXIVWICOYRO3J4NJ"
    other = ServicePortName(ServiceKey("ns2", "svc2"), "p80", Protocol.TCP)
    assert render.port_hash(other) == "GNZBNJ2PO5MGZ6GT"


def test_protocol_is_part_of_the_chain_name() -> None:
    tcp, udp = port_name(proto=Protocol.TCP), port_name(proto=Protocol.UDP)
    assert render.port_hash(tcp) != render.port_hash(udp)


@pytest.mark.parametrize(
    ("remaining", "text"), [(1, "1.0000000000"), (2, "0.5000000000"), (3, "0.3333333333")]
)
def test_probability_is_formatted_like_upstream(remaining: int, text: str) -> None:
    assert render.probability(remaining) == text


def test_cascade_takes_endpoint_i_of_n_with_probability_one_over_n_minus_i() -> None:
    name = port_name()
    ips = [f"198.18.64.{i}" for i in range(1, 5)]
    rules = render.render_port(name, port_state(name, cluster=ips), context())
    probabilities = [
        line.split("--probability ")[1].split()[0]
        for line in rules.nat_rules.splitlines()
        if "--probability" in line
    ]
    assert probabilities == ["0.2500000000", "0.3333333333", "0.5000000000"]
    last = [line for line in rules.nat_rules.splitlines() if '198.18.64.4:8080"' in line]
    assert len(last) == 1
    assert "statistic" not in last[0]


def test_masquerade_all_marks_all_cluster_ip_traffic() -> None:
    name = port_name()
    node = NodeContext("node-a", ("198.18.0.1",), masquerade_all=True)
    rules = render.render_port(name, port_state(name, cluster=("198.18.64.7",)), context(node))
    first = rules.nat_rules.splitlines()[0]
    assert first.startswith("-A KPY-SVC-")
    assert "! -s" not in first
    assert "-d 198.19.0.10/32" in first
    assert first.endswith("-j KPY-MARK-MASQ")


def test_without_cluster_cidrs_cluster_ip_traffic_is_not_masqueraded() -> None:
    name = port_name()
    node = NodeContext("node-a", ("198.18.0.1",))
    rules = render.render_port(name, port_state(name, cluster=("198.18.64.7",)), context(node))
    svc_lines = [line for line in rules.nat_rules.splitlines() if line.startswith("-A KPY-SVC-")]
    assert all("KPY-MARK-MASQ" not in line for line in svc_lines)


def test_several_cluster_cidrs_use_a_shared_chain() -> None:
    name = port_name()
    node = NodeContext(
        "node-a", ("198.18.0.1",), cluster_cidrs=("198.18.64.0/18", "198.18.128.0/18")
    )
    text = full_text({name: port_state(name, cluster=("198.18.64.7",))}, node)
    assert "-A KPY-MARK-NONCLUSTER -s 198.18.64.0/18 -j RETURN\n" in text
    assert "-A KPY-MARK-NONCLUSTER -s 198.18.128.0/18 -j RETURN\n" in text
    assert "-A KPY-MARK-NONCLUSTER -j KPY-MARK-MASQ\n" in text
    assert "--dport 80 -j KPY-MARK-NONCLUSTER\n" in text


def test_no_endpoints_rejects_in_filter_and_writes_no_nat_chains() -> None:
    name = port_name()
    rules = render.render_port(name, port_state(name, node_port=30080), context())
    assert rules.nat_chains == ()
    assert rules.nat_services == rules.nat_nodeports == ""
    assert rules.filter_services == (
        '-A KPY-SERVICES -d 198.19.0.10/32 -p tcp -m comment --comment "shop/web:http has no '
        'endpoints" -m tcp --dport 80 -j REJECT\n'
    )
    assert rules.filter_external == (
        '-A KPY-EXTERNAL-SERVICES -p tcp -m comment --comment "shop/web:http has no endpoints" '
        "-m addrtype --dst-type LOCAL -m tcp --dport 30080 -j REJECT\n"
    )


def test_internal_local_policy_without_local_endpoints_drops() -> None:
    name = port_name()
    state = port_state(
        name, internal_policy_local=True, all_endpoints=(Endpoint("198.18.65.9", 8080),)
    )
    rules = render.render_port(name, state, context())
    assert "has no local endpoints" in rules.filter_services
    assert rules.filter_services.endswith("-j DROP\n")


def test_a_different_external_set_gets_its_own_chain_and_shares_endpoint_chains() -> None:
    name = port_name()
    state = port_state(
        name,
        node_port=30080,
        cluster=("198.18.64.7", "198.18.65.9"),
        external=("198.18.64.7",),
        external_policy_local=True,
    )
    rules = render.render_port(name, state, context())
    suffix = render.port_hash(name)
    assert rules.nat_chains[:3] == (f"KPY-SVC-{suffix}", f"KPY-SVL-{suffix}", f"KPY-EXT-{suffix}")
    assert len(rules.nat_chains) == 5  # two endpoint chains, 198.18.64.7 only once
    ext_lines = [line for line in rules.nat_rules.splitlines() if f"KPY-EXT-{suffix} " in line]
    assert ext_lines == [
        f'-A KPY-EXT-{suffix} -s 198.18.64.0/18 -m comment --comment "pod traffic for '
        f'shop/web:http external destinations" -j KPY-SVC-{suffix}',
        f'-A KPY-EXT-{suffix} -m comment --comment "masquerade LOCAL traffic for shop/web:http '
        'external destinations" -m addrtype --src-type LOCAL -j KPY-MARK-MASQ',
        f'-A KPY-EXT-{suffix} -m comment --comment "route LOCAL traffic for shop/web:http '
        f'external destinations" -m addrtype --src-type LOCAL -j KPY-SVC-{suffix}',
        f"-A KPY-EXT-{suffix} -j KPY-SVL-{suffix}",
    ]


def test_external_local_policy_without_local_endpoints_drops_nodeport_traffic() -> None:
    name = port_name()
    state = port_state(
        name, node_port=30080, cluster=("198.18.65.9",), external=(), external_policy_local=True
    )
    rules = render.render_port(name, state, context())
    assert "has no local endpoints" in rules.filter_external
    assert rules.filter_external.endswith("-j DROP\n")
    assert rules.nat_nodeports  # pods and the node still reach it through the cluster chain


@pytest.mark.parametrize(
    ("addresses", "scope"),
    [
        ((), None),
        (("primary",), ("198.18.0.1/32",)),  # the first address of the family only
        (("198.18.0.0/24", "2001:db8::/64"), ("198.18.0.0/24",)),
        (("198.18.0.0/24", "0.0.0.0/0"), None),
        (("2001:db8::/64",), ()),
    ],
)
def test_nodeport_scope(addresses: tuple[str, ...], scope: tuple[str, ...] | None) -> None:
    node = NodeContext(
        "node-a", ("198.18.0.1", "2001:db8::1", "198.18.0.9"), nodeport_addresses=addresses
    )
    assert render.nodeport_scope(node, IPFamily.V4) == scope


def test_nodeport_addresses_limit_the_nodeports_jump_and_rejects() -> None:
    name = port_name()
    node = NodeContext("node-a", ("198.18.0.1",), nodeport_addresses=("198.18.0.0/24",))
    text = full_text({name: port_state(name, node_port=30080)}, node)
    assert (
        '-A KPY-SERVICES -d 198.18.0.0/24 -m comment --comment "kpy service nodeports; NOTE: '
        'this must be the last rule" -m addrtype --dst-type LOCAL -j KPY-NODEPORTS\n'
    ) in text
    assert "-A KPY-EXTERNAL-SERVICES -d 198.18.0.0/24 -p tcp" in text


def test_nodeports_open_nowhere_when_no_address_of_the_family_is_listed() -> None:
    name = port_name()
    node = NodeContext("node-a", ("198.18.0.1",), nodeport_addresses=("2001:db8::/64",))
    text = full_text({name: port_state(name, node_port=30080, cluster=("198.18.64.7",))}, node)
    assert "-j KPY-NODEPORTS" not in text


def test_only_addresses_of_the_backend_family_are_rendered() -> None:
    name = port_name()
    state = port_state(
        name, ("198.19.0.10", "fd00:198:19::10"), cluster=("198.18.64.7", "fd00:198:18::7")
    )
    v4 = render.render_port(name, state, context())
    assert "fd00" not in v4.nat_rules + v4.nat_services
    v6 = render.render_port(name, state, context(family=IPFamily.V6))
    assert "198.1" not in v6.nat_rules + v6.nat_services
    assert "-d fd00:198:19::10/128" in v6.nat_services
    assert "--to-destination [fd00:198:18::7]:8080" in v6.nat_rules


def test_partial_restore_writes_only_the_changed_port_and_deletes_last() -> None:
    ctx = context()
    a, b = port_name("a"), port_name("b")
    port_a = render.render_port(a, port_state(a, cluster=("198.18.64.7",)), ctx)
    old_b = render.render_port(b, port_state(b, "198.19.0.11", cluster=("198.18.64.8",)), ctx)
    new_b = render.render_port(b, port_state(b, "198.19.0.12", cluster=("198.18.64.9",)), ctx)
    top = render.top_level_change([old_b.top_level], [new_b.top_level])
    text = render.render_partial(top=top, write=[new_b], delete_nat=["KPY-SEP-OLD"])
    assert "*mangle" not in text
    assert "*filter" not in text  # nothing changed there: the table is not written
    assert "KPY-POSTROUTING" not in text
    nat = text.split("*nat\n")[1]
    assert all(f":{chain} - [0:0]\n" in nat for chain in new_b.nat_chains)
    assert port_a.nat_services.strip() not in nat  # unchanged ports are not rewritten
    assert ":KPY-SERVICES - [0:0]" not in nat  # shared chains are edited, never flushed
    assert f"-D {old_b.nat_services.strip()[3:]}\n" in nat
    assert f"-I KPY-SERVICES 1 {new_b.nat_services.strip()[16:]}\n" in nat
    assert nat.endswith("-X KPY-SEP-OLD\nCOMMIT\n")
    assert ":KPY-SEP-OLD - [0:0]\n" in nat


def test_top_level_edits_leave_a_rule_that_moved_between_ports_alone() -> None:
    kept = ("-A KPY-SERVICES -d 198.19.0.1/32 -j KPY-SVC-A\n", "", "", "", "")
    moved = ("", "-A KPY-NODEPORTS -p tcp -m tcp --dport 30001 -j KPY-EXT-B\n", "", "", "")
    rejected = ("", "", "-A KPY-SERVICES -d 198.19.0.2/32 -j REJECT\n", "", "")
    change = render.top_level_change([kept, moved], [moved, kept, rejected])
    assert change.nat_lines == ()
    assert change.filter_lines == ("-A KPY-SERVICES -d 198.19.0.2/32 -j REJECT\n",)
    gone = render.top_level_change([rejected], [])
    assert gone.filter_lines == ("-D KPY-SERVICES -d 198.19.0.2/32 -j REJECT\n",)


def test_large_cluster_mode_drops_per_endpoint_comments_only() -> None:
    name = port_name()
    state = port_state(name, node_port=30080, cluster=("198.18.64.7", "198.18.64.8"))
    quiet = render.render_port(name, state, context(), endpoint_comments=False)
    loud = render.render_port(name, state, context())
    assert "-> 198.18.64.7:8080" in loud.nat_rules
    assert "->" not in quiet.nat_rules
    assert quiet.nat_chains == loud.nat_chains
    assert quiet.top_level == loud.top_level  # top-level rules keep their comments
    assert quiet.rule_counts() == loud.rule_counts()


def many_services(count: int, endpoints: int) -> dict[ServicePortName, ServicePortState]:
    states: dict[ServicePortName, ServicePortState] = {}
    for index in range(count):
        name = ServicePortName(ServiceKey(f"ns{index % 50}", f"svc{index}"), "http", Protocol.TCP)
        vip = f"198.19.{index // 256}.{index % 256}"
        ips = []
        for offset in range(endpoints):
            number = index * endpoints + offset
            ips.append(f"198.18.{64 + (number // 256) % 64}.{number % 256}")
        node_port = 30000 + index % 2000 if index % 10 == 0 else 0
        states[name] = port_state(name, vip, node_port=node_port, cluster=ips)
    return states


def test_ten_thousand_services_render_completely_and_partials_stay_small() -> None:
    """Scale is checked for content here; its speed is measured in benchmarks/render.py."""
    states = many_services(10_000, 10)
    ctx = context()
    ports = [render.render_port(name, state, ctx) for name, state in states.items()]
    text = render.render_full(ctx=ctx, ports=ports)
    assert text.count(":KPY-SEP-") == 100_000
    assert text.count(":KPY-SVC-") == 10_000
    # A one-port partial sync does not grow with the number of services.
    name = next(iter(states))
    changed = render.render_port(name, port_state(name, "198.19.0.0", cluster=["198.18.99.1"]), ctx)
    top = render.top_level_change([ports[0].top_level], [changed.top_level])
    partial = render.render_partial(top=top, write=[changed], delete_nat=ports[0].nat_chains[1:])
    assert partial.count(":KPY-SEP-") == 11
    assert len(partial) < 4000


@pytest.mark.parametrize("family", [IPFamily.V4, IPFamily.V6])
def test_port_chains_names_exactly_the_chains_render_port_writes(family: IPFamily) -> None:
    """A full sync declares chains from `port_chains` before rendering any rule."""
    name = port_name()
    eps = ("198.18.64.7", "198.18.64.8", "fd00:198:18::7")
    shapes = [
        port_state(name, cluster=eps),
        port_state(name, cluster=eps, node_port=30080),
        port_state(name, node_port=30080),
        port_state(name),
        port_state(name, cluster=eps, external=eps[:1], node_port=30080),
        port_state(name, cluster=(), external=eps[1:], node_port=30080),
        port_state(name, cluster=eps[:1], external=eps[1:]),
    ]
    ctx = context(family=family)
    for state in shapes:
        assert render.port_chains(name, state, ctx) == list(
            render.render_port(name, state, ctx).nat_chains
        )
