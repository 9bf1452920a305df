"""The iptables backend against the stateful fake: packets first, restore text second.

Most tests state what happens to a packet ("from pod 198.18.64.5 to 198.19.0.10:80/TCP
lands on {198.18.64.7:8080, 198.18.64.8:8080}, not masqueraded"); the rest assert on
the restore input where *what is written* is the point (partial syncs, deletions,
failures).

Addresses: node 198.18.0.1, pods in the cluster CIDR 198.18.64.0/18, service VIPs
in 198.19.0.0/24, an outside client at 198.18.200.9.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from proxy.backends.base import BackendConfig, BackendError, available, create
from proxy.backends.iptables import backend as backend_module
from proxy.backends.iptables import render
from proxy.backends.iptables.backend import IptablesBackend, offending_lines
from proxy.kernel.commands import CommandResult, Input
from proxy.kernel.iptables import Variant, failed_line
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
from tests.fakes.driver import Driven
from tests.fakes.iptables_fake import IptablesFake
from tests.fakes.packet_flow import Trace, trace

NODE_IP = "198.18.0.1"
POD = "198.18.64.5"
OUTSIDE = "198.18.200.9"
NODE = NodeContext("node-a", (NODE_IP,), cluster_cidrs=("198.18.64.0/18",))
FULL = SyncHint(full=True)

FOREIGN = (
    "*nat\n:DOCKER - [0:0]\n:CNI-HOSTPORT-DNAT - [0:0]\n:KUBE-SERVICES - [0:0]\n"
    "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n"
    "-A DOCKER -d 198.18.99.1/32 -j RETURN\n"
    "-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 8443 -j DNAT --to-destination 198.18.99.2:443\n"
    "-A KUBE-SERVICES -d 198.18.99.3/32 -j RETURN\n"
    "COMMIT\n"
    "*filter\n:DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\n"
    "-A DOCKER-USER -s 198.18.99.4/32 -j DROP\nCOMMIT\n"
)


def name_of(
    service: str = "web", port: str = "http", proto: Protocol = Protocol.TCP
) -> ServicePortName:
    return ServicePortName(ServiceKey("shop", service), port, proto)


def port_state(
    name: ServicePortName,
    vip: str = "198.19.0.10",
    *,
    port: int = 80,
    node_port: int = 0,
    endpoints: Sequence[str] = (),
    target_port: int = 8080,
    external: Sequence[str] | None = None,
    external_policy_local: bool = False,
) -> ServicePortState:
    cluster = tuple(Endpoint(ip, target_port) for ip in endpoints)
    outside = cluster if external is None else tuple(Endpoint(ip, target_port) for ip in external)
    service_port = ServicePort(
        name, (vip,), port, node_port=node_port, external_policy_local=external_policy_local
    )
    return ServicePortState(service_port, cluster, outside, cluster)


def proxy_state(*ports: ServicePortState, node: NodeContext = NODE) -> ProxyState:
    return ProxyState(node=node, services={state.name: state for state in ports})


def partial(*names: ServicePortName) -> SyncHint:
    return SyncHint(full=False, changed=frozenset(names))


def backend(
    fake: IptablesFake,
    variant: str | None = "nft",
    *,
    environ: Mapping[str, str] | None = None,
    config: BackendConfig | None = None,
) -> Driven:
    config = config or BackendConfig(variant=variant)
    return Driven(IptablesBackend(config, fake, environ=environ))


def send(
    fake: IptablesFake,
    src: str,
    dst: str,
    dport: int,
    proto: str = "tcp",
    *,
    hook: str = "prerouting",
    variant: str = "nft",
) -> Trace:
    return trace(
        fake.tables(variant),
        src=src,
        dst=dst,
        proto=proto,
        dport=dport,
        hook=hook,
        local_addresses=(NODE_IP,),
    )


@pytest.fixture
def fake() -> IptablesFake:
    made = IptablesFake()
    made.seed(FOREIGN)
    return made


def foreign_lines(fake: IptablesFake) -> list[str]:
    """Every nat and filter line that is not ours, as iptables-save prints them."""
    text = fake.save_text(table="nat") + fake.save_text(table="filter")
    return [line for line in text.splitlines() if "KPY-" not in line]


# -- traffic ---------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", [Protocol.TCP, Protocol.UDP, Protocol.SCTP])
def test_cluster_ip_lands_on_every_endpoint_without_masquerade(
    fake: IptablesFake, proto: Protocol
) -> None:
    name = name_of(proto=proto)
    backend(fake).sync(
        proxy_state(port_state(name, endpoints=("198.18.64.7", "198.18.64.8"))), FULL
    )
    flow = send(fake, POD, "198.19.0.10", 80, proto.value.lower())
    assert flow.endpoints == {"198.18.64.7:8080", "198.18.64.8:8080"}
    assert not flow.masqueraded
    assert flow.probabilities() == pytest.approx({"198.18.64.7:8080": 0.5, "198.18.64.8:8080": 0.5})
    other_proto = "udp" if proto is Protocol.TCP else "tcp"
    assert send(fake, POD, "198.19.0.10", 80, other_proto).endpoints == set()


def test_each_port_of_a_service_goes_to_its_own_target_port(fake: IptablesFake) -> None:
    http, metrics = name_of(port="http"), name_of(port="metrics")
    backend(fake).sync(
        proxy_state(
            port_state(http, endpoints=("198.18.64.7",), target_port=8080),
            port_state(metrics, port=9090, endpoints=("198.18.64.7",), target_port=9100),
        ),
        FULL,
    )
    assert send(fake, POD, "198.19.0.10", 80).endpoints == {"198.18.64.7:8080"}
    assert send(fake, POD, "198.19.0.10", 9090).endpoints == {"198.18.64.7:9100"}
    assert send(fake, POD, "198.19.0.10", 81).endpoints == set()


@pytest.mark.parametrize("proto", [Protocol.TCP, Protocol.UDP, Protocol.SCTP])
def test_nodeport_from_outside_is_masqueraded_to_every_endpoint(
    fake: IptablesFake, proto: Protocol
) -> None:
    name = name_of(proto=proto)
    backend(fake).sync(
        proxy_state(port_state(name, node_port=30080, endpoints=("198.18.64.7", "198.18.64.8"))),
        FULL,
    )
    flow = send(fake, OUTSIDE, NODE_IP, 30080, proto.value.lower())
    assert flow.endpoints == {"198.18.64.7:8080", "198.18.64.8:8080"}
    assert flow.masqueraded
    # The node port only exists on local addresses.
    assert send(fake, OUTSIDE, "198.18.5.5", 30080, proto.value.lower()).endpoints == set()


def test_nodeport_from_the_node_itself(fake: IptablesFake) -> None:
    name = name_of()
    backend(fake).sync(
        proxy_state(port_state(name, node_port=30080, endpoints=("198.18.64.7",))), FULL
    )
    flow = send(fake, NODE_IP, NODE_IP, 30080, hook="output")
    assert flow.endpoints == {"198.18.64.7:8080"}
    assert flow.masqueraded


def test_service_without_endpoints_is_rejected_on_every_path(fake: IptablesFake) -> None:
    name = name_of()
    backend(fake).sync(proxy_state(port_state(name, node_port=30080)), FULL)
    assert send(fake, POD, "198.19.0.10", 80).rejected
    assert send(fake, NODE_IP, "198.19.0.10", 80, hook="output").rejected
    assert send(fake, OUTSIDE, NODE_IP, 30080).rejected
    assert not send(fake, POD, "198.19.0.10", 81).rejected


def test_traffic_from_outside_the_cluster_cidr_is_masqueraded(fake: IptablesFake) -> None:
    name = name_of()
    backend(fake).sync(proxy_state(port_state(name, endpoints=("198.18.64.7",))), FULL)
    assert send(fake, OUTSIDE, "198.19.0.10", 80).masqueraded
    assert send(fake, NODE_IP, "198.19.0.10", 80, hook="output").masqueraded
    assert not send(fake, POD, "198.19.0.10", 80).masqueraded


def test_masquerade_all_masquerades_pod_traffic_too(fake: IptablesFake) -> None:
    name = name_of()
    node = NodeContext("node-a", (NODE_IP,), cluster_cidrs=NODE.cluster_cidrs, masquerade_all=True)
    backend(fake).sync(proxy_state(port_state(name, endpoints=("198.18.64.7",)), node=node), FULL)
    flow = send(fake, POD, "198.19.0.10", 80)
    assert flow.endpoints == {"198.18.64.7:8080"}
    assert flow.masqueraded


def test_hairpin_a_pod_reaching_itself_is_masqueraded(fake: IptablesFake) -> None:
    name = name_of()
    backend(fake).sync(
        proxy_state(port_state(name, endpoints=("198.18.64.7", "198.18.64.8"))), FULL
    )
    flow = send(fake, "198.18.64.7", "198.19.0.10", 80)
    assert flow.endpoints == {"198.18.64.7:8080", "198.18.64.8:8080"}
    assert flow.masqueraded_endpoints == {"198.18.64.7:8080"}


def test_local_external_policy_keeps_the_client_address(fake: IptablesFake) -> None:
    name = name_of()
    state = port_state(
        name,
        node_port=30080,
        endpoints=("198.18.64.7", "198.18.65.9"),
        external=("198.18.64.7",),
        external_policy_local=True,
    )
    backend(fake).sync(proxy_state(state), FULL)
    from_outside = send(fake, OUTSIDE, NODE_IP, 30080)
    assert from_outside.endpoints == {"198.18.64.7:8080"}
    assert not from_outside.masqueraded
    from_pod = send(fake, POD, NODE_IP, 30080)
    assert from_pod.endpoints == {"198.18.64.7:8080", "198.18.65.9:8080"}
    from_node = send(fake, NODE_IP, NODE_IP, 30080, hook="output")
    assert from_node.endpoints == {"198.18.64.7:8080", "198.18.65.9:8080"}
    assert from_node.masqueraded


def test_local_external_policy_without_local_endpoints_drops_outside_traffic(
    fake: IptablesFake,
) -> None:
    name = name_of()
    state = port_state(
        name, node_port=30080, endpoints=("198.18.65.9",), external=(), external_policy_local=True
    )
    backend(fake).sync(proxy_state(state), FULL)
    assert send(fake, OUTSIDE, NODE_IP, 30080).dropped
    assert send(fake, POD, NODE_IP, 30080).endpoints == {"198.18.65.9:8080"}


def test_nodeport_addresses_limit_where_node_ports_answer(fake: IptablesFake) -> None:
    name = name_of()
    node = NodeContext(
        "node-a",
        (NODE_IP, "198.18.1.1"),
        cluster_cidrs=NODE.cluster_cidrs,
        nodeport_addresses=("198.18.0.0/24",),
    )
    backend(fake).sync(
        proxy_state(port_state(name, node_port=30080, endpoints=("198.18.64.7",)), node=node), FULL
    )
    local = (NODE_IP, "198.18.1.1")
    inside = trace(
        fake.tables(), src=OUTSIDE, dst=NODE_IP, proto="tcp", dport=30080, local_addresses=local
    )
    assert inside.endpoints == {"198.18.64.7:8080"}
    outside = trace(
        fake.tables(),
        src=OUTSIDE,
        dst="198.18.1.1",
        proto="tcp",
        dport=30080,
        local_addresses=local,
    )
    assert outside.endpoints == set()


# -- what is written ---------------------------------------------------------------------------


def test_jump_rules_are_ensured_once_and_foreign_rules_stay_byte_identical(
    fake: IptablesFake,
) -> None:
    before = foreign_lines(fake)
    proxy = backend(fake)
    state = proxy_state(port_state(name_of(), endpoints=("198.18.64.7",)))
    proxy.sync(state, FULL)
    proxy.sync(state, FULL)
    assert foreign_lines(fake) == before
    prerouting = fake.rules("nat", "PREROUTING")
    assert prerouting == [
        '-A PREROUTING -m comment --comment "kpy service portals" -j KPY-SERVICES',
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
    ]
    for jump in render.JUMP_RULES:
        chain_rules = fake.rules(jump.table, jump.chain)
        assert sum(rule.endswith(f"-j {jump.spec[-1]}") for rule in chain_rules) == 1


def test_jumps_are_inserted_in_the_restore_only_when_missing(fake: IptablesFake) -> None:
    proxy = backend(fake)
    state = proxy_state(port_state(name_of(), endpoints=("198.18.64.7",)))
    proxy.sync(state, FULL)
    inserted = [line for line in fake.restore_inputs[-1].splitlines() if line.startswith("-I ")]
    assert len(inserted) == len(render.JUMP_RULES)

    # Steady state: the saved tables show every jump; no single-rule command runs.
    calls_before = len(fake.calls)
    proxy.sync(state, FULL)
    assert "\n-I " not in fake.restore_inputs[-1]
    assert [
        call for call in fake.calls[calls_before:] if not call[0].endswith(("-save", "-restore"))
    ] == []

    # Someone deletes one jump: the next full sync puts back that one only.
    spec = render.JUMP_RULES[0].spec
    assert fake.run(["iptables-nft", "-t", "nat", "-D", "PREROUTING", *spec]).ok
    assert send(fake, POD, "198.19.0.10", 80).endpoints == set()
    proxy.sync(state, FULL)
    inserted = [line for line in fake.restore_inputs[-1].splitlines() if line.startswith("-I ")]
    assert inserted == [
        '-I PREROUTING 1 -m comment --comment "kpy service portals" -j KPY-SERVICES'
    ]
    assert send(fake, POD, "198.19.0.10", 80).endpoints == {"198.18.64.7:8080"}


def test_partial_sync_rewrites_only_the_changed_port(fake: IptablesFake) -> None:
    web, api = name_of("web"), name_of("api")
    proxy = backend(fake)
    proxy.sync(
        proxy_state(
            port_state(web, endpoints=("198.18.64.7",)),
            port_state(api, "198.19.0.11", endpoints=("198.18.64.8",)),
        ),
        FULL,
    )
    proxy.sync(
        proxy_state(
            port_state(web, endpoints=("198.18.64.7",)),
            port_state(api, "198.19.0.11", endpoints=("198.18.64.8", "198.18.64.9")),
        ),
        partial(api),
    )
    text = fake.restore_inputs[-1]
    web_svc, api_svc = f"KPY-SVC-{render.port_hash(web)}", f"KPY-SVC-{render.port_hash(api)}"
    assert f":{api_svc} - [0:0]" in text
    assert f":{web_svc} - [0:0]" not in text
    assert f"-A {web_svc} " not in text
    assert f"-j {web_svc}" not in text  # the shared chains are edited, not rewritten
    assert ":KPY-SERVICES" not in text
    assert "*filter" not in text
    assert "*mangle" not in text
    assert "KPY-POSTROUTING" not in text
    assert "-X " not in text
    assert send(fake, POD, "198.19.0.11", 80).endpoints == {"198.18.64.8:8080", "198.18.64.9:8080"}
    assert send(fake, POD, "198.19.0.10", 80).endpoints == {"198.18.64.7:8080"}


def test_partial_sync_with_nothing_changed_writes_nothing(fake: IptablesFake) -> None:
    web = name_of()
    proxy = backend(fake)
    state = proxy_state(port_state(web, endpoints=("198.18.64.7",)))
    proxy.sync(state, FULL)
    restores = len(fake.restore_inputs)
    proxy.sync(state, partial())
    assert len(fake.restore_inputs) == restores


def test_partial_sync_trusts_the_hint(fake: IptablesFake) -> None:
    """The seam's contract: ports not named in hint.changed are not even looked at."""
    web, api = name_of("web"), name_of("api")
    proxy = backend(fake)
    proxy.sync(proxy_state(port_state(web, endpoints=("198.18.64.7",))), FULL)
    unnamed = proxy_state(
        port_state(web, endpoints=("198.18.64.7",)),
        port_state(api, "198.19.0.11", endpoints=("198.18.64.8",)),
    )
    proxy.sync(unnamed, partial())
    assert send(fake, POD, "198.19.0.11", 80).endpoints == set()
    proxy.backend.sync(unnamed, partial(api))  # named now, new since the last sync
    assert send(fake, POD, "198.19.0.11", 80).endpoints == {"198.18.64.8:8080"}


def test_a_port_whose_rules_did_not_change_is_not_rewritten(fake: IptablesFake) -> None:
    web = name_of()
    proxy = backend(fake)
    state = port_state(web, endpoints=("198.18.64.7",))
    proxy.sync(proxy_state(state), FULL)
    restores = len(fake.restore_inputs)
    # Only an endpoint nobody may use changed: same rules, nothing to write.
    unready = Endpoint("198.18.64.9", 8080, ready=False, serving=False)
    changed = ServicePortState(
        state.port,
        state.cluster_endpoints,
        state.external_endpoints,
        (*state.all_endpoints, unready),
    )
    proxy.sync(proxy_state(changed), partial(web))
    assert len(fake.restore_inputs) == restores


def test_removed_service_chains_are_deleted(fake: IptablesFake) -> None:
    web, api = name_of("web"), name_of("api")
    proxy = backend(fake)
    proxy.sync(
        proxy_state(
            port_state(web, node_port=30080, endpoints=("198.18.64.7",)),
            port_state(api, "198.19.0.11", endpoints=("198.18.64.8",)),
        ),
        FULL,
    )
    suffix = render.port_hash(web)
    web_chains = {
        f"KPY-SVC-{suffix}",
        f"KPY-EXT-{suffix}",
        render.endpoint_chain(web, Endpoint("198.18.64.7", 8080)),
    }
    assert web_chains <= set(fake.chains("nat"))
    proxy.sync(
        proxy_state(port_state(api, "198.19.0.11", endpoints=("198.18.64.8",))), partial(web)
    )
    text = fake.restore_inputs[-1]
    assert {line[3:] for line in text.splitlines() if line.startswith("-X ")} == web_chains
    assert not web_chains & set(fake.chains("nat"))
    assert send(fake, POD, "198.19.0.10", 80).endpoints == set()
    assert send(fake, OUTSIDE, NODE_IP, 30080).endpoints == set()
    assert send(fake, POD, "198.19.0.11", 80).endpoints == {"198.18.64.8:8080"}


def test_a_vanished_endpoint_loses_its_chain(fake: IptablesFake) -> None:
    web = name_of()
    gone = render.endpoint_chain(web, Endpoint("198.18.64.8", 8080))
    proxy = backend(fake)
    proxy.sync(proxy_state(port_state(web, endpoints=("198.18.64.7", "198.18.64.8"))), FULL)
    assert gone in fake.chains("nat")
    proxy.sync(proxy_state(port_state(web, endpoints=("198.18.64.7",))), partial(web))
    assert f"-X {gone}\n" in fake.restore_inputs[-1]
    assert gone not in fake.chains("nat")
    assert send(fake, POD, "198.19.0.10", 80).endpoints == {"198.18.64.7:8080"}


def test_last_endpoint_gone_turns_the_service_into_a_reject(fake: IptablesFake) -> None:
    web = name_of()
    proxy = backend(fake)
    proxy.sync(proxy_state(port_state(web, endpoints=("198.18.64.7",))), FULL)
    proxy.sync(proxy_state(port_state(web)), partial(web))
    assert send(fake, POD, "198.19.0.10", 80).rejected
    assert not [chain for chain in fake.chains("nat") if chain.startswith(("KPY-SVC", "KPY-SEP"))]
    proxy.sync(proxy_state(port_state(web, endpoints=("198.18.64.9",))), partial(web))
    assert send(fake, POD, "198.19.0.10", 80).endpoints == {"198.18.64.9:8080"}


def test_full_sync_deletes_chains_an_earlier_process_left_behind(fake: IptablesFake) -> None:
    web, old = name_of("web"), name_of("old")
    backend(fake).sync(
        proxy_state(
            port_state(web, endpoints=("198.18.64.7",)),
            port_state(old, "198.19.0.12", endpoints=("198.18.64.9",)),
        ),
        FULL,
    )
    restarted = backend(fake)
    restarted.sync(proxy_state(port_state(web, endpoints=("198.18.64.7",))), FULL)
    old_chains = [chain for chain in fake.chains("nat") if render.port_hash(old) in chain]
    assert old_chains == []
    assert render.endpoint_chain(old, Endpoint("198.18.64.9", 8080)) not in fake.chains("nat")
    assert send(fake, POD, "198.19.0.12", 80).endpoints == set()


def test_partial_hint_without_memory_of_a_successful_sync_is_done_fully(fake: IptablesFake) -> None:
    web = name_of()
    backend(fake).sync(proxy_state(port_state(web, endpoints=("198.18.64.7",))), partial(web))
    assert fake.restore_inputs[-1].endswith("*mangle\n:KPY-PROXY-CANARY - [0:0]\nCOMMIT\n")
    assert send(fake, POD, "198.19.0.10", 80).endpoints == {"198.18.64.7:8080"}


def test_a_changed_node_context_forces_a_full_sync(fake: IptablesFake) -> None:
    web = name_of()
    proxy = backend(fake)
    proxy.sync(proxy_state(port_state(web, endpoints=("198.18.64.7",))), FULL)
    node = NodeContext("node-a", (NODE_IP,), cluster_cidrs=("198.18.64.0/17",))
    restores = len(fake.restore_inputs)
    proxy.sync(proxy_state(port_state(web, endpoints=("198.18.64.7",)), node=node), partial())
    written = "".join(fake.restore_inputs[restores:])
    assert written.endswith("*mangle\n:KPY-PROXY-CANARY - [0:0]\nCOMMIT\n")
    assert "! -s 198.18.0.0/17" in written


# -- failures ----------------------------------------------------------------------------------


def test_a_refused_restore_reports_offending_lines_and_the_next_sync_is_full() -> None:
    fake = IptablesFake()
    web = name_of()
    proxy = backend(fake)
    proxy.sync(proxy_state(port_state(web, endpoints=("198.18.64.7", "198.18.64.8"))), FULL)
    # Someone else jumps into one of our endpoint chains: deleting it must fail.
    sep = render.endpoint_chain(web, Endpoint("198.18.64.8", 8080))
    fake.seed(f"*nat\n:SOMEONE - [0:0]\n-A SOMEONE -j {sep}\nCOMMIT\n")

    with pytest.raises(BackendError) as failure:
        proxy.sync(proxy_state(port_state(web, endpoints=("198.18.64.7",))), partial(web))
    assert "iptables-nft-restore failed" in str(failure.value)
    assert any(line.endswith(f"-X {sep}") for line in failure.value.offending_lines)
    assert len(failure.value.offending_lines) <= 5

    fake.run(["iptables-nft", "-t", "nat", "-F", "SOMEONE"])
    proxy.sync(proxy_state(port_state(web, endpoints=("198.18.64.7",))), partial())
    last = fake.restore_inputs[-1]
    assert last.endswith("*mangle\n:KPY-PROXY-CANARY - [0:0]\nCOMMIT\n"), "the next sync is full"
    assert sep not in fake.chains("nat")


def test_a_kernel_refusal_in_legacy_names_the_commit_line() -> None:
    fake = IptablesFake()
    fake.refuse("--random-fully")
    proxy = backend(fake, "legacy")
    with pytest.raises(BackendError) as failure:
        proxy.sync(proxy_state(port_state(name_of(), endpoints=("198.18.64.7",))), FULL)
    assert failure.value.offending_lines
    assert "random-fully" in " ".join(failure.value.offending_lines)


def test_the_xtables_lock_is_retried_then_reported() -> None:
    fake = IptablesFake()
    proxy = backend(fake)
    state = proxy_state(port_state(name_of(), endpoints=("198.18.64.7",)))
    fake.hold_lock(1)
    proxy.sync(state, FULL)  # one busy attempt is retried
    fake.hold_lock(2)
    moved = proxy_state(port_state(name_of(), endpoints=("198.18.64.8",)))
    with pytest.raises(BackendError, match="xtables lock held by another process"):
        proxy.sync(moved, partial(name_of()))
    proxy.sync(moved, partial(name_of()))
    assert fake.restore_inputs[-1].endswith("*mangle\n:KPY-PROXY-CANARY - [0:0]\nCOMMIT\n")
    assert send(fake, POD, "198.19.0.10", 80).endpoints == {"198.18.64.8:8080"}


def test_failed_line_understands_every_format_iptables_prints() -> None:
    assert failed_line("iptables-restore: line 12 failed\n") == 12
    assert failed_line("iptables-nft-restore v1.8.9 (nf_tables): \nline 3: CHAIN_DEL failed") == 3
    assert failed_line('x: unknown option "--bogus"\nError occurred at line: 7\nTry ...') == 7
    assert failed_line("iptables-restore: COMMIT expected at line 4\n") == 4
    assert failed_line("Another app is currently holding the xtables lock.") is None


def test_offending_lines_show_the_refused_line_and_its_neighbours() -> None:
    text = "".join(f"line{number}\n" for number in range(1, 11))
    assert offending_lines(text, 5) == ["3: line3", "4: line4", "5: line5", "6: line6", "7: line7"]
    assert offending_lines(text, 1) == ["1: line1", "2: line2", "3: line3"]
    assert offending_lines(text, None) == []


# -- drift and cleanup --------------------------------------------------------------------------


def test_drifted_when_the_canary_is_gone(fake: IptablesFake) -> None:
    proxy = backend(fake)
    assert proxy.drifted()
    proxy.sync(proxy_state(port_state(name_of(), endpoints=("198.18.64.7",))), FULL)
    assert not proxy.drifted()
    assert fake.run(["iptables-nft", "-t", "mangle", "-X", "KPY-PROXY-CANARY"]).ok
    assert proxy.drifted()


def test_cleanup_removes_everything_of_ours_and_is_idempotent(fake: IptablesFake) -> None:
    proxy = backend(fake)
    proxy.sync(
        proxy_state(port_state(name_of(), node_port=30080, endpoints=("198.18.64.7",))), FULL
    )
    assert proxy.cleanup() is True
    assert "KPY-" not in fake.save_text()
    assert proxy.cleanup() is False


def test_cleanup_leaves_foreign_tables_byte_identical(fake: IptablesFake) -> None:
    before = fake.save_text(table="nat") + fake.save_text(table="filter")
    proxy = backend(fake)
    proxy.sync(proxy_state(port_state(name_of(), endpoints=("198.18.64.7",))), FULL)
    proxy.cleanup()
    assert fake.save_text(table="nat") + fake.save_text(table="filter") == before


def test_cleanup_with_no_tables_at_all_is_fine() -> None:
    assert backend(IptablesFake()).cleanup() is False
    assert backend(IptablesFake(installed=("nft",)), None).cleanup() is False


def test_cleanup_without_a_variant_cleans_both() -> None:
    fake = IptablesFake()
    state = proxy_state(port_state(name_of(), endpoints=("198.18.64.7",)))
    backend(fake, "nft").sync(state, FULL)
    backend(fake, "legacy").sync(state, FULL)
    assert backend(fake, None, environ={}).cleanup() is True
    for variant in ("nft", "legacy"):
        assert not [c for c in fake.chains("nat", variant=variant) if c.startswith("KPY-")]


# -- variant selection ---------------------------------------------------------------------------


def test_configured_variant_is_used_without_probing() -> None:
    fake = IptablesFake()
    proxy = backend(fake, "legacy")
    proxy.sync(proxy_state(), FULL)
    assert proxy.variant is Variant.LEGACY
    assert all(not call[0].startswith("iptables-nft") for call in fake.calls)


def test_environment_forces_the_variant() -> None:
    proxy = backend(IptablesFake(), None, environ={"KPY_IPTABLES_MODE": "legacy"})
    assert proxy.variant is Variant.LEGACY
    with pytest.raises(ValueError, match="not one of nft, legacy"):
        backend(IptablesFake(), None, environ={"KPY_IPTABLES_MODE": "ebpf"})


def test_auto_prefers_the_variant_holding_kube_chains() -> None:
    fake = IptablesFake()
    fake.seed("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n", variant="legacy")
    fake.seed(  # more rules, but no kube chains
        "*filter\n-A FORWARD -j ACCEPT\n-A INPUT -j ACCEPT\n-A OUTPUT -j ACCEPT\nCOMMIT\n",
        variant="nft",
    )
    assert backend(fake, None, environ={}).variant is Variant.LEGACY


def test_auto_prefers_the_variant_holding_more_rules() -> None:
    fake = IptablesFake()
    fake.seed("*filter\n-A FORWARD -j ACCEPT\n-A INPUT -j ACCEPT\nCOMMIT\n", variant="legacy")
    fake.seed("*filter\n-A FORWARD -j ACCEPT\nCOMMIT\n", variant="nft")
    assert backend(fake, None, environ={}).variant is Variant.LEGACY


def test_auto_defaults_to_nft() -> None:
    assert backend(IptablesFake(), None, environ={}).variant is Variant.NFT
    assert backend(IptablesFake(installed=("nft",)), None, environ={}).variant is Variant.NFT


def test_registered_under_iptables() -> None:
    assert "iptables" in available()
    made = create("iptables", BackendConfig(variant="nft", netns="kpy-unit-never-created"))
    assert made.name == "iptables"


# -- scale: batches, counts, large clusters -----------------------------------------------------


class RecordingMetrics:
    def __init__(self) -> None:
        self.rules: dict[str, int] = {}
        self.phases: list[str] = []

    def set_iptables_rules(self, table: str, count: int) -> None:
        self.rules[table] = count

    def observe_phase(self, phase: str, seconds: float) -> None:
        assert seconds >= 0
        self.phases.append(phase)


def many(count: int, *, first_ip: int = 1) -> list[ServicePortState]:
    return [
        port_state(
            name_of(f"svc{index}"),
            f"198.19.1.{index}",
            node_port=30100 + index if index % 2 else 0,
            endpoints=(f"198.18.64.{first_ip + index}", f"198.18.65.{first_ip + index}"),
        )
        for index in range(count)
    ]


def our_rules(fake: IptablesFake, variant: str, table: str) -> int:
    return sum(
        len(fake.rules(table, chain, variant=variant))
        for chain in fake.chains(table, variant=variant)
        if chain.startswith("KPY-")
    )


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_rule_count_metric_matches_the_kernel_through_partial_syncs(variant: str) -> None:
    fake = IptablesFake()
    metrics = RecordingMetrics()
    proxy = backend(fake, config=BackendConfig(variant=variant, metrics=metrics))
    ports = many(6)
    proxy.sync(proxy_state(*ports), FULL)
    assert metrics.rules == {
        "nat": our_rules(fake, variant, "nat"),
        "filter": our_rules(fake, variant, "filter"),
    }
    assert set(metrics.phases) == {"read", "write"}  # a full sync renders while writing
    emptied = port_state(ports[1].name, "198.19.1.1", node_port=30101)
    proxy.sync(proxy_state(ports[0], emptied, *ports[3:]), partial(ports[1].name, ports[2].name))
    assert metrics.rules == {
        "nat": our_rules(fake, variant, "nat"),
        "filter": our_rules(fake, variant, "filter"),
    }


def test_nft_full_sync_writes_port_chains_in_batches_and_legacy_in_one_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backend_module, "NFT_BATCH_CHAINS", 6)
    ports = many(10)  # 3 chains each (SVC + 2 SEP), NodePort ones 4
    for variant in ("nft", "legacy"):
        fake = IptablesFake()
        IptablesBackend(BackendConfig(variant=variant), fake).sync(proxy_state(*ports), FULL)
        inputs = fake.restore_inputs
        if variant == "legacy":
            assert len(inputs) == 1
        else:
            assert len(inputs) > 4
            assert inputs[0].startswith("*mangle\n")  # static chains first
            assert ":KPY-SERVICES - [0:0]" in inputs[-1]  # top-level chains last
            assert all(":KPY-SERVICES" not in text for text in inputs[:-1])
        for state in ports:
            vip = state.port.cluster_ips[0]
            lands = send(fake, POD, vip, 80, variant=variant).endpoints
            assert lands == {f"{ep.ip}:8080" for ep in state.cluster_endpoints}


def test_a_large_nft_partial_sync_is_batched_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_module, "NFT_BATCH_CHAINS", 6)
    fake = IptablesFake()
    proxy = backend(fake)
    proxy.sync(proxy_state(*many(10)), FULL)
    restores = len(fake.restore_inputs)
    moved = many(10, first_ip=100)
    proxy.sync(proxy_state(*moved), partial(*(state.name for state in moved)))
    assert len(fake.restore_inputs) - restores > 2
    for state in moved:
        lands = send(fake, POD, state.port.cluster_ips[0], 80).endpoints
        assert lands == {f"{ep.ip}:8080" for ep in state.cluster_endpoints}
    assert not [c for c in fake.chains("nat") if "SEP" in c and c not in _sep_chains(moved)]


def _sep_chains(states: Sequence[ServicePortState]) -> set[str]:
    return {render.endpoint_chain(s.name, ep) for s in states for ep in s.cluster_endpoints}


def test_large_cluster_mode_drops_endpoint_comments_above_the_threshold(fake: IptablesFake) -> None:
    proxy = backend(fake, config=BackendConfig(variant="nft", large_cluster_endpoints=3))
    small = many(1)
    proxy.sync(proxy_state(*small), FULL)
    assert any("->" in rule for chain in fake.chains("nat") for rule in fake.rules("nat", chain))
    grown = many(3)  # 6 endpoints > 3
    proxy.sync(proxy_state(*grown), partial(*(state.name for state in grown)))
    svc = f"KPY-SVC-{render.port_hash(grown[2].name)}"
    assert not any("->" in rule for rule in fake.rules("nat", svc))
    assert send(fake, POD, "198.19.1.2", 80).endpoints == {"198.18.64.3:8080", "198.18.65.3:8080"}


def test_a_streamed_restore_is_produced_again_for_a_retry_after_a_busy_lock() -> None:
    """A streamed input is a generator: the retry must get the whole input again."""
    fake = IptablesFake()
    proxy = backend(fake, "legacy")
    state = proxy_state(port_state(name_of(), endpoints=("198.18.64.7", "198.18.64.8")))
    real_run = fake.run
    busy = [1]

    def run(argv: Sequence[str], *, stdin: Input | None = None) -> CommandResult:
        if argv[0].endswith("-restore") and busy[0]:
            busy[0] -= 1
            fake.hold_lock(1)  # this restore finds the lock held, after reading its input
        return real_run(argv, stdin=stdin)

    fake.run = run  # type: ignore[method-assign]
    proxy.sync(state, FULL)
    assert busy == [0]
    assert [call[0] for call in fake.calls].count("iptables-legacy-restore") == 2
    retried = fake.restore_inputs[-1]
    assert retried.startswith("*nat\n") and retried.endswith("COMMIT\n")
    assert "DNAT --to-destination 198.18.64.8:8080" in retried
    assert send(fake, POD, "198.19.0.10", 80, variant="legacy").endpoints == {
        "198.18.64.7:8080",
        "198.18.64.8:8080",
    }
