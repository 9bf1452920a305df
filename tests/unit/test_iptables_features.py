"""Service features of issue 13 in the iptables backend, against the fake and the tracer.

Each test builds the node-local state the way the proxier does (`proxy.topology.categorize`
over the endpoints), syncs it into the stateful `iptables-restore` fake, and traces a
connection's first packet: where it lands, whether it is masqueraded, dropped or
rejected. The same scenarios run with real packets in tests/kernel/test_service_features.py;
these are the fast, exhaustive versions (partial syncs included).

Addresses: node 198.18.0.1, pods 198.18.64.0/18 (pod0 .7 on this node, pod1 .8 and
pod2 .9 "elsewhere"), VIPs 198.19.0.0/24, external and LB IPs 198.19.200.0/24, an
outside client at 198.18.200.9.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from proxy.backends.base import BackendConfig
from proxy.backends.iptables import render
from proxy.backends.iptables.backend import IptablesBackend
from proxy.kernel.sysctl import ROUTE_LOCALNET, Tunable, TunableError
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
from proxy.topology import categorize
from tests.fakes.driver import Driven
from tests.fakes.iptables_fake import IptablesFake
from tests.fakes.packet_flow import Trace, trace

NODE_NAME = "node-a"
NODE_IP = "198.18.0.1"
POD = "198.18.64.5"
OUTSIDE = "198.18.200.9"
LOCAL_EP, REMOTE_EP, OTHER_EP = "198.18.64.7", "198.18.64.8", "198.18.64.9"
VIP = "198.19.0.10"
EXTERNAL_IP = "198.19.200.1"
LB_IP = "198.19.200.2"
NODE_PORT = 30080
NODE = NodeContext(NODE_NAME, (NODE_IP,), cluster_cidrs=("198.18.64.0/18",))
FULL = SyncHint(full=True)


def name_of(service: str = "web", proto: Protocol = Protocol.TCP) -> ServicePortName:
    return ServicePortName(ServiceKey("shop", service), "http", proto)


def endpoints(local: Sequence[str] = (LOCAL_EP,), remote: Sequence[str] = ()) -> list[Endpoint]:
    here = [Endpoint(ip, 8080, node_name=NODE_NAME, is_local=True) for ip in local]
    there = [Endpoint(ip, 8080, node_name="node-b") for ip in remote]
    return here + there


def state(
    service: str = "web",
    *,
    eps: Sequence[Endpoint] = (),
    proto: Protocol = Protocol.TCP,
    **fields: object,
) -> ServicePortState:
    port = ServicePort(name_of(service, proto), (VIP,), 80, **fields)  # type: ignore[arg-type]
    return categorize(port, tuple(eps), NODE_NAME, None)


def proxy_state(*ports: ServicePortState) -> ProxyState:
    return ProxyState(node=NODE, services={port.name: port for port in ports})


class FakeTunables:
    """Records sysctl writes; `refuse` makes every access fail like a read-only /proc/sys."""

    def __init__(self, value: int = 0, *, refuse: bool = False) -> None:
        self.values: dict[Tunable, int] = {ROUTE_LOCALNET: value}
        self.writes: list[tuple[Tunable, int]] = []
        self.refuse = refuse

    def read(self, key: Tunable) -> int:
        if self.refuse:
            raise TunableError(f"cannot read {key}: read-only file system")
        return self.values[key]

    def write(self, key: Tunable, value: int) -> None:
        self.writes.append((key, value))
        self.values[key] = value


def driven(
    fake: IptablesFake, *, localhost_nodeports: bool = True, tunables: FakeTunables | None = None
) -> Driven:
    return Driven(
        IptablesBackend(
            BackendConfig(variant="nft"),
            fake,
            localhost_nodeports=localhost_nodeports,
            tunables=tunables,
        )
    )


def send(fake: IptablesFake, src: str, dst: str, dport: int, *, hook: str = "prerouting") -> Trace:
    return trace(
        fake.tables("nft"),
        src=src,
        dst=dst,
        proto="tcp",
        dport=dport,
        hook=hook,
        local_addresses=(NODE_IP,),
    )


def synced(*ports: ServicePortState, **options: object) -> IptablesFake:
    fake = IptablesFake()
    driven(fake, **options).sync(proxy_state(*ports), FULL)  # type: ignore[arg-type]
    return fake


# -- session affinity ---------------------------------------------------------------------


def test_affinity_checks_each_endpoint_list_before_the_random_choice() -> None:
    port = state(eps=endpoints((LOCAL_EP, REMOTE_EP)), session_affinity_seconds=600)
    fake = synced(port)
    svc = render.SVC_PREFIX + render.port_hash(port.name)
    rules = fake.rules("nat", svc)
    recent = [rule for rule in rules if "--rcheck" in rule]
    assert len(recent) == 2
    assert all("--seconds 600 --reap" in rule and "--rsource" in rule for rule in recent)
    first_random = next(i for i, rule in enumerate(rules) if "statistic" in rule)
    assert max(rules.index(rule) for rule in recent) < first_random
    for endpoint in port.cluster_endpoints:
        sep = render.endpoint_chain(port.name, endpoint)
        dnat = [rule for rule in fake.rules("nat", sep) if "DNAT" in rule]
        assert dnat == [
            f"-A {sep} -p tcp -m recent --set --name {sep} --mask 255.255.255.255 --rsource "
            f"-m tcp -j DNAT --to-destination {endpoint.address()}"
        ]
    # A first connection still spreads (no entry yet), as without affinity.
    assert send(fake, POD, VIP, 80).endpoints == {f"{LOCAL_EP}:8080", f"{REMOTE_EP}:8080"}


def test_no_affinity_no_recent_match() -> None:
    fake = synced(state(eps=endpoints((LOCAL_EP, REMOTE_EP))))
    assert "recent" not in fake.save_text()


def test_affinity_rules_lose_their_comments_in_large_cluster_mode() -> None:
    port = state(eps=endpoints((LOCAL_EP, REMOTE_EP)), session_affinity_seconds=10800)
    quiet = render.render_port(
        port.name,
        port,
        render.RenderContext.build(NODE, family=IPFamily.V4, masquerade_bit=14),
        endpoint_comments=False,
    )
    assert "--rcheck" in quiet.nat_rules
    assert " -> " not in quiet.nat_rules


# -- externalTrafficPolicy: Local ----------------------------------------------------------


def local_policy(**fields: Any) -> ServicePortState:
    return state(
        eps=endpoints((LOCAL_EP,), (REMOTE_EP,)),
        node_port=NODE_PORT,
        external_ips=(EXTERNAL_IP,),
        load_balancer_ips=(LB_IP,),
        external_policy_local=True,
        **fields,
    )


@pytest.mark.parametrize(("dst", "dport"), [(EXTERNAL_IP, 80), (LB_IP, 80), (NODE_IP, NODE_PORT)])
def test_external_local_keeps_the_client_and_uses_local_endpoints_only(
    dst: str, dport: int
) -> None:
    fake = synced(local_policy())
    flow = send(fake, OUTSIDE, dst, dport)
    assert flow.endpoints == {f"{LOCAL_EP}:8080"}
    assert not flow.masqueraded


@pytest.mark.parametrize(("dst", "dport"), [(EXTERNAL_IP, 80), (LB_IP, 80), (NODE_IP, NODE_PORT)])
def test_external_local_short_circuits_pods_and_the_node_to_every_endpoint(
    dst: str, dport: int
) -> None:
    fake = synced(local_policy())
    pod = send(fake, POD, dst, dport)
    assert pod.endpoints == {f"{LOCAL_EP}:8080", f"{REMOTE_EP}:8080"}
    assert not pod.masqueraded
    node = send(fake, NODE_IP, dst, dport, hook="output")
    assert node.endpoints == {f"{LOCAL_EP}:8080", f"{REMOTE_EP}:8080"}
    assert node.masqueraded


@pytest.mark.parametrize(("dst", "dport"), [(EXTERNAL_IP, 80), (LB_IP, 80), (NODE_IP, NODE_PORT)])
def test_external_local_without_a_local_endpoint_drops_outside_traffic(
    dst: str, dport: int
) -> None:
    port = state(
        eps=endpoints((), (REMOTE_EP,)),
        node_port=NODE_PORT,
        external_ips=(EXTERNAL_IP,),
        load_balancer_ips=(LB_IP,),
        external_policy_local=True,
    )
    fake = synced(port)
    assert send(fake, OUTSIDE, dst, dport).verdicts == {"DROP"}
    assert send(fake, POD, dst, dport).endpoints == {f"{REMOTE_EP}:8080"}


def test_both_policies_local_short_circuit_pods_to_the_cluster_wide_endpoints() -> None:
    """Upstream's chains for it: KPY-SVL holds the local endpoints (ClusterIP and
    outside traffic), KPY-SVC the cluster-wide ones, for the short-circuit only."""
    port = local_policy(internal_policy_local=True)
    fake = synced(port)
    assert send(fake, POD, VIP, 80).endpoints == {f"{LOCAL_EP}:8080"}
    assert send(fake, OUTSIDE, LB_IP, 80).endpoints == {f"{LOCAL_EP}:8080"}
    assert send(fake, POD, LB_IP, 80).endpoints == {f"{LOCAL_EP}:8080", f"{REMOTE_EP}:8080"}
    node = send(fake, NODE_IP, NODE_IP, NODE_PORT, hook="output")
    assert node.endpoints == {f"{LOCAL_EP}:8080", f"{REMOTE_EP}:8080"}
    suffix = render.port_hash(port.name)
    assert {render.SVC_PREFIX + suffix, render.SVL_PREFIX + suffix} <= set(fake.chains("nat"))
    # No local endpoint: the ClusterIP drops, outside traffic drops, pods still get in.
    none_here = state(
        eps=endpoints((), (REMOTE_EP,)),
        node_port=NODE_PORT,
        load_balancer_ips=(LB_IP,),
        internal_policy_local=True,
        external_policy_local=True,
    )
    fake = synced(none_here)
    assert send(fake, POD, VIP, 80).verdicts == {"DROP"}
    assert send(fake, OUTSIDE, LB_IP, 80).verdicts == {"DROP"}
    assert send(fake, POD, LB_IP, 80).endpoints == {f"{REMOTE_EP}:8080"}


def test_external_cluster_policy_masquerades_external_ip_traffic() -> None:
    fake = synced(state(eps=endpoints((LOCAL_EP,), (REMOTE_EP,)), external_ips=(EXTERNAL_IP,)))
    flow = send(fake, OUTSIDE, EXTERNAL_IP, 80)
    assert flow.endpoints == {f"{LOCAL_EP}:8080", f"{REMOTE_EP}:8080"}
    assert flow.masqueraded


def test_external_ip_without_endpoints_is_rejected() -> None:
    fake = synced(state(external_ips=(EXTERNAL_IP,), load_balancer_ips=(LB_IP,)))
    assert send(fake, OUTSIDE, EXTERNAL_IP, 80).verdicts == {"REJECT"}
    assert send(fake, OUTSIDE, LB_IP, 80).verdicts == {"REJECT"}


# -- internalTrafficPolicy: Local ----------------------------------------------------------


def test_internal_local_without_a_local_endpoint_drops_not_rejects() -> None:
    fake = synced(state(eps=endpoints((), (REMOTE_EP,)), internal_policy_local=True))
    assert send(fake, POD, VIP, 80).verdicts == {"DROP"}


def test_internal_local_uses_the_local_endpoint_only() -> None:
    fake = synced(state(eps=endpoints((LOCAL_EP,), (REMOTE_EP,)), internal_policy_local=True))
    assert send(fake, POD, VIP, 80).endpoints == {f"{LOCAL_EP}:8080"}


def test_internal_local_with_no_endpoint_anywhere_rejects() -> None:
    fake = synced(state(internal_policy_local=True))
    assert send(fake, POD, VIP, 80).verdicts == {"REJECT"}


# -- load balancer source ranges -----------------------------------------------------------


def test_source_ranges_allow_listed_clients_and_drop_the_rest() -> None:
    port = state(
        eps=endpoints((LOCAL_EP,)),
        load_balancer_ips=(LB_IP,),
        load_balancer_source_ranges=("198.18.200.0/24",),
    )
    fake = synced(port)
    assert send(fake, OUTSIDE, LB_IP, 80).endpoints == {f"{LOCAL_EP}:8080"}
    assert send(fake, POD, LB_IP, 80).verdicts == {"DROP"}
    # The node's address is in no range: the node is refused too.
    assert send(fake, NODE_IP, LB_IP, 80, hook="output").verdicts == {"DROP"}
    # The ClusterIP is not subject to the ranges.
    assert send(fake, POD, VIP, 80).endpoints == {f"{LOCAL_EP}:8080"}


def test_a_range_holding_the_node_lets_the_node_and_the_lb_ip_itself_in() -> None:
    port = state(
        eps=endpoints((LOCAL_EP,)),
        load_balancer_ips=(LB_IP,),
        load_balancer_source_ranges=("198.18.200.0/24", f"{NODE_IP}/32"),
    )
    fake = synced(port)
    assert send(fake, NODE_IP, LB_IP, 80, hook="output").endpoints == {f"{LOCAL_EP}:8080"}
    fw = render.FW_PREFIX + render.port_hash(port.name)
    assert any(f"-s {LB_IP}/32" in rule for rule in fake.rules("nat", fw))


# -- localhost NodePorts -------------------------------------------------------------------


def test_localhost_nodeports_answer_on_loopback_and_set_route_localnet() -> None:
    tunables = FakeTunables(0)
    fake = synced(state(eps=endpoints(), node_port=NODE_PORT), tunables=tunables)
    flow = send(fake, "127.0.0.1", "127.0.0.1", NODE_PORT, hook="output")
    assert flow.endpoints == {f"{LOCAL_EP}:8080"}
    assert flow.masqueraded
    assert tunables.writes == [(ROUTE_LOCALNET, 1)]
    martian = fake.rules("filter", render.FIREWALL)
    assert martian and "! --ctstate RELATED,ESTABLISHED,DNAT -j DROP" in martian[0]


def test_localhost_nodeports_off_keep_loopback_out_and_leave_the_sysctl() -> None:
    tunables = FakeTunables(0)
    fake = synced(
        state(eps=endpoints(), node_port=NODE_PORT), localhost_nodeports=False, tunables=tunables
    )
    assert send(fake, "127.0.0.1", "127.0.0.1", NODE_PORT, hook="output").endpoints == set()
    assert send(fake, OUTSIDE, NODE_IP, NODE_PORT).endpoints == {f"{LOCAL_EP}:8080"}
    assert tunables.writes == []
    assert fake.rules("filter", render.FIREWALL) == []


def test_a_refused_route_localnet_is_logged_and_the_rules_still_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = synced(state(eps=endpoints(), node_port=NODE_PORT), tunables=FakeTunables(refuse=True))
    assert "localhost NodePorts will not answer" in caplog.text
    assert send(fake, OUTSIDE, NODE_IP, NODE_PORT).endpoints == {f"{LOCAL_EP}:8080"}


def test_localhost_nodeports_are_ipv4_only_and_follow_nodeport_addresses() -> None:
    v6 = NodeContext(NODE_NAME, ("fd00::1",), cluster_cidrs=("fd00:64::/64",))
    ctx6 = render.RenderContext.build(
        v6, family=IPFamily.V6, masquerade_bit=14, localhost_nodeports=True
    )
    assert not ctx6.localhost_nodeports
    scoped = NodeContext(NODE_NAME, (NODE_IP,), nodeport_addresses=("198.18.0.0/24",))
    ctx = render.RenderContext.build(
        scoped, family=IPFamily.V4, masquerade_bit=14, localhost_nodeports=True
    )
    assert not ctx.localhost_nodeports
    with_lo = NodeContext(NODE_NAME, (NODE_IP,), nodeport_addresses=("127.0.0.0/8",))
    ctx = render.RenderContext.build(
        with_lo, family=IPFamily.V4, masquerade_bit=14, localhost_nodeports=True
    )
    assert ctx.localhost_nodeports


# -- SCTP ----------------------------------------------------------------------------------


def test_sctp_ports_render_with_the_sctp_match() -> None:
    port = state(eps=endpoints(), proto=Protocol.SCTP, node_port=NODE_PORT)
    fake = synced(port)
    flow = trace(fake.tables("nft"), src=POD, dst=VIP, proto="sctp", dport=80)
    assert flow.endpoints == {f"{LOCAL_EP}:8080"}
    assert '-p sctp -m comment --comment "shop/web:http cluster IP" -m sctp --dport 80' in (
        fake.save_text()
    )


# -- partial syncs -------------------------------------------------------------------------


def test_partial_syncs_of_every_feature_end_where_a_full_sync_would() -> None:
    """Turn each feature on, change it, and off again through partial syncs only."""
    steps = [
        state(eps=endpoints((LOCAL_EP,), (REMOTE_EP,))),
        local_policy(session_affinity_seconds=60),
        local_policy(load_balancer_source_ranges=("198.18.200.0/24",)),
        state(
            eps=endpoints((), (REMOTE_EP,)),
            node_port=NODE_PORT,
            load_balancer_ips=(LB_IP,),
            load_balancer_source_ranges=("198.18.200.0/24", f"{NODE_IP}/32"),
            external_policy_local=True,
        ),
        state(eps=endpoints((), (REMOTE_EP,)), internal_policy_local=True),
        local_policy(internal_policy_local=True, session_affinity_seconds=30),
        state(external_ips=(EXTERNAL_IP,), load_balancer_ips=(LB_IP,), node_port=NODE_PORT),
        state(eps=endpoints((LOCAL_EP,)), external_ips=(EXTERNAL_IP,)),
    ]
    fake = IptablesFake()
    backend = driven(fake, tunables=FakeTunables(1))
    backend.sync(proxy_state(steps[0]), FULL)
    for step in steps[1:]:
        backend.sync(proxy_state(step), SyncHint(full=False, changed=frozenset({step.name})))
        fresh = IptablesFake()
        driven(fresh, tunables=FakeTunables(1)).sync(proxy_state(step), FULL)
        assert sorted(fake.save_text().splitlines()) == sorted(fresh.save_text().splitlines())
