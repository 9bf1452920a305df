"""A one-node cluster network built from network namespaces, for kernel tests and the lab.

Address plan (everything inside 198.18.0.0/15, the benchmarking range, so nothing can
collide with a real network; no link ever touches the host's own interfaces):

=====================  ==================  ==============================================
what                   address             notes
=====================  ==================  ==============================================
node ``eth0``          198.18.0.2/24       the proxy runs in the node namespace
client ``eth0``        198.18.0.100/24     "outside the cluster"; the node's default gateway
cluster CIDR           198.18.64.0/18      pods of this node: 198.18.64.0/24
pod gateway            198.18.64.1/32      on every host-side pod veth (Calico-style)
pod ``eth0``           198.18.64.10+/32    first free host number from 10 upwards
service CIDR           198.19.0.0/16       the client routes it via the node
=====================  ==================  ==============================================

Every namespace is dual-stack. The IPv6 plan mirrors the IPv4 one inside 2001:2::/48,
the IPv6 benchmarking range (RFC 5180), so nothing can collide with a real network
either: uplink 2001:2::/64 (node ``2001:2::2``, client ``2001:2::100``), cluster CIDR
2001:2:0:40::/60 with this node's pods in 2001:2:0:40::/64 (gateway ``2001:2:0:40::1``
on every host-side veth, pod ``N`` at ``2001:2:0:40::<N in hex>``), service CIDR
2001:2:0:ff::/112. Duplicate address detection is off in every namespace, so an
address is usable the moment it is added.

::

    client ns                node ns                          pod ns (one per pod)
    eth0 198.18.0.100 --- eth0 198.18.0.2
                          kpv<N> 198.18.64.1/32 ---------- eth0 198.18.64.N/32
                          198.18.64.N/32 dev kpv<N>        198.18.64.1 dev eth0 scope link
                          default via 198.18.0.100         default via 198.18.64.1

Pods are routed, not bridged: every packet a pod sends, even to a pod next door, crosses
the node's IP stack, so it meets the node's netfilter hooks and conntrack exactly as on a
Calico node. The node forwards (``ip_forward=1``) with reverse-path filtering off; the
pod-side and client-side namespaces keep their defaults. The node does not rate-limit
the ICMP errors it sends (``icmp_ratelimit=0``, IPv6 likewise), so a test may probe a
REJECT rule many times in a row. ``route_localnet`` is left alone everywhere. The client
routes only the service CIDR to the node, not the cluster CIDR: pod IPs are unreachable
from outside, and whatever reaches a pod from the client went through a Service rule.

Names: every namespace is ``<prefix>node``, ``<prefix>client`` or ``<prefix>pod-<name>``
with a unique prefix ``kpy-<6 hex>-``. Veth pairs are created inside the node namespace
with their peer moved straight into the other namespace, so no interface ever appears
in the host's namespace and parallel runs cannot collide on interface names.

Crash safety: `Topology.create` records its owner (pid and process start time) in
``/run/kpy-lab/<prefix>owner``; `cleanup_stale` deletes the namespaces (and kills the
processes left inside them) of every prefix whose owner is gone, and leaves a live
run's namespaces alone.

Concurrency: a `Topology` is driven from one thread (a test or the lab script). Every
method blocks on short ``ip`` subprocesses (a few milliseconds each) and never on the
network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from proxy.kernel.commands import CommandResult, SubprocessRunner

NODE_IP = "198.18.0.2"
CLIENT_IP = "198.18.0.100"
UPLINK_PREFIX_LEN = 24
CLUSTER_CIDR = "198.18.64.0/18"
NODE_POD_CIDR = "198.18.64.0/24"
POD_GATEWAY_IP = "198.18.64.1"
SERVICE_CIDR = "198.19.0.0/16"
NODE_IP6 = "2001:2::2"
CLIENT_IP6 = "2001:2::100"
UPLINK_PREFIX_LEN6 = 64
CLUSTER_CIDR6 = "2001:2:0:40::/60"
NODE_POD_CIDR6 = "2001:2:0:40::/64"
POD_GATEWAY_IP6 = "2001:2:0:40::1"
SERVICE_CIDR6 = "2001:2:0:ff::/112"
FIRST_POD_HOST = 10
"""Pods get 198.18.64.10, .11, ...: the lowest free host number from here."""
LAST_POD_HOST = 254

PREFIX_ROOT = "kpy-"
OWNER_DIR = Path("/run/kpy-lab")
_POD_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_KILL_GRACE_SECONDS = 2.0


class TopologyError(RuntimeError):
    """An ``ip`` command failed while building or changing the topology."""


@dataclass(frozen=True, slots=True)
class Pod:
    """One routed pod: its namespace, its address and the node-side end of its veth."""

    name: str
    netns: str
    ip: str
    host_veth: str
    ip6: str = ""
    """The pod's IPv6 address."""


_TOOLS = SubprocessRunner(timeout=30.0)
"""Runs ``ip`` and friends on the host; each call is bounded to 30 s."""


def _run(argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
    return _TOOLS.run(argv, stdin=stdin)


def _check(argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
    out = _run(argv, stdin=stdin)
    if not out.ok:
        shown = " ".join(argv) + (f" <<< {stdin!r}" if stdin else "")
        raise TopologyError(f"{shown}: exit {out.returncode}: {out.stderr.strip()}")
    return out


def _ip_batch(netns: str, commands: Iterable[str]) -> None:
    """Run several ``ip`` commands in one process (``ip -n NS -batch -``)."""
    _check(["ip", "-n", netns, "-batch", "-"], stdin="\n".join(commands) + "\n")


def _sysctl(netns: str, settings: dict[str, str]) -> None:
    argv = ["ip", "netns", "exec", netns, "sysctl", "-q", "-w"]
    _check(argv + [f"{key}={value}" for key, value in settings.items()])


def list_namespaces() -> list[str]:
    """Names of every named network namespace on this host."""
    out = _check(["ip", "netns", "list"])
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _pids_in(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns])
    if not out.ok:
        return []
    return [int(word) for word in out.stdout.split() if word.isdigit()]


def _kill_all(pids: Sequence[int]) -> None:
    """SIGTERM these processes, then SIGKILL whatever is still there after a grace period."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _KILL_GRACE_SECONDS
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if _process_exists(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _process_exists(pid: int) -> bool:
    """True while `pid` runs (a zombie of ours counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rpartition(")")[2].split()[0] != "Z"


def _start_time(pid: int) -> str | None:
    """The process start time in clock ticks: with the pid, it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def delete_namespace(netns: str) -> None:
    """Kill what runs in `netns` and delete it; a namespace that is already gone is fine."""
    _kill_all(_pids_in(netns))
    out = _run(["ip", "netns", "delete", netns])
    if not out.ok and netns in list_namespaces():
        raise TopologyError(f"ip netns delete {netns}: {out.stderr.strip()}")


def _owner_is_alive(owner_file: Path) -> bool:
    try:
        pid_text, start = owner_file.read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid_text)) == start


def cleanup_stale(prefix_root: str = PREFIX_ROOT) -> list[str]:
    """Delete namespaces named `prefix_root`... that an earlier, crashed run left behind.

    A prefix whose owner process still runs is left alone, so two runs can share a host.
    Returns the names of the namespaces deleted.
    """
    pattern = re.compile(rf"^({re.escape(prefix_root)}[0-9a-f]{{6}}-)")
    deleted: list[str] = []
    live_prefixes: set[str] = set()
    for netns in list_namespaces():
        match = pattern.match(netns)
        if match is None:
            continue
        prefix = match.group(1)
        if prefix in live_prefixes:
            continue
        if _owner_is_alive(OWNER_DIR / f"{prefix}owner"):
            live_prefixes.add(prefix)
            continue
        delete_namespace(netns)
        deleted.append(netns)
    for owner_file in OWNER_DIR.glob(f"{prefix_root}*owner"):
        if not _owner_is_alive(owner_file):
            owner_file.unlink(missing_ok=True)
    return deleted


class Topology:
    """A node namespace with a client uplink and routed pods. See the module docstring.

    Use `Topology.create(...)` and always `destroy()` it (or use it as a context manager).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.node_ns = f"{prefix}node"
        self.client_ns = f"{prefix}client"
        self.node_ip = NODE_IP
        self.client_ip = CLIENT_IP
        self.pod_gateway_ip = POD_GATEWAY_IP
        self.node_ip6 = NODE_IP6
        self.client_ip6 = CLIENT_IP6
        self.pod_gateway_ip6 = POD_GATEWAY_IP6
        self.pods: dict[str, Pod] = {}
        self.owner_file = OWNER_DIR / f"{prefix}owner"
        self._destroyed = False

    @classmethod
    def create(cls, prefix: str | None = None, pods: int = 0) -> Topology:
        """Build node and client (and `pods` pods named pod0, pod1, ...); undo on failure."""
        topo = cls(prefix or f"{PREFIX_ROOT}{secrets.token_hex(3)}-")
        try:
            topo._record_owner()
            topo._build_node_and_client()
            for index in range(pods):
                topo.add_pod(f"pod{index}")
        except BaseException:
            topo.destroy()
            raise
        return topo

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this topology, pods first."""
        return [pod.netns for pod in self.pods.values()] + [self.client_ns, self.node_ns]

    @property
    def node_addresses(self) -> frozenset[str]:
        """Addresses a masqueraded packet can carry as source when the node sends it."""
        return frozenset({self.node_ip, self.pod_gateway_ip, self.node_ip6, self.pod_gateway_ip6})

    def _record_owner(self) -> None:
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        self.owner_file.write_text(f"{pid} {_start_time(pid)}\n")

    def _add_namespace(self, netns: str) -> None:
        _check(["ip", "netns", "add", netns])
        _ip_batch(netns, ["link set lo up"])
        # Before any interface exists, so `default` covers every one made later.
        _sysctl(
            netns, {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}
        )

    def _build_node_and_client(self) -> None:
        self._add_namespace(self.node_ns)
        # Reverse-path filtering off before any interface exists, so that `default`
        # covers the veths made later; the effective value is max(all, interface).
        _sysctl(
            self.node_ns,
            {
                "net.ipv4.ip_forward": "1",
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
                # REJECT answers with ICMP; the default rate limit (per peer, burst 6)
                # would turn a quick series of "refused" into timeouts.
                "net.ipv4.icmp_ratelimit": "0",
                "net.ipv6.conf.all.forwarding": "1",
                "net.ipv6.icmp.ratelimit": "0",
            },
        )
        self._add_namespace(self.client_ns)
        _ip_batch(
            self.node_ns,
            [
                f"link add eth0 type veth peer name eth0 netns {self.client_ns}",
                f"addr add {self.node_ip}/{UPLINK_PREFIX_LEN} dev eth0",
                f"addr add {self.node_ip6}/{UPLINK_PREFIX_LEN6} dev eth0 nodad",
                "link set eth0 up",
                f"route add default via {self.client_ip} dev eth0",
                f"route add ::/0 via {self.client_ip6} dev eth0",
            ],
        )
        _ip_batch(
            self.client_ns,
            [
                f"addr add {self.client_ip}/{UPLINK_PREFIX_LEN} dev eth0",
                f"addr add {self.client_ip6}/{UPLINK_PREFIX_LEN6} dev eth0 nodad",
                "link set eth0 up",
                f"route add {SERVICE_CIDR} via {self.node_ip} dev eth0",
                f"route add {SERVICE_CIDR6} via {self.node_ip6} dev eth0",
            ],
        )

    def _free_pod_ip(self) -> tuple[str, int]:
        used = {pod.ip for pod in self.pods.values()}
        base = ipaddress.IPv4Network(NODE_POD_CIDR).network_address
        for host in range(FIRST_POD_HOST, LAST_POD_HOST + 1):
            candidate = str(base + host)
            if candidate not in used:
                return candidate, host
        raise TopologyError(f"no free pod address left in {NODE_POD_CIDR}")

    def add_pod(self, name: str) -> Pod:
        """Create a routed pod namespace named `<prefix>pod-<name>` with the next free IP."""
        if not _POD_NAME.match(name):
            raise ValueError(f"pod name {name!r}: use 1-32 of [a-z0-9-]")
        if name in self.pods:
            raise ValueError(f"pod {name!r} already exists")
        ip, host = self._free_pod_ip()
        ip6 = str(ipaddress.IPv6Network(NODE_POD_CIDR6).network_address + host)
        pod = Pod(
            name=name, netns=f"{self.prefix}pod-{name}", ip=ip, host_veth=f"kpv{host}", ip6=ip6
        )
        self._add_namespace(pod.netns)
        self.pods[name] = pod
        _ip_batch(
            self.node_ns,
            [
                f"link add {pod.host_veth} type veth peer name eth0 netns {pod.netns}",
                f"addr add {self.pod_gateway_ip}/32 dev {pod.host_veth}",
                f"addr add {self.pod_gateway_ip6}/128 dev {pod.host_veth} nodad",
                f"link set {pod.host_veth} up",
                f"route add {pod.ip}/32 dev {pod.host_veth} scope link",
                f"route add {pod.ip6}/128 dev {pod.host_veth}",
            ],
        )
        _ip_batch(
            pod.netns,
            [
                f"addr add {pod.ip}/32 dev eth0",
                f"addr add {pod.ip6}/128 dev eth0 nodad",
                "link set eth0 up",
                f"route add {self.pod_gateway_ip} dev eth0 scope link",
                f"route add default via {self.pod_gateway_ip} dev eth0",
                f"route add {self.pod_gateway_ip6}/128 dev eth0",
                f"route add ::/0 via {self.pod_gateway_ip6} dev eth0",
            ],
        )
        return pod

    def remove_pod(self, name: str) -> None:
        """Kill what runs in the pod and delete its namespace (its veth goes with it)."""
        pod = self.pods.pop(name)
        delete_namespace(pod.netns)

    def run_in(
        self, netns: str, argv: Sequence[str], *, stdin: str | None = None, check: bool = True
    ) -> CommandResult:
        """Run `argv` inside `netns` (``ip netns exec``) and return what it printed."""
        full = ["ip", "netns", "exec", netns, *argv]
        return _check(full, stdin=stdin) if check else _run(full, stdin=stdin)

    def destroy(self) -> None:
        """Delete every namespace of this topology; safe to call twice or after a crash."""
        if self._destroyed:
            return
        errors: list[str] = []
        for netns in [
            *(pod.netns for pod in self.pods.values()),
            self.client_ns,
            self.node_ns,
        ]:
            try:
                delete_namespace(netns)
            except TopologyError as err:
                errors.append(str(err))
        self.pods.clear()
        self.owner_file.unlink(missing_ok=True)
        self._destroyed = True
        if errors:
            raise TopologyError("; ".join(errors))
