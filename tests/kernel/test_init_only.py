"""`python -m proxy --init-only` as root in a fresh network namespace, against the real kernel.

The conntrack timeouts and `nf_conntrack_tcp_be_liberal` are per network namespace
(kernel 6.18): the test sets them in the lab's node namespace and reads them back there,
while the host's values stay as they were. The table size (`nf_conntrack_max`) is global
and read-only outside the host namespace, which gives the failure path for free: a size
the namespace cannot set must stop `--init-only` with exit 1, naming the sysctl. With no
API server anywhere and no kubeconfig, the run also shows that nothing is contacted, and
the namespace's empty rulesets afterwards that no rule is touched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.netns import Topology
from proxy.kernel.commands import CommandResult
from proxy.kernel.sysctl import ProcTunables, Sysctl
from tests.kernel.conftest import Lab

pytestmark = pytest.mark.kernel

NETFILTER = "/proc/sys/net/netfilter"
PER_NETNS = {
    "nf_conntrack_tcp_timeout_established": ("--conntrack-tcp-timeout-established=1h2m3s", 3723),
    "nf_conntrack_tcp_timeout_close_wait": ("--conntrack-tcp-timeout-close-wait=123s", 123),
    "nf_conntrack_tcp_be_liberal": ("--conntrack-tcp-be-liberal", 1),
    "nf_conntrack_udp_timeout": ("--conntrack-udp-timeout=45s", 45),
    "nf_conntrack_udp_timeout_stream": ("--conntrack-udp-timeout-stream=150s", 150),
}


@pytest.fixture
def node(make_lab: Callable[..., Lab]) -> Iterator[Topology]:
    yield make_lab(()).topo


def init_only(topo: Topology, *flags: str) -> CommandResult:
    argv = [sys.executable, "-m", "proxy", "--init-only", "--hostname-override=node-a", *flags]
    return topo.run_in(topo.node_ns, argv, check=False)


def read_in(topo: Topology, name: str) -> int:
    return int(topo.run_in(topo.node_ns, ["cat", f"{NETFILTER}/{name}"]).stdout)


def host_values() -> dict[str, int]:
    host = ProcTunables()
    return {name: host.read(Sysctl(f"net.netfilter.{name}")) for name in PER_NETNS}


def test_init_only_sets_the_namespaced_conntrack_sysctls(node: Topology) -> None:
    before_host = host_values()
    flags = [flag for flag, _ in PER_NETNS.values()]
    done = init_only(node, "--conntrack-max-per-core=0", *flags)  # 0: leave the global size
    assert done.returncode == 0, done.stderr
    assert "initialized (--init-only)" in done.stderr
    assert {name: read_in(node, name) for name in PER_NETNS} == {
        name: value for name, (_, value) in PER_NETNS.items()
    }
    assert host_values() == before_host  # another namespace: the host's stay as they were
    # No rule was written: the namespace's rulesets are as empty as when it was made.
    assert node.run_in(node.node_ns, ["nft", "list", "ruleset"]).stdout.strip() == ""
    for save in ("iptables-nft-save", "iptables-legacy-save"):
        assert "KPY-" not in node.run_in(node.node_ns, [save]).stdout


def test_a_second_run_keeps_everything(node: Topology) -> None:
    flags = ["--conntrack-max-per-core=0", "--conntrack-udp-timeout=45s"]
    assert init_only(node, *flags).returncode == 0
    again = init_only(node, *flags)
    assert again.returncode == 0, again.stderr
    assert " set sysctl" not in again.stderr
    assert "keep sysctl net.netfilter.nf_conntrack_udp_timeout = 45" in again.stderr


def test_a_table_size_the_namespace_cannot_set_exits_1_naming_it(node: Topology) -> None:
    max_path = Path(NETFILTER, "nf_conntrack_max")
    host_max = int(max_path.read_text())
    writable = node.run_in(node.node_ns, ["test", "-w", str(max_path)], check=False).ok
    done = init_only(node, "--conntrack-max-per-core=1", f"--conntrack-min={host_max + 1}")
    if writable:  # a kernel with a per-namespace table size: then it is simply set there
        assert done.returncode == 0, done.stderr
        assert read_in(node, "nf_conntrack_max") == host_max + 1
    else:  # 6.18: nf_conntrack_max is the host's, read-only in any other namespace
        assert done.returncode == 1
        assert f"cannot set sysctl net.netfilter.nf_conntrack_max = {host_max + 1}" in done.stderr
    assert int(max_path.read_text()) == host_max


def test_ipvs_mode_names_a_missing_ip_vs_or_sets_its_sysctls(node: Topology) -> None:
    has_ip_vs = node.run_in(node.node_ns, ["test", "-d", "/proc/sys/net/ipv4/vs"], check=False).ok
    done = init_only(node, "--proxy-mode=ipvs", "--conntrack-max-per-core=0")
    if has_ip_vs:
        assert done.returncode == 0, done.stderr
        vs = "/proc/sys/net/ipv4/vs"
        for name in ("conntrack", "expire_nodest_conn", "expire_quiescent_template"):
            assert node.run_in(node.node_ns, ["cat", f"{vs}/{name}"]).stdout.strip() == "1"
    else:  # this CI kernel has no ip_vs: the message says what to load
        assert done.returncode == 1
        assert "sysctl net.ipv4.vs.conntrack does not exist" in done.stderr
        assert "modprobe ip_vs" in done.stderr
