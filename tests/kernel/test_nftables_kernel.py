"""The nftables backend and its fake against the real `nft` in a fresh namespace.

- The fake refuses what the kernel refuses (the cases of tests/fakes/nft_cases.py).
- A transaction the kernel refuses leaves the ruleset byte-identical, and the
  backend's error names the refused line; the next (full) sync repairs.
- The in-process library and `nft -f` write the same table.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator

import pytest

from proxy.backends.base import BackendConfig, BackendError
from proxy.backends.nftables.backend import NftablesBackend
from proxy.kernel.commands import SubprocessRunner
from proxy.kernel.nft import NftLibrary, NftProcess
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
from tests.fakes.nft_cases import ACCEPTED, FIRST, REFUSED, SETUP
from tests.kernel.conftest import normalise_nft_ruleset

pytestmark = pytest.mark.kernel

NAME = ServicePortName(ServiceKey("default", "web"), "http", Protocol.TCP)
NODE = NodeContext("n", ("198.18.0.2",), cluster_cidrs=("198.18.64.0/18",))


_NAMES = itertools.count()


@pytest.fixture
def netns() -> Iterator[str]:
    """An empty namespace of this test's own (named apart from the lab's `kpy-` ones)."""
    name = f"kpynft-{os.getpid()}-{next(_NAMES)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nft(netns: str, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args, "-f", "-"],
        input=script,
        text=True,
        capture_output=True,
        check=False,
    )


def ruleset(netns: str) -> str:
    return nft(netns, "list ruleset\n").stdout


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_kernel_refuses_what_the_fake_refuses(netns: str, case: str) -> None:
    assert nft(netns, SETUP).returncode == 0
    before = ruleset(netns)
    result = nft(netns, FIRST + REFUSED[case])
    assert result.returncode != 0
    assert "/dev/stdin:2:" in result.stderr, result.stderr
    assert ruleset(netns) == before


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_the_kernel_accepts_what_the_fake_accepts(netns: str, case: str) -> None:
    assert nft(netns, SETUP).returncode == 0
    result = nft(netns, ACCEPTED[case])
    assert result.returncode == 0, result.stderr


def web(*octets: int, vip: str = "198.19.0.10") -> ProxyState:
    eps = tuple(Endpoint(ip=f"198.18.64.{octet}", port=8080) for octet in octets)
    port = ServicePort(name=NAME, cluster_ips=(vip,), port=80, node_port=30080)
    return ProxyState(NODE, {NAME: ServicePortState(port, eps, eps, eps)})


@pytest.mark.parametrize("tool", ["library", "process"])
def test_a_refused_transaction_leaves_the_ruleset_byte_identical(netns: str, tool: str) -> None:
    runner = SubprocessRunner(netns)
    made = NftLibrary(netns, diagnose=NftProcess(runner, check=True))
    backend = NftablesBackend(
        BackendConfig(netns=netns), made if tool == "library" else NftProcess(runner)
    )
    backend.sync(web(7, 8), SyncHint(full=True))
    before = ruleset(netns)
    # A hint that lies about what the kernel holds (another VIP): deleting its elements
    # fails in the kernel, after nft's parser accepted every line of the script.
    lie = web(7, 8, vip="198.19.0.99").services[NAME]
    hint = SyncHint(full=False, changed=frozenset({NAME}), previous={NAME: lie})
    with pytest.raises(BackendError) as raised:
        backend.sync(web(9, 8), hint)
    assert ruleset(netns) == before
    assert any("delete element" in line for line in raised.value.offending_lines), (
        raised.value.offending_lines
    )
    backend.sync(web(9, 8), hint)  # a full sync now, whatever the hint
    assert "198.18.64.9 . 8080" in ruleset(netns)
    assert "198.18.64.7 . 8080" not in ruleset(netns)


def test_library_and_process_write_the_same_table(netns: str) -> None:
    runner = SubprocessRunner(netns)
    NftablesBackend(BackendConfig(netns=netns), NftLibrary(netns)).sync(web(7, 8), SyncHint(True))
    by_library = ruleset(netns)
    NftablesBackend(BackendConfig(netns=netns), NftProcess(runner)).sync(web(7, 8), SyncHint(True))
    assert ruleset(netns) == by_library


def test_partial_syncs_with_session_affinity_end_where_a_full_sync_would(netns: str) -> None:
    """Affinity switched on, endpoints moved, the timeout changed, affinity switched off,
    the service emptied: after each partial sync the kernel holds what a full sync of
    the same state writes (sets, maps, chains and elements, compared line by line)."""

    def step(octets: tuple[int, ...], seconds: int | None) -> ProxyState:
        eps = tuple(Endpoint(ip=f"198.18.64.{octet}", port=8080) for octet in octets)
        port = ServicePort(
            name=NAME,
            cluster_ips=("198.19.0.10",),
            port=80,
            node_port=30080,
            session_affinity_seconds=seconds,
        )
        return ProxyState(NODE, {NAME: ServicePortState(port, eps, eps, eps)})

    steps = [step((7,), None), step((7, 8), 600), step((8, 9), 600), step((8, 9), 60)]
    steps += [step((8, 9), None), step((), 600), step((7,), 600)]
    backend = Driven(NftablesBackend(BackendConfig(netns=netns)))
    backend.sync(steps[0], SyncHint(full=True))
    for state in steps[1:]:
        backend.sync(state, SyncHint(full=False, changed=frozenset({NAME})))
        after_partial = sorted(normalise_nft_ruleset(ruleset(netns)))
        NftablesBackend(BackendConfig(netns=netns)).sync(state, SyncHint(full=True))
        assert after_partial == sorted(normalise_nft_ruleset(ruleset(netns)))
