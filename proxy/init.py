"""`--init-only`: the kernel settings kube-proxy makes with full root privileges, then exit.

Upstream's `--init-only` performs the start-up steps that need more than CAP_NET_ADMIN
and exits, so a short privileged init container does them and the long-running proxy
container keeps only NET_ADMIN. For the modes this proxy has, those steps are sysctls
(and one module parameter), decided here from the settings:

conntrack, every mode (upstream's `setupConntrack`, from `platformSetup`):

- the table size, when `conntrack.max_per_core` > 0: `nf_conntrack_max` =
  max(max_per_core x CPUs, min) and the nf_conntrack `hashsize` = that / 4. A larger
  value already in place is never lowered (`scripts/node-init.sh` keeps the same rule;
  upstream would write its exact value);
- `nf_conntrack_tcp_timeout_established`, `_tcp_timeout_close_wait`, `_udp_timeout`,
  `_udp_timeout_stream`: each set to exactly its setting when that is above 0 (0 leaves
  the kernel's value), in whole seconds rounded up;
- `nf_conntrack_tcp_be_liberal` = 1 when `conntrack.tcp_be_liberal`.

ipvs mode only (upstream's IPVS proxier, before its own `initOnly` return):

- `net.ipv4.vs.conntrack` = 1, `net.ipv4.vs.expire_nodest_conn` = 1,
  `net.ipv4.vs.expire_quiescent_template` = 1, `net.ipv4.ip_forward` = 1;
- `net.ipv4.vs.conn_reuse_mode` = 0 on kernels 4.1 up to (not including) 5.9; left as it
  is from 5.9, which fixed what it worked around (and absent before 4.1);
- with `ipvs.strict_arp`: `net.ipv4.conf.all.arp_ignore` = 1, `arp_announce` = 2.

iptables mode only (upstream's iptables `NewProxier`, before its own `initOnly` return):

- `net.ipv4.conf.all.route_localnet` = 1 for localhost NodePorts
  (`iptables.localhostNodePorts`, on by default), unless `--nodeport-addresses` leaves
  out 127.0.0.1, which turns them off as upstream does. The iptables backend ensures the
  same value again when it starts, for a proxy that runs without an init container.

Left out on purpose: the IPVS connection timeouts (`ipvs.tcpTimeout`, ...), which upstream
sets over netlink and which belong to the IPVS backend (a warning says so when set);
anything in nftables mode (upstream sets nothing). Nothing here
contacts the API server or touches a rule.

Design: `plan(settings, cpus=, kernel=)` is pure, the settings and two facts about the
machine in, the `Step`s (and what is deliberately left) out, so the decision is
unit-tested without a kernel. `apply(plan, tunables)` then reads each current value
through `proxy.kernel.sysctl`'s `Tunables` and writes only what must change, in
upstream's order; it returns what it did. A required step that cannot be read or
written raises `InitError` naming the tunable, which `python -m proxy` turns into exit
code 1; the hashsize is best effort (a warning), as upstream treats a read-only /sys and
as the kernel refuses it outside the host network namespace.

Runs once, in the main thread, before anything else starts.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
from dataclasses import dataclass
from typing import Literal

from proxy.config.settings import Settings
from proxy.kernel.sysctl import (
    ROUTE_LOCALNET,
    ModuleParameter,
    Sysctl,
    Tunable,
    TunableError,
    Tunables,
)

log = logging.getLogger(__name__)

CONNTRACK_MAX = Sysctl("net.netfilter.nf_conntrack_max")
CONNTRACK_HASHSIZE = ModuleParameter("nf_conntrack", "hashsize")
CONN_REUSE_MODE = Sysctl("net.ipv4.vs.conn_reuse_mode")
CONN_REUSE_MODE_KERNELS = ((4, 1), (5, 9))
"""conn_reuse_mode exists from 4.1; 5.9 fixed the bug that setting it to 0 worked around."""


@dataclass(frozen=True, slots=True)
class Step:
    """One tunable to bring to a value."""

    key: Tunable
    value: int
    why: str
    """The setting or mode that asks for it, for the log."""
    at_least: bool = False
    """Raise only: a larger current value stays (the conntrack table size)."""
    required: bool = True
    """False: a failure is logged and the others go on (the conntrack hashsize)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What `--init-only` will do, in order, and what it deliberately leaves."""

    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()
    """What is left as it is on purpose, as upstream does (logged as information)."""
    unapplied: tuple[str, ...] = ()
    """Settings given that `--init-only` does not apply, unlike upstream (logged as warnings)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `apply` did with one step."""

    step: Step
    before: int | None
    """The value found; None when it could not be read."""
    action: Literal["set", "kept", "failed"]
    detail: str = ""


class InitError(Exception):
    """A required tunable could not be read or set; the message names it."""


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a kernel release string such as "6.18.44-fc-v1300"."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None:
        raise ValueError(f"cannot read a kernel version from {release!r}")
    return int(match.group(1)), int(match.group(2))


def plan(settings: Settings, *, cpus: int, kernel: tuple[int, int]) -> Plan:
    """The steps of `--init-only` for these settings on a machine with `cpus` and `kernel`."""
    steps = _conntrack_steps(settings, cpus)
    if settings.proxy_mode == "iptables":
        steps.extend(_iptables_steps(settings))
    if settings.proxy_mode != "ipvs":
        return Plan(tuple(steps))
    ipvs_steps, notes = _ipvs_steps(settings, kernel)
    unapplied: tuple[str, ...] = ()
    ipvs = settings.ipvs
    if ipvs.tcp_timeout > 0 or ipvs.tcp_fin_timeout > 0 or ipvs.udp_timeout > 0:
        unapplied = (
            "the IPVS timeouts (ipvs.tcpTimeout, tcpFinTimeout, udpTimeout) are not set by "
            "--init-only: they go through IPVS netlink, which is the IPVS backend's job",
        )
    return Plan((*steps, *ipvs_steps), notes, unapplied)


def _conntrack_steps(settings: Settings, cpus: int) -> list[Step]:
    conntrack = settings.conntrack
    steps: list[Step] = []
    if conntrack.max_per_core > 0:
        size = max(conntrack.max_per_core * cpus, conntrack.min)
        why = f"conntrack.maxPerCore {conntrack.max_per_core} x {cpus} CPUs, min {conntrack.min}"
        steps.append(Step(CONNTRACK_MAX, size, why, at_least=True))
        steps.append(
            Step(CONNTRACK_HASHSIZE, size // 4, f"{why}, / 4", at_least=True, required=False)
        )

    def timeout(sysctl: str, field: str, seconds: float) -> None:
        if seconds > 0:  # 0: leave the kernel's value
            key = Sysctl(f"net.netfilter.nf_conntrack_{sysctl}")
            steps.append(Step(key, math.ceil(seconds), f"conntrack.{field}"))

    timeout("tcp_timeout_established", "tcpEstablishedTimeout", conntrack.tcp_established_timeout)
    timeout("tcp_timeout_close_wait", "tcpCloseWaitTimeout", conntrack.tcp_close_wait_timeout)
    if conntrack.tcp_be_liberal:
        key = Sysctl("net.netfilter.nf_conntrack_tcp_be_liberal")
        steps.append(Step(key, 1, "conntrack.tcpBeLiberal"))
    timeout("udp_timeout", "udpTimeout", conntrack.udp_timeout)
    timeout("udp_timeout_stream", "udpStreamTimeout", conntrack.udp_stream_timeout)
    return steps


def _iptables_steps(settings: Settings) -> list[Step]:
    """route_localnet for localhost NodePorts (`iptables.localhostNodePorts`, on by
    default), when --nodeport-addresses allows loopback."""
    if not settings.localhost_nodeports:
        return []
    if not _nodeports_include_loopback(settings.nodeport_addresses):
        return []
    return [Step(ROUTE_LOCALNET, 1, "iptables.localhostNodePorts (localhost NodePorts)")]


def _nodeports_include_loopback(addresses: tuple[str, ...]) -> bool:
    """Upstream's ContainsIPv4Loopback: no list (every address), or a CIDR holding 127.0.0.1."""
    if not addresses:
        return True
    loopback = ipaddress.ip_address("127.0.0.1")
    for entry in addresses:
        try:
            network = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:  # "primary": this node's own addresses, never loopback
            continue
        if loopback in network:
            return True
    return False


def _ipvs_steps(settings: Settings, kernel: tuple[int, int]) -> tuple[list[Step], tuple[str, ...]]:
    why = "ipvs mode"
    steps = [Step(Sysctl("net.ipv4.vs.conntrack"), 1, why)]
    notes: list[str] = []
    first, fixed = CONN_REUSE_MODE_KERNELS
    if first <= kernel < fixed:
        steps.append(Step(CONN_REUSE_MODE, 0, f"{why} on kernel {kernel[0]}.{kernel[1]}"))
    else:
        notes.append(
            f"{CONN_REUSE_MODE} left as it is on kernel {kernel[0]}.{kernel[1]} "
            "(set only on 4.1 up to 5.9, as upstream)"
        )
    steps.extend(
        [
            Step(Sysctl("net.ipv4.vs.expire_nodest_conn"), 1, why),
            Step(Sysctl("net.ipv4.vs.expire_quiescent_template"), 1, why),
            Step(Sysctl("net.ipv4.ip_forward"), 1, why),
        ]
    )
    if settings.ipvs.strict_arp:
        steps.append(Step(Sysctl("net.ipv4.conf.all.arp_ignore"), 1, "ipvs.strictARP"))
        steps.append(Step(Sysctl("net.ipv4.conf.all.arp_announce"), 2, "ipvs.strictARP"))
    return steps, tuple(notes)


def apply(plan: Plan, tunables: Tunables) -> list[Outcome]:
    """Bring each tunable of `plan` to its value, in order; `InitError` on a required failure."""
    for note in plan.notes:
        log.info("%s", note)
    for warning in plan.unapplied:
        log.warning("%s", warning)
    return [_apply_one(step, tunables) for step in plan.steps]


def _apply_one(step: Step, tunables: Tunables) -> Outcome:
    before: int | None = None
    try:
        before = tunables.read(step.key)
        if before == step.value or (step.at_least and before > step.value):
            log.info("keep %s = %d (%s)", step.key, before, _wanted(step))
            return Outcome(step, before, "kept")
        tunables.write(step.key, step.value)
    except TunableError as err:
        if step.required:
            raise InitError(f"--init-only: {err}") from None
        log.warning("%s; continuing (%s)", err, step.why)
        return Outcome(step, before, "failed", str(err))
    log.info("set %s = %d (was %d; %s)", step.key, step.value, before, step.why)
    return Outcome(step, before, "set")


def _wanted(step: Step) -> str:
    return f"wanted at least {step.value}" if step.at_least else step.why
