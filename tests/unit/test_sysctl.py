"""ProcTunables against a directory laid out like /: paths, values, and the errors' wording."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.kernel.sysctl import (
    MissingTunableError,
    ModuleParameter,
    ProcTunables,
    Sysctl,
    TunableError,
    owning_module,
)
from tests.fakes.proc_root import make_root

FORWARD = Sysctl("net.ipv4.ip_forward")
HASHSIZE = ModuleParameter("nf_conntrack", "hashsize")


def test_sysctls_and_module_parameters_live_where_the_kernel_puts_them(tmp_path: Path) -> None:
    tunables = ProcTunables(tmp_path)
    assert tunables.path(FORWARD) == tmp_path / "proc/sys/net/ipv4/ip_forward"
    assert tunables.path(HASHSIZE) == tmp_path / "sys/module/nf_conntrack/parameters/hashsize"
    assert ProcTunables().path(FORWARD) == Path("/proc/sys/net/ipv4/ip_forward")


def test_read_and_write_whole_values(tmp_path: Path) -> None:
    tunables = make_root(tmp_path, {FORWARD: 0, HASHSIZE: 262144})
    assert (tunables.read(FORWARD), tunables.read(HASHSIZE)) == (0, 262144)
    tunables.write(HASHSIZE, 65536)  # shorter than before: the old digits must not remain
    tunables.write(FORWARD, 1)
    assert tunables.path(HASHSIZE).read_text() == "65536\n"
    assert (tunables.read(FORWARD), tunables.read(HASHSIZE)) == (1, 65536)


@pytest.mark.parametrize(
    ("key", "fix"),
    [
        (Sysctl("net.netfilter.nf_conntrack_max"),
         "load the nf_conntrack kernel module (modprobe nf_conntrack)"),
        (Sysctl("net.ipv4.vs.conntrack"), "load the ip_vs kernel module (modprobe ip_vs)"),
        (HASHSIZE, "load the nf_conntrack kernel module"),
        (Sysctl("net.ipv4.no_such_thing"), "this kernel does not have it"),
    ],
)  # fmt: skip
def test_a_missing_tunable_names_itself_and_the_module_to_load(
    tmp_path: Path, key: Sysctl | ModuleParameter, fix: str
) -> None:
    tunables = ProcTunables(tmp_path)
    for attempt in (lambda: tunables.read(key), lambda: tunables.write(key, 1)):
        with pytest.raises(MissingTunableError) as err:
            attempt()
        assert str(err.value).startswith(f"{key} does not exist (")
        assert fix in str(err.value)
        assert not tunables.path(key).exists()  # never created by a write


def test_owning_modules() -> None:
    assert owning_module(Sysctl("net.netfilter.nf_conntrack_udp_timeout")) == "nf_conntrack"
    assert owning_module(Sysctl("net.ipv4.vs.expire_nodest_conn")) == "ip_vs"
    assert owning_module(FORWARD) is None


def test_refused_writes_and_odd_values_name_the_tunable(tmp_path: Path) -> None:
    tunables = make_root(tmp_path, {FORWARD: 0})
    tunables.path(HASHSIZE).mkdir(parents=True)  # a write the kernel refuses, even for root
    with pytest.raises(TunableError, match=r"^cannot set module parameter nf_conntrack\.hashsize"):
        tunables.write(HASHSIZE, 4)
    tunables.path(FORWARD).write_text("1\t2\n")
    with pytest.raises(TunableError, match=r"sysctl net\.ipv4\.ip_forward .* not a number"):
        tunables.read(FORWARD)
