"""Fixtures for kernel tests: real namespaces, real echo servers, real packets.

These tests need root (network namespaces, iptables). Off CI they skip with a reason
when not root; on CI (``$CI`` set) not being root is a failure, so they can never skip
silently there.

`Lab` bundles a `Topology` with one echo server per pod (TCP 8080, UDP 5353); the
`lab` fixture builds one per test module (and per backend variant, for modules that
use `backend_variant`), `make_lab` builds throw-away ones for tests that change the
topology. Teardown always runs, and a session-wide `cleanup_stale` first removes what a
crashed earlier run left behind. The session also gives legacy iptables a private lock
file, so another iptables user on the host cannot stall these tests; a test about lock
contention must take the lock named by ``$XTABLES_LOCKFILE``.

`PACKET_BACKENDS` is the one list a new backend joins to run every packet test.

Service features (tests/kernel/test_service_features.py): each test is marked
``@pytest.mark.feature("<name>")`` with a name from `FEATURES`. A backend that lacks a
feature declares it in `NOT_IMPLEMENTED` (by backend id); its tests for that feature then
run as strict xfail, so the declaration fails the suite the day the feature starts
working. Every feature test carries its feature and backend id as junit properties,
which `scripts/conformance.py` turns into docs/conformance.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.echo import EchoServer, start_echo
from lab.netns import Pod, Topology, cleanup_stale
from proxy.backends.base import BackendConfig

ECHO_TCP_PORT = 8080
ECHO_UDP_PORT = 5353
XTABLES_LOCK_ENV = "XTABLES_LOCKFILE"
"""Where iptables-legacy takes its lock; set per test session (see `_kernel_session`)."""


def _root_or_skip() -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        pytest.fail("kernel tests must run as root on CI (they would skip otherwise)")
    pytest.skip("kernel tests need root (network namespaces, iptables)")


@pytest.fixture(autouse=True, scope="session")
def _kernel_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Root check once, remove what a crashed earlier run left, and isolate the xtables lock.

    Legacy iptables serialises on one host-wide lock file (``/run/xtables.lock``),
    although our namespaces share no rules with anything else; another iptables user on
    the host (Docker, a second test run) would otherwise make these tests wait or fail
    at random. A private lock file (``XTABLES_LOCKFILE``, inherited by every tool the
    backends run) gives the lab node a lock of its own, as a real node has.
    """
    _root_or_skip()
    cleanup_stale()
    previous = os.environ.get(XTABLES_LOCK_ENV)
    os.environ[XTABLES_LOCK_ENV] = str(tmp_path_factory.mktemp("xtables") / "xtables.lock")
    yield
    if previous is None:
        os.environ.pop(XTABLES_LOCK_ENV, None)
    else:
        os.environ[XTABLES_LOCK_ENV] = previous


@pytest.fixture(autouse=True)
def _require_root() -> None:
    _root_or_skip()


@dataclass
class Lab:
    """A topology whose pods (and node) run echo servers."""

    topo: Topology
    log_dir: Path
    echoes: dict[str, EchoServer] = field(default_factory=dict)

    @property
    def pods(self) -> dict[str, Pod]:
        return self.topo.pods

    def pod_ips(self) -> dict[str, str]:
        return {name: pod.ip for name, pod in self.topo.pods.items()}

    def start_echo(self, name: str, netns: str) -> EchoServer:
        server = start_echo(
            netns,
            name,
            tcp_ports=(ECHO_TCP_PORT,),
            udp_ports=(ECHO_UDP_PORT,),
            log_path=self.log_dir / f"echo-{name}.log",
        )
        self.echoes[name] = server
        server.wait_listening()
        return server

    def add_pod(self, name: str) -> Pod:
        """A new pod with a listening echo server."""
        pod = self.topo.add_pod(name)
        self.start_echo(name, pod.netns)
        return pod

    def remove_pod(self, name: str) -> None:
        self.echoes.pop(name).stop()
        self.topo.remove_pod(name)

    def close(self) -> None:
        for server in self.echoes.values():
            server.stop()
        self.echoes.clear()
        self.topo.destroy()


def build_lab(log_dir: Path, pod_names: Sequence[str], *, node_echo: bool = False) -> Lab:
    log_dir.mkdir(parents=True, exist_ok=True)
    topo = Topology.create()
    lab = Lab(topo=topo, log_dir=log_dir)
    try:
        for name in pod_names:
            lab.add_pod(name)
        if node_echo:
            lab.start_echo("node", topo.node_ns)
    except BaseException:
        lab.close()
        raise
    return lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three pods with echo servers; one per module (and per backend variant)."""
    _root_or_skip()
    built = build_lab(tmp_path_factory.mktemp("lab"), ["pod0", "pod1", "pod2"])
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """Build throw-away labs inside one test; all are destroyed afterwards."""
    made: list[Lab] = []

    def make(pod_names: Sequence[str] = ("pod0", "pod1"), *, node_echo: bool = False) -> Lab:
        built = build_lab(tmp_path / f"lab{len(made)}", pod_names, node_echo=node_echo)
        made.append(built)
        return built

    yield make
    for built in made:
        built.close()


@dataclass(frozen=True, slots=True)
class BackendVariant:
    """One backend flavour under packet test, and how to inspect its kernel state.

    The commands are run inside the node namespace; they let the ownership and drift
    tests stay the same for every backend.
    """

    backend: str
    """Registry name, for `proxy.backends.create`."""
    variant: str | None
    save_argv: tuple[str, ...]
    """Prints the kernel's whole ruleset (e.g. ``iptables-nft-save``)."""
    normalise: Callable[[str], list[str]]
    """Turns `save_argv`'s output into lines that compare equal when nothing changed."""
    owned_marker: str
    """Every line of the saved ruleset naming something the backend owns contains this."""
    foreign_marker: str
    """Every line of the saved ruleset naming the foreign rules contains this."""
    foreign_setup: tuple[tuple[str, ...], ...]
    """Creates someone else's rules (one saved line each) that the backend must not touch."""
    foreign_teardown: tuple[tuple[str, ...], ...]
    """Removes them again (failures ignored)."""
    wipe: tuple[tuple[str, ...], ...]
    """What a firewall reload does: removes every rule and chain (failures ignored)."""

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.variant}" if self.variant else self.backend

    def config(self, netns: str) -> BackendConfig:
        return BackendConfig(netns=netns, variant=self.variant)


_COUNTERS = re.compile(r"\[\d+:\d+\]$")
_BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})


def normalise_iptables_save(text: str) -> list[str]:
    """``iptables-save`` output without what changes on its own.

    Comment lines (they carry a date) go, policy counters read ``[0:0]``, and a table
    holding nothing but empty built-in chains with an ACCEPT policy is dropped: such a
    table behaves exactly like no table, and iptables cannot delete it once it exists.
    """
    kept: list[str] = []
    table: list[str] = []
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        line = _COUNTERS.sub("[0:0]", raw)
        if line.startswith("*"):
            table = [line]
        elif line == "COMMIT":
            body = table[1:]
            empty = all(
                entry.startswith(":")
                and entry.split()[0][1:] in _BUILTIN_CHAINS
                and entry.split()[1] == "ACCEPT"
                for entry in body
            )
            if not empty:
                kept.extend([*table, line])
            table = []
        else:
            table.append(line)
    return kept


def _iptables_variant(variant: str) -> BackendVariant:
    tool = f"iptables-{variant}"
    hooks = [
        ("nat", "PREROUTING", "-d", "198.18.99.1/32"),
        ("filter", "FORWARD", "-s", "198.18.99.2/32"),
    ]
    return BackendVariant(
        backend="iptables",
        variant=variant,
        save_argv=(f"{tool}-save",),
        normalise=normalise_iptables_save,
        owned_marker="KPY-",
        foreign_marker="DOCKER-TEST",
        foreign_setup=tuple(
            argv
            for table, hook, flag, cidr in hooks
            for argv in (
                (tool, "-t", table, "-N", "DOCKER-TEST"),
                (tool, "-t", table, "-A", "DOCKER-TEST", flag, cidr, "-j", "RETURN"),
                (tool, "-t", table, "-A", hook, "-j", "DOCKER-TEST"),
            )
        ),
        foreign_teardown=tuple(
            argv
            for table, hook, _, _ in hooks
            for argv in (
                (tool, "-t", table, "-D", hook, "-j", "DOCKER-TEST"),
                (tool, "-t", table, "-F", "DOCKER-TEST"),
                (tool, "-t", table, "-X", "DOCKER-TEST"),
            )
        ),
        wipe=tuple(
            (tool, "-t", table, verb)
            for table in ("filter", "nat", "mangle")
            for verb in ("-F", "-X")
        ),
    )


_NFT_FOREIGN_TABLE = "ip DOCKER-TEST"
_NFT_OUR_TABLES = ("table ip kube-proxy-py", "table ip6 kube-proxy-py")


def normalise_nft_ruleset(text: str) -> list[str]:
    """``nft list ruleset`` as one line per object, each naming its table.

    A table is ``table ip NAME``; a chain ``table ip NAME chain C`` (with its hook, if
    any); a rule ``table ip NAME chain C: RULE``; a set or map its declaration lines and
    one line per element, sorted (the kernel prints a hash set in no stable order).
    So a line belongs to a table when it names it, and one command of ``nft add ...``
    gives one line.
    """
    out: list[str] = []
    table = ""
    block = ""
    kind = ""
    header_at = -1
    elements: list[str] = []
    in_elements = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if in_elements:
            elements.extend(e.strip() for e in line.rstrip("}").split(",") if e.strip())
            if line.endswith("}"):
                in_elements = False
            continue
        if line.startswith("table ") and line.endswith("{"):
            table = line[:-1].strip()
            out.append(table)
            continue
        if line.startswith(("chain ", "set ", "map ")) and line.endswith("{"):
            kind, _, name = line[:-1].strip().partition(" ")
            block = f"{table} {kind} {name}"
            out.append(block)
            header_at = len(out) - 1
            elements = []
            continue
        if line == "}":
            if block:
                out.extend(f"{block} element: {e}" for e in sorted(elements))
                block = ""
            else:
                table = ""
            continue
        if line.startswith("elements = {"):
            body = line[len("elements = {") :]
            elements.extend(e.strip() for e in body.rstrip("}").split(",") if e.strip())
            in_elements = not line.endswith("}")
            continue
        if kind == "chain" and line.startswith("type ") and header_at == len(out) - 1:
            out[header_at] = f"{out[header_at]} {{ {line} }}"
            continue
        out.append(f"{block}: {line}")
    return out


def _nftables_variant() -> BackendVariant:
    foreign = _NFT_FOREIGN_TABLE
    return BackendVariant(
        backend="nftables",
        variant=None,
        save_argv=("nft", "list", "ruleset"),
        normalise=normalise_nft_ruleset,
        owned_marker="kube-proxy-py",
        foreign_marker="DOCKER-TEST",
        foreign_setup=(
            ("nft", f"add table {foreign}"),
            ("nft", f"add chain {foreign} pre {{ type nat hook prerouting priority -100 ; }}"),
            ("nft", f"add rule {foreign} pre ip daddr 198.18.99.1 return"),
        ),
        foreign_teardown=(("nft", f"delete table {foreign}"),),
        # What a firewall that manages its own tables does to ours by mistake: delete it.
        # (Never `nft flush ruleset`, even in a test namespace.)
        wipe=tuple(("nft", f"delete {table}") for table in _NFT_OUR_TABLES),
    )


FEATURES: dict[str, str] = {
    "session-affinity": "sessionAffinity ClientIP (timeoutSeconds)",
    "external-traffic-policy-local": "externalTrafficPolicy Local (client source kept, "
    "pods and node short-circuited, DROP without local endpoints)",
    "internal-traffic-policy-local": "internalTrafficPolicy Local (DROP without local endpoints)",
    "load-balancer-ip": "LoadBalancer ingress IPs (ipMode Proxy skipped)",
    "load-balancer-source-ranges": "loadBalancerSourceRanges allow list (node allowed)",
    "external-ips": "externalIPs",
    "localhost-nodeports": "NodePorts on 127.0.0.1 from the node (IPv4)",
    "sctp": "SCTP ClusterIP and NodePort",
    "nodeport-addresses": "nodePortAddresses: CIDRs and primary (the Node's first address)",
    "ipv6": "IPv6 (dual-stack): ClusterIP, NodePort and REJECT through the family's own backend",
    "stale-udp-conntrack": "stale UDP conntrack flows deleted after the rules change "
    "(an endpoint removed; flows cached before the service had endpoints)",
}
"""Service features under packet test, in the order docs/conformance.md lists them."""

NOT_IMPLEMENTED: dict[str, set[str]] = {
    "iptables-nft": set(),
    "iptables-legacy": set(),
    # Upstream's nftables mode has no localhost NodePorts either (no route_localnet).
    "nftables": {"localhost-nodeports"},
}
"""Per backend id: features it does not implement yet (their tests are strict xfail).

A backend joining `PACKET_BACKENDS` before it has every feature lists the missing ones
here; a backend id absent from this dict is taken to implement everything."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "feature(name): the Service feature a kernel test proves (see FEATURES)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Feature tests: junit properties (feature, backend) and the strict xfail of
    `NOT_IMPLEMENTED`."""
    for item in items:
        marker = item.get_closest_marker("feature")
        if marker is None:
            continue
        feature = str(marker.args[0])
        if feature not in FEATURES:
            raise pytest.UsageError(f"{item.nodeid}: unknown feature {feature!r}")
        callspec = getattr(item, "callspec", None)
        variant = callspec.params.get("backend_variant") if callspec is not None else None
        if not isinstance(variant, BackendVariant):
            raise pytest.UsageError(f"{item.nodeid}: a feature test must use backend_variant")
        item.user_properties.append(("feature", feature))
        item.user_properties.append(("backend", variant.id))
        if feature in NOT_IMPLEMENTED.get(variant.id, set()):
            item.add_marker(
                pytest.mark.xfail(
                    strict=True, reason=f"{variant.id} does not implement {feature} yet"
                )
            )


PACKET_BACKENDS: list[BackendVariant] = [
    _iptables_variant("nft"),
    _iptables_variant("legacy"),
    _nftables_variant(),
]
"""Every backend flavour the packet tests run against; a new backend joins here."""


@pytest.fixture(scope="module", params=PACKET_BACKENDS, ids=lambda variant: variant.id)
def backend_variant(request: pytest.FixtureRequest) -> BackendVariant:
    variant: BackendVariant = request.param
    return variant
