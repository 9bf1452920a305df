"""Real packets through the rules a backend writes, in a namespace-built node.

Each test builds a `ProxyState` by hand, has the backend sync it into the node
namespace, and sends TCP connections and UDP datagrams from a pod, from the node
itself and from the client outside the cluster. The echo servers' answers say which
endpoint was chosen and which source address it saw, so every assertion is about
behaviour ("lands on these endpoints, masqueraded or not"), never about rule text,
except where the rule text is the point (cleanup, foreign chains).

Parametrized over `PACKET_BACKENDS` (conftest): one topology per backend variant, and
one backend instance per test, cleaned up afterwards, so tests do not depend on each
other. UDP probes use a fresh source port each time (`lab.probe`), so conntrack
entries from an earlier probe never pin a flow to an old endpoint.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pytest

from lab.netns import CLUSTER_CIDR, NODE_IP
from lab.probe import EchoReply, ProbeFailure, Proto, probe, spread
from proxy.backends.base import create as create_backend
from proxy.backends.iptables import backend as iptables_backend
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
WEB_VIP = "198.19.0.10"
EMPTY_VIP = "198.19.0.20"
SERVICE_PORT = {"tcp": 80, "udp": 53}
NODE_PORT = {"tcp": 30080, "udp": 30053}
EMPTY_NODE_PORT = {"tcp": 30081, "udp": 30054}
ECHO_PORT = {"tcp": ECHO_TCP_PORT, "udp": ECHO_UDP_PORT}
PROTOS: list[Proto] = ["tcp", "udp"]
REQUESTS = 40
"""Probes per spread; with 3 endpoints P(one unseen) = 3 * (2/3)**40, about 1e-7."""
QUICK = 0.5
"""Timeout for probes that are expected to fail."""


# ---------------------------------------------------------------- building states


def port_name(service: str, proto: Proto) -> ServicePortName:
    return ServicePortName(ServiceKey("default", service), proto, Protocol(proto.upper()))


def port_state(
    service: str,
    vip: str,
    proto: Proto,
    endpoint_ips: Iterable[str],
    *,
    node_port: int = 0,
) -> ServicePortState:
    endpoints = tuple(
        Endpoint(ip=ip, port=ECHO_PORT[proto], node_name=NODE_NAME, is_local=True)
        for ip in endpoint_ips
    )
    port = ServicePort(
        name=port_name(service, proto),
        cluster_ips=(vip,),
        port=SERVICE_PORT[proto],
        node_port=node_port,
    )
    return ServicePortState(
        port=port,
        cluster_endpoints=endpoints,
        external_endpoints=endpoints,
        all_endpoints=endpoints,
    )


def web(
    endpoint_ips: Iterable[str], protos: Sequence[Proto] = ("tcp", "udp")
) -> list[ServicePortState]:
    """The "web" service: ClusterIP WEB_VIP and a NodePort, for each protocol."""
    ips = tuple(endpoint_ips)
    return [port_state("web", WEB_VIP, p, ips, node_port=NODE_PORT[p]) for p in protos]


def empty() -> list[ServicePortState]:
    """The "empty" service: no endpoints at all, so its traffic must be rejected."""
    return [port_state("empty", EMPTY_VIP, p, (), node_port=EMPTY_NODE_PORT[p]) for p in PROTOS]


def state(ports: Iterable[ServicePortState], *, masquerade_all: bool = False) -> ProxyState:
    node = NodeContext(
        node_name=NODE_NAME,
        node_ips=(NODE_IP,),
        cluster_cidrs=(CLUSTER_CIDR,),
        masquerade_all=masquerade_all,
    )
    return ProxyState(node=node, services={p.name: p for p in ports})


FULL = SyncHint(full=True)


def changed(*names: ServicePortName) -> SyncHint:
    return SyncHint(full=False, changed=frozenset(names))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def packet_lab(
    backend_variant: BackendVariant, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lab]:
    """Three pods with echo servers, one topology per backend variant."""
    built = build_lab(
        tmp_path_factory.mktemp(f"lab-{backend_variant.id}"), ["pod0", "pod1", "pod2"]
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


def sources(lab: Lab) -> dict[str, str]:
    """Where probes start from: a pod (in the cluster), the node, the client (outside)."""
    return {
        "pod": lab.pods["pod0"].netns,
        "node": lab.topo.node_ns,
        "client": lab.topo.client_ns,
    }


def reply_of(result: EchoReply | ProbeFailure) -> EchoReply:
    assert isinstance(result, EchoReply), result
    return result


def source_ips(netns: str, dst: str, port: int, proto: Proto, n: int = 10) -> set[str]:
    """The source addresses the endpoints saw over `n` probes."""
    return {reply_of(probe(netns, dst, port, proto)).src_ip for _ in range(n)}


def all_pods(lab: Lab) -> set[str]:
    return set(lab.pods)


# ---------------------------------------------------------------- ClusterIP and NodePort


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("origin", ["pod", "node", "client"])
def test_cluster_ip_spreads_over_every_endpoint(
    packet_lab: Lab, backend: Driven, origin: str, proto: Proto
) -> None:
    backend.sync(state(web(packet_lab.pod_ips().values())), FULL)
    seen = spread(sources(packet_lab)[origin], WEB_VIP, SERVICE_PORT[proto], proto, REQUESTS)
    assert set(seen) == all_pods(packet_lab), seen


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("origin", ["pod", "node", "client"])
def test_node_port_spreads_over_every_endpoint(
    packet_lab: Lab, backend: Driven, origin: str, proto: Proto
) -> None:
    backend.sync(state(web(packet_lab.pod_ips().values())), FULL)
    seen = spread(sources(packet_lab)[origin], NODE_IP, NODE_PORT[proto], proto, REQUESTS)
    assert set(seen) == all_pods(packet_lab), seen


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("origin", ["pod", "node", "client"])
def test_no_endpoints_is_refused_at_once(
    packet_lab: Lab, backend: Driven, origin: str, proto: Proto
) -> None:
    backend.sync(state([*web(packet_lab.pod_ips().values()), *empty()]), FULL)
    netns = sources(packet_lab)[origin]
    for dst, port in [(EMPTY_VIP, SERVICE_PORT[proto]), (NODE_IP, EMPTY_NODE_PORT[proto])]:
        started = time.monotonic()
        result = probe(netns, dst, port, proto, timeout=2.0)
        elapsed = time.monotonic() - started
        assert result == ProbeFailure("refused", "Connection refused"), (dst, port, result)
        assert elapsed < 1.0, f"{dst}:{port} took {elapsed:.2f}s to be refused"


# ---------------------------------------------------------------- source addresses


@pytest.mark.parametrize("proto", PROTOS)
def test_pod_source_is_preserved_to_a_cluster_ip(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    pod0 = packet_lab.pods["pod0"]
    # Endpoints other than pod0 itself: no hairpin, so no reason to masquerade.
    others = [pod.ip for name, pod in packet_lab.pods.items() if name != "pod0"]
    backend.sync(state(web(others)), FULL)
    assert source_ips(pod0.netns, WEB_VIP, SERVICE_PORT[proto], proto) == {pod0.ip}


@pytest.mark.parametrize("proto", PROTOS)
def test_client_is_masqueraded_to_a_cluster_ip(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    backend.sync(state(web(packet_lab.pod_ips().values())), FULL)
    seen = source_ips(packet_lab.topo.client_ns, WEB_VIP, SERVICE_PORT[proto], proto)
    assert seen <= packet_lab.topo.node_addresses, seen


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("origin", ["pod", "node", "client"])
def test_node_port_is_masqueraded(
    packet_lab: Lab, backend: Driven, origin: str, proto: Proto
) -> None:
    others = [pod.ip for name, pod in packet_lab.pods.items() if name != "pod0"]
    backend.sync(state(web(others)), FULL)
    seen = source_ips(sources(packet_lab)[origin], NODE_IP, NODE_PORT[proto], proto)
    assert seen <= packet_lab.topo.node_addresses, seen


@pytest.mark.parametrize("proto", PROTOS)
def test_hairpin_to_itself_is_answered_and_masqueraded(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    pod0 = packet_lab.pods["pod0"]
    backend.sync(state(web([pod0.ip])), FULL)
    for _ in range(5):
        reply = reply_of(probe(pod0.netns, WEB_VIP, SERVICE_PORT[proto], proto))
        assert reply.pod == "pod0"
        assert reply.src_ip in packet_lab.topo.node_addresses, reply


@pytest.mark.parametrize("proto", PROTOS)
def test_masquerade_all_masquerades_pod_traffic_too(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    pod0 = packet_lab.pods["pod0"]
    others = [pod.ip for name, pod in packet_lab.pods.items() if name != "pod0"]
    backend.sync(state(web(others), masquerade_all=True), FULL)
    seen = source_ips(pod0.netns, WEB_VIP, SERVICE_PORT[proto], proto)
    assert seen <= packet_lab.topo.node_addresses, seen


# ---------------------------------------------------------------- convergence


@pytest.mark.parametrize("proto", PROTOS)
def test_endpoint_changes_and_service_deletion_converge(
    packet_lab: Lab, backend: Driven, proto: Proto
) -> None:
    ips = packet_lab.pod_ips()
    name = port_name("web", proto)
    client = packet_lab.topo.client_ns
    port = SERVICE_PORT[proto]

    def answering() -> set[str]:
        return set(spread(client, WEB_VIP, port, proto, REQUESTS, timeout=QUICK))

    backend.sync(state(web([ips["pod0"], ips["pod1"]], [proto])), FULL)
    assert answering() == {"pod0", "pod1"}

    backend.sync(state(web([ips["pod0"], ips["pod1"], ips["pod2"]], [proto])), changed(name))
    assert answering() == {"pod0", "pod1", "pod2"}

    backend.sync(state(web([ips["pod1"], ips["pod2"]], [proto])), changed(name))
    assert answering() == {"pod1", "pod2"}

    backend.sync(state([]), changed(name))
    result = probe(client, WEB_VIP, port, proto, timeout=QUICK)
    assert isinstance(result, ProbeFailure), result
    assert result.kind in {"refused", "timeout"}


def test_partial_sync_leaves_other_services_alone(packet_lab: Lab, backend: Driven) -> None:
    ips = packet_lab.pod_ips()
    tcp_only, udp_only = web([ips["pod0"]], ["tcp"]), web([ips["pod1"]], ["udp"])
    backend.sync(state([*tcp_only, *udp_only]), FULL)
    moved = web([ips["pod2"]], ["udp"])
    backend.sync(state([*tcp_only, *moved]), changed(port_name("web", "udp")))
    pod = packet_lab.pods["pod1"].netns
    assert spread(pod, WEB_VIP, SERVICE_PORT["tcp"], "tcp", 10) == {"pod0": 10}
    assert spread(pod, WEB_VIP, SERVICE_PORT["udp"], "udp", 10) == {"pod2": 10}


# ---------------------------------------------------------------- ownership


def _saved(lab: Lab, variant: BackendVariant) -> list[str]:
    """The node's whole ruleset, normalised so that equal means unchanged."""
    out = lab.topo.run_in(lab.topo.node_ns, list(variant.save_argv))
    return variant.normalise(out.stdout)


def _foreign(lines: Iterable[str], variant: BackendVariant) -> list[str]:
    return [line for line in lines if variant.foreign_marker in line]


def _owned(lines: Iterable[str], variant: BackendVariant) -> list[str]:
    return [line for line in lines if variant.owned_marker in line]


def _run_all(lab: Lab, commands: Iterable[Sequence[str]], *, check: bool) -> None:
    for argv in commands:
        lab.topo.run_in(lab.topo.node_ns, list(argv), check=check)


def test_cleanup_removes_everything_owned_and_leaves_foreign_rules_identical(
    packet_lab: Lab, backend_variant: BackendVariant
) -> None:
    topo = packet_lab.topo
    made = create_backend(backend_variant.backend, backend_variant.config(topo.node_ns))
    try:
        _run_all(packet_lab, backend_variant.foreign_setup, check=True)
        before = _saved(packet_lab, backend_variant)
        foreign_before = _foreign(before, backend_variant)
        assert len(foreign_before) == len(backend_variant.foreign_setup), foreign_before

        made.sync(state([*web(packet_lab.pod_ips().values()), *empty()]), FULL)
        after_sync = _saved(packet_lab, backend_variant)
        assert _owned(after_sync, backend_variant), "sync wrote nothing we recognise as ours"
        assert _foreign(after_sync, backend_variant) == foreign_before
        answered = spread(topo.client_ns, WEB_VIP, SERVICE_PORT["tcp"], "tcp", 5)
        assert set(answered) <= all_pods(packet_lab), answered

        assert made.cleanup() is True
        after_cleanup = _saved(packet_lab, backend_variant)
        assert _owned(after_cleanup, backend_variant) == []
        assert _foreign(after_cleanup, backend_variant) == foreign_before
        # Not only the foreign lines: nothing at all differs from before the first sync.
        assert after_cleanup == before
        assert made.cleanup() is False
        result = probe(topo.client_ns, WEB_VIP, SERVICE_PORT["tcp"], "tcp", timeout=QUICK)
        assert isinstance(result, ProbeFailure), result
    finally:
        made.cleanup()
        _run_all(packet_lab, backend_variant.foreign_teardown, check=False)


def test_drift_is_detected_and_a_full_sync_repairs_it(
    packet_lab: Lab, backend: Driven, backend_variant: BackendVariant
) -> None:
    topo = packet_lab.topo
    desired = state(web(packet_lab.pod_ips().values()))
    backend.sync(desired, FULL)
    assert backend.drifted() is False
    _run_all(packet_lab, backend_variant.wipe, check=False)
    assert _owned(_saved(packet_lab, backend_variant), backend_variant) == []
    assert backend.drifted() is True
    backend.sync(desired, FULL)
    assert backend.drifted() is False
    seen = spread(topo.client_ns, WEB_VIP, SERVICE_PORT["tcp"], "tcp", REQUESTS)
    assert set(seen) == all_pods(packet_lab), seen


# ---------------------------------------------------------------- partial syncs on the real tools


EXTERNAL: dict[str, Any] = {"node_port": 30090, "external_ips": ("198.19.200.11",)}
BOTH_LOCAL: dict[str, Any] = {"external_policy_local": True, **EXTERNAL}
LB_RANGES: dict[str, Any] = {
    "load_balancer_ips": ("198.19.200.12",),
    "load_balancer_source_ranges": ("198.18.0.0/24",),
}


def feat(endpoint_ips: Sequence[str], local: str, **fields: Any) -> ServicePortState:
    """The "feat" service with Service features `fields`: the endpoint at `local` runs
    on this node, the others on another one."""
    eps = tuple(
        Endpoint(
            ip,
            ECHO_PORT["tcp"],
            node_name=NODE_NAME if ip == local else "node-b",
            is_local=ip == local,
        )
        for ip in endpoint_ips
    )
    port = ServicePort(port_name("feat", "tcp"), ("198.19.0.110",), 80, **fields)
    return categorize(port, eps, NODE_NAME, None)


def _our_rules(lab: Lab, variant: BackendVariant) -> dict[str, list[str]]:
    """Our rules per table and chain, each chain's rules sorted (their order is free).

    nftables: every line of our table (chains, rules, map and set elements), sorted.
    """
    if variant.backend == "nftables":
        return {"nftables": sorted(_owned(_saved(lab, variant), variant))}
    chains: dict[str, list[str]] = {}
    table = ""
    for line in _saved(lab, variant):
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(("-A KPY-", ":KPY-")):
            chain = line.split()[1] if line.startswith("-A") else line[1:].split()[0]
            chains.setdefault(f"{table} {chain}", [])
            if line.startswith("-A"):
                chains[f"{table} {chain}"].append(line)
    return {chain: sorted(rules) for chain, rules in chains.items()}


def test_partial_syncs_end_where_a_full_sync_would(
    packet_lab: Lab,
    backend: Driven,
    backend_variant: BackendVariant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Services added, emptied, refilled and removed through partial syncs, in batches
    small enough to split them (iptables-nft): the kernel ends with exactly the rules
    a fresh full sync of the final state writes (nftables: the same table, element for
    element), and the NodePorts jump stays last (iptables).

    The "feat" service walks through the Service features on the way (affinity,
    externalTrafficPolicy Local with external and LB IPs, source ranges, an emptied
    local set, internalTrafficPolicy Local) and ends with several of them, so their
    chains (iptables: KPY-FW, KPY-EXT short-circuits, `-m recent`) and their shared
    rules are also edited by partial syncs only."""
    monkeypatch.setattr(iptables_backend, "NFT_BATCH_CHAINS", 3)
    ips = packet_lab.pod_ips()
    pods = [ips["pod0"], ips["pod1"], ips["pod2"]]
    extra = [port_state(f"extra{i}", f"198.19.0.{100 + i}", "tcp", pods[i:]) for i in range(3)]
    backend.sync(state(web(pods[:1])), FULL)
    steps: list[list[ServicePortState]] = [
        [*web(pods[:1]), *extra],  # new services: rules inserted into the shared chains
        [*web(pods), *extra[:1], port_state("extra1", "198.19.0.101", "tcp", ())],  # emptied
        [*web(pods[1:]), *extra[:1], port_state("extra1", "198.19.0.101", "tcp", pods)],
        [*web(pods[1:]), *extra[:1], feat(pods, pods[0], session_affinity_seconds=300)],
        [*web(pods[1:]), feat(pods, pods[0], external_policy_local=True, **EXTERNAL)],
        [*web(pods[1:]), feat(pods, pods[0], external_policy_local=True, **LB_RANGES, **EXTERNAL)],
        [
            *web(pods[1:]),
            feat(pods[1:], pods[0], external_policy_local=True, **LB_RANGES, **EXTERNAL),
        ],
        [
            *web(pods[1:]),
            feat(pods[1:], pods[0], internal_policy_local=True, session_affinity_seconds=60),
        ],
        [*web(pods[1:]), feat(pods, pods[0], internal_policy_local=True, **BOTH_LOCAL)],
        # removed, a service that never had endpoints, and one with several features
        [*web(pods[1:]), *empty(), feat(pods, pods[0], session_affinity_seconds=60, **LB_RANGES)],
    ]
    previous: dict[ServicePortName, ServicePortState] = {p.name: p for p in web(pods[:1])}
    for ports in steps:
        current = {p.name: p for p in ports}
        names = {n for n in current.keys() | previous.keys() if current.get(n) != previous.get(n)}
        backend.sync(state(ports), changed(*names))
        previous = current
    after_partials = _our_rules(packet_lab, backend_variant)
    assert any(after_partials.values()), after_partials
    if backend_variant.backend == "iptables":
        saved = _saved(packet_lab, backend_variant)
        services = [rule for rule in saved if "-A KPY-SERVICES" in rule]
        assert "KPY-NODEPORTS" in services[-1]
    seen = spread(packet_lab.topo.client_ns, WEB_VIP, SERVICE_PORT["tcp"], "tcp", REQUESTS)
    assert set(seen) == {"pod1", "pod2"}, seen

    backend.cleanup()
    fresh = create_backend(backend_variant.backend, backend_variant.config(packet_lab.topo.node_ns))
    fresh.sync(state(steps[-1]), FULL)
    assert after_partials == _our_rules(packet_lab, backend_variant)
