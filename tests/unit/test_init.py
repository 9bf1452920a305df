"""--init-only: which tunables each setting asks for (pure), and applying them to a fake /."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from proxy.backends.base import IpvsOptions
from proxy.config.settings import ConntrackSettings, Settings
from proxy.init import (
    CONNTRACK_HASHSIZE,
    CONNTRACK_MAX,
    InitError,
    Plan,
    Step,
    apply,
    kernel_version,
    plan,
)
from proxy.kernel.sysctl import Sysctl
from tests.fakes.proc_root import CONNTRACK_DEFAULTS, IPVS_DEFAULTS, make_root, read_root

KERNEL = (6, 18)


def steps(settings: Settings, *, cpus: int = 2, kernel: tuple[int, int] = KERNEL) -> list[str]:
    """The plan as readable lines: `key = value`, `>=` for raise-only, `?` for best effort."""
    return [
        f"{step.key.name if isinstance(step.key, Sysctl) else step.key}"
        f" {'>=' if step.at_least else '='} {step.value}{'' if step.required else ' ?'}"
        for step in plan(settings, cpus=cpus, kernel=kernel).steps
    ]


# -- the plan ------------------------------------------------------------------------------


def test_defaults_size_the_table_and_set_the_two_tcp_timeouts() -> None:
    assert steps(Settings(), cpus=2) == [
        "net.netfilter.nf_conntrack_max >= 131072",  # 32768 x 2 is below the minimum
        "module parameter nf_conntrack.hashsize >= 32768 ?",
        "net.netfilter.nf_conntrack_tcp_timeout_established = 86400",
        "net.netfilter.nf_conntrack_tcp_timeout_close_wait = 3600",
        "net.ipv4.conf.all.route_localnet = 1",
    ]
    assert steps(Settings(), cpus=16)[:2] == [
        "net.netfilter.nf_conntrack_max >= 524288",  # 32768 x 16
        "module parameter nf_conntrack.hashsize >= 131072 ?",
    ]


def test_zero_leaves_the_kernel_alone() -> None:
    conntrack = ConntrackSettings(
        max_per_core=0, min=999999, tcp_established_timeout=0, tcp_close_wait_timeout=0
    )
    assert steps(Settings(conntrack=conntrack, proxy_mode="nftables")) == []


def test_every_conntrack_setting_in_upstreams_order() -> None:
    conntrack = ConntrackSettings(
        max_per_core=100,
        min=0,
        tcp_established_timeout=3723,
        tcp_close_wait_timeout=0.5,  # whole seconds, rounded up: never 0 by accident
        tcp_be_liberal=True,
        udp_timeout=45,
        udp_stream_timeout=150,
    )
    assert steps(Settings(conntrack=conntrack), cpus=4) == [
        "net.netfilter.nf_conntrack_max >= 400",
        "module parameter nf_conntrack.hashsize >= 100 ?",
        "net.netfilter.nf_conntrack_tcp_timeout_established = 3723",
        "net.netfilter.nf_conntrack_tcp_timeout_close_wait = 1",
        "net.netfilter.nf_conntrack_tcp_be_liberal = 1",
        "net.netfilter.nf_conntrack_udp_timeout = 45",
        "net.netfilter.nf_conntrack_udp_timeout_stream = 150",
        "net.ipv4.conf.all.route_localnet = 1",  # iptables mode: localhost NodePorts
    ]


def test_ipvs_mode_adds_upstreams_ipvs_sysctls() -> None:
    settings = Settings(proxy_mode="ipvs", conntrack=ConntrackSettings(max_per_core=0))
    conntrack_only = steps(
        Settings(proxy_mode="nftables", conntrack=ConntrackSettings(max_per_core=0))
    )
    assert steps(settings)[len(conntrack_only) :] == [
        "net.ipv4.vs.conntrack = 1",
        "net.ipv4.vs.expire_nodest_conn = 1",
        "net.ipv4.vs.expire_quiescent_template = 1",
        "net.ipv4.ip_forward = 1",
    ]
    strict = Settings(proxy_mode="ipvs", ipvs=IpvsOptions(strict_arp=True))
    assert steps(strict)[-2:] == [
        "net.ipv4.conf.all.arp_ignore = 1",
        "net.ipv4.conf.all.arp_announce = 2",
    ]
    # Strict ARP is an ipvs-mode setting: other modes never touch ARP.
    assert not any("arp" in s for s in steps(Settings(ipvs=IpvsOptions(strict_arp=True))))
    assert not any("vs." in s for s in steps(Settings(proxy_mode="nftables")))


@pytest.mark.parametrize(
    ("kernel", "set_to_zero"), [((4, 0), False), ((4, 1), True), ((5, 8), True), ((5, 9), False)]
)
def test_conn_reuse_mode_only_on_the_kernels_that_need_it(
    kernel: tuple[int, int], set_to_zero: bool
) -> None:
    settings = Settings(proxy_mode="ipvs")
    assert ("net.ipv4.vs.conn_reuse_mode = 0" in steps(settings, kernel=kernel)) is set_to_zero
    notes = plan(settings, cpus=1, kernel=kernel).notes
    assert any("conn_reuse_mode left as it is" in note for note in notes) is not set_to_zero


@pytest.mark.parametrize(
    ("settings", "sets_it"),
    [
        (Settings(), True),
        (Settings(nodeport_addresses=("127.0.0.0/8", "198.18.0.0/24")), True),
        (Settings(nodeport_addresses=("198.18.0.0/24",)), False),  # loopback left out
        (Settings(nodeport_addresses=("primary",)), False),
        (Settings(proxy_mode="nftables"), False),
        (Settings(proxy_mode="ipvs"), False),
        (Settings(localhost_nodeports=False), False),  # --iptables-localhost-nodeports=false
    ],
)
def test_route_localnet_in_iptables_mode_when_nodeports_may_be_on_loopback(
    settings: Settings, sets_it: bool
) -> None:
    """Upstream's iptables NewProxier sets it before its initOnly return."""
    assert ("net.ipv4.conf.all.route_localnet = 1" in steps(settings)) is sets_it


def test_ipvs_timeouts_are_named_as_left_to_the_backend() -> None:
    settings = Settings(proxy_mode="ipvs", ipvs=IpvsOptions(tcp_timeout=900))
    (warning,) = plan(settings, cpus=1, kernel=KERNEL).unapplied
    assert "IPVS timeouts" in warning and "not set by --init-only" in warning
    assert plan(Settings(proxy_mode="ipvs"), cpus=1, kernel=KERNEL).unapplied == ()


def test_kernel_versions() -> None:
    assert kernel_version("6.18.44-fc-v1300") == (6, 18)
    assert kernel_version("5.4.0-150-generic") == (5, 4)
    with pytest.raises(ValueError, match="kernel version"):
        kernel_version("unknown")


# -- applying it to a fake / ---------------------------------------------------------------


def test_apply_sets_what_differs_and_never_lowers_the_table(tmp_path: Path) -> None:
    values = CONNTRACK_DEFAULTS | {CONNTRACK_MAX: 1_000_000}  # someone else sized it larger
    tunables = make_root(tmp_path, values)
    outcomes = apply(plan(Settings(), cpus=2, kernel=KERNEL), tunables)
    assert [(o.step.key, o.before, o.action) for o in outcomes] == [
        (CONNTRACK_MAX, 1_000_000, "kept"),
        (CONNTRACK_HASHSIZE, 16384, "set"),
        (Sysctl("net.netfilter.nf_conntrack_tcp_timeout_established"), 432000, "set"),
        (Sysctl("net.netfilter.nf_conntrack_tcp_timeout_close_wait"), 60, "set"),
        (Sysctl("net.ipv4.conf.all.route_localnet"), 0, "set"),
    ]
    assert read_root(tmp_path, values) == values | {
        Sysctl("net.ipv4.conf.all.route_localnet"): 1,
        CONNTRACK_HASHSIZE: 32768,
        Sysctl("net.netfilter.nf_conntrack_tcp_timeout_established"): 86400,  # lowered: exact
        Sysctl("net.netfilter.nf_conntrack_tcp_timeout_close_wait"): 3600,
    }
    again = apply(plan(Settings(), cpus=2, kernel=KERNEL), tunables)
    assert {o.action for o in again} == {"kept"}  # a second run changes nothing


def test_apply_raises_a_small_table(tmp_path: Path) -> None:
    tunables = make_root(tmp_path, CONNTRACK_DEFAULTS)
    apply(plan(Settings(), cpus=8, kernel=KERNEL), tunables)
    assert tunables.read(CONNTRACK_MAX) == 262144
    assert tunables.read(CONNTRACK_HASHSIZE) == 65536


def test_ipvs_mode_on_a_kernel_with_ip_vs(tmp_path: Path) -> None:
    values = CONNTRACK_DEFAULTS | IPVS_DEFAULTS
    tunables = make_root(tmp_path, values)
    settings = Settings(proxy_mode="ipvs", ipvs=IpvsOptions(strict_arp=True))
    apply(plan(settings, cpus=2, kernel=(5, 4)), tunables)
    after = read_root(tmp_path, values)
    assert {key.name: after[key] for key in IPVS_DEFAULTS if isinstance(key, Sysctl)} == {
        "net.ipv4.vs.conntrack": 1,
        "net.ipv4.vs.conn_reuse_mode": 0,
        "net.ipv4.vs.expire_nodest_conn": 1,
        "net.ipv4.vs.expire_quiescent_template": 1,
    }
    assert after[Sysctl("net.ipv4.ip_forward")] == 1
    assert after[Sysctl("net.ipv4.conf.all.arp_ignore")] == 1
    assert after[Sysctl("net.ipv4.conf.all.arp_announce")] == 2


def test_a_missing_required_sysctl_stops_naming_it_and_its_module(tmp_path: Path) -> None:
    tunables = make_root(tmp_path, CONNTRACK_DEFAULTS)  # no ip_vs
    with pytest.raises(InitError) as err:
        apply(plan(Settings(proxy_mode="ipvs"), cpus=2, kernel=KERNEL), tunables)
    assert str(err.value).startswith("--init-only: sysctl net.ipv4.vs.conntrack does not exist")
    assert "modprobe ip_vs" in str(err.value)
    # The conntrack steps before it were done, as upstream (which stops at the first error).
    assert tunables.read(Sysctl("net.netfilter.nf_conntrack_tcp_timeout_close_wait")) == 3600


def test_a_refused_write_stops_naming_the_sysctl_and_value(tmp_path: Path) -> None:
    tunables = make_root(tmp_path, {})
    key = Sysctl("net.netfilter.nf_conntrack_udp_timeout")
    tunables.path(key).mkdir(parents=True)  # reads fail, writes fail: like a broken /proc/sys
    with pytest.raises(InitError, match=r"net\.netfilter\.nf_conntrack_udp_timeout"):
        apply(Plan((Step(key, 45, "conntrack.udpTimeout"),)), tunables)


def test_the_hashsize_is_best_effort(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    values = {k: v for k, v in CONNTRACK_DEFAULTS.items() if k != CONNTRACK_HASHSIZE}
    tunables = make_root(tmp_path, values)  # no /sys/module: as outside the host namespace
    with caplog.at_level(logging.WARNING):
        outcomes = apply(plan(Settings(), cpus=2, kernel=KERNEL), tunables)
    assert [o.action for o in outcomes] == ["set", "failed", "set", "set", "set"]
    assert "nf_conntrack.hashsize does not exist" in caplog.text
