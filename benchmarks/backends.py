"""The backends the harness compares, as data: one entry each, and a new one joins by adding one.

An entry says how to start the real proxy for it (`--proxy-mode` and environment), which
raw tool is its kernel floor (restoring a saved ruleset from a file), how to read the
kernel back after a sync (a save command) and how to count, in what was read back, the
endpoints our ruleset programs. The harness never renders rules for a backend itself:
the floor restores what the proxy wrote, read back from the kernel.

`available()` decides at run time what can run here: an entry whose proxy mode
`proxy.backends.base.known()` does not list (the nftables and IPVS backends are built on
other branches) is skipped with a line saying so, never an error.

Read-back counts are exact for the iptables entries (one ``KPY-SEP-`` chain per
programmed endpoint, the renderer's contract, which `tests/unit` pins). The nftables
entry counts the elements of the backend's endpoint maps (``ip-endpoints-<proto>``, one
element per endpoint of a service port, as its renderer documents); it was written
against that design from another branch, and a mismatch shows up as a failed
read-back, never as a figure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from proxy.backends import base

_SEP_CHAIN = re.compile(r"^:KPY-SEP-", re.MULTILINE)
_UPSTREAM_SEP_CHAIN = re.compile(r"^:KUBE-SEP-", re.MULTILINE)


def count_iptables_endpoints(saved: str) -> int:
    """Endpoints programmed by our iptables ruleset: one KPY-SEP chain each."""
    return len(_SEP_CHAIN.findall(saved))


def count_upstream_endpoints(saved: str) -> int:
    """Endpoints programmed by upstream's iptables layout: one KUBE-SEP chain each."""
    return len(_UPSTREAM_SEP_CHAIN.findall(saved))


def count_nft_endpoints(saved: str) -> int:
    """Endpoints programmed by the nftables backend: one element of an endpoint map each.

    `nft list ruleset` prints ``map ip-endpoints-<proto> { type ... elements = { K : V,
    ... } }`` with elements spread over lines; each element is one ``K : V`` pair.
    """
    count = 0
    inside = False
    for line in saved.splitlines():
        word = line.strip()
        if word.startswith(("map ip-endpoints-", "map ip6-endpoints-")):
            inside = True
        elif inside and word == "}":
            inside = False
        elif inside and not word.startswith("type"):  # `type` or `typeof` K : V
            count += word.count(" : ")
    return count


IPTABLES_TOUCH = "*nat\n:KPY-BENCH-TOUCH - [0:0]\n-X KPY-BENCH-TOUCH\nCOMMIT\n"
"""One nat commit that leaves the table as it was (iptables-legacy still rewrites it all)."""


@dataclass(frozen=True)
class Backend:
    """How the harness starts, floors and reads back one backend."""

    name: str
    """As shown in results, tables and plots."""
    proxy_mode: str
    """The proxy's --proxy-mode; also the subpackage `proxy.backends.<mode>` must exist."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment of the proxy process (the iptables variant)."""
    save: tuple[str, ...] = ()
    """Reads the kernel back (run in the node namespace); its output restores as is."""
    restore: tuple[str, ...] = ()
    """The raw tool of the floor: reads a saved ruleset on stdin into a fresh namespace."""
    count: Callable[[str], int] = count_iptables_endpoints
    """Endpoints our ruleset programs, counted in what `save` printed."""
    upstream: bool = False
    """Upstream kube-proxy's iptables layout can be restored with `restore` (iptables only)."""
    touch_tool: tuple[str, ...] = ()
    """Applies `touch` without flushing what is loaded."""
    touch: str = ""
    """The smallest commit the raw tool can make (a chain added and removed), given to
    `restore` on top of a loaded ruleset: the kernel's floor for one change at that size."""


BACKENDS: tuple[Backend, ...] = (
    Backend(
        name="iptables-legacy",
        proxy_mode="iptables",
        env={"KPY_IPTABLES_MODE": "legacy"},
        save=("iptables-legacy-save",),
        restore=("iptables-legacy-restore", "-w", "5"),
        upstream=True,
        touch=IPTABLES_TOUCH,
        touch_tool=("iptables-legacy-restore", "-w", "5", "--noflush"),
    ),
    Backend(
        name="iptables-nft",
        proxy_mode="iptables",
        env={"KPY_IPTABLES_MODE": "nft"},
        save=("iptables-nft-save",),
        restore=("iptables-nft-restore", "-w", "5"),
        upstream=True,
        touch=IPTABLES_TOUCH,
        touch_tool=("iptables-nft-restore", "-w", "5", "--noflush"),
    ),
    Backend(
        name="nftables",
        proxy_mode="nftables",
        save=("nft", "list", "ruleset"),
        restore=("nft", "-f", "-"),
        count=count_nft_endpoints,
        touch_tool=("nft", "-f", "-"),
        touch="add table ip kpy-bench-touch\ndelete table ip kpy-bench-touch\n",
    ),
)
BY_NAME = {backend.name: backend for backend in BACKENDS}


def available(
    names: tuple[str, ...], known: Callable[[], list[str]] = base.known
) -> tuple[list[Backend], list[str]]:
    """The requested backends that exist here, and one line for each skipped one."""
    modes = set(known())
    chosen: list[Backend] = []
    skipped: list[str] = []
    for name in names:
        backend = BY_NAME[name]
        if backend.proxy_mode in modes:
            chosen.append(backend)
        else:
            skipped.append(
                f"{name}: skipped, this proxy has no --proxy-mode {backend.proxy_mode} yet "
                f"(proxy.backends.base.known() lists {', '.join(sorted(modes)) or 'nothing'})"
            )
    return chosen, skipped
