"""A directory laid out like `/` for `ProcTunables`: /proc/sys and /sys/module, with values."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from proxy.kernel.sysctl import ModuleParameter, ProcTunables, Sysctl, Tunable

# What a fresh kernel with nf_conntrack loaded (no ip_vs) shows, as on the CI machine.
CONNTRACK_DEFAULTS: dict[Tunable, int] = {
    Sysctl("net.netfilter.nf_conntrack_max"): 65536,
    ModuleParameter("nf_conntrack", "hashsize"): 16384,
    Sysctl("net.netfilter.nf_conntrack_tcp_timeout_established"): 432000,
    Sysctl("net.netfilter.nf_conntrack_tcp_timeout_close_wait"): 60,
    Sysctl("net.netfilter.nf_conntrack_tcp_be_liberal"): 0,
    Sysctl("net.netfilter.nf_conntrack_udp_timeout"): 30,
    Sysctl("net.netfilter.nf_conntrack_udp_timeout_stream"): 120,
    Sysctl("net.ipv4.ip_forward"): 0,
    Sysctl("net.ipv4.conf.all.arp_ignore"): 0,
    Sysctl("net.ipv4.conf.all.arp_announce"): 0,
    Sysctl("net.ipv4.conf.all.route_localnet"): 0,
}
IPVS_DEFAULTS: dict[Tunable, int] = {
    Sysctl("net.ipv4.vs.conntrack"): 0,
    Sysctl("net.ipv4.vs.conn_reuse_mode"): 1,
    Sysctl("net.ipv4.vs.expire_nodest_conn"): 0,
    Sysctl("net.ipv4.vs.expire_quiescent_template"): 0,
}


def make_root(root: Path, values: Mapping[Tunable, int]) -> ProcTunables:
    """Write `values` under `root` and return `ProcTunables` reading and writing there."""
    tunables = ProcTunables(root)
    for key, value in values.items():
        path = tunables.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return tunables


def read_root(root: Path, keys: Mapping[Tunable, object]) -> dict[Tunable, int]:
    """The current value of each key under `root`."""
    tunables = ProcTunables(root)
    return {key: tunables.read(key) for key in keys}
