"""Client-side probes: one TCP connection or one UDP datagram from inside a namespace.

A socket belongs to the network namespace it was created in, for its whole life,
whichever namespace the thread using it is in later. So a probe does not spawn
``ip netns exec ... python``: a short-lived helper thread enters the namespace
(``setns(2)`` changes only the calling thread), creates the socket and ends; the caller
then connects, sends and reads in its own thread as usual. The caller's own namespace
never changes, and a probe costs well under a millisecond of set-up.

Every probe answers with either an `EchoReply` parsed from the echo server's line
(`lab.echo`) or a `ProbeFailure`:

- ``refused``: TCP reset, or an ICMP port unreachable (what ``REJECT`` sends) on TCP or UDP;
- ``timeout``: nothing came back in time (a DROP, or a black hole);
- ``unreachable``: ICMP host/network unreachable, or no route.

UDP probes bind an explicit, never recently used source port (a process-wide cycle over
a range below the kernel's ephemeral ports): conntrack pins a UDP flow to the endpoint
it first chose, so reusing a source port could hide a rule change.

Concurrency: probe functions may be called from any thread; the source-port cycle is
guarded by a lock. Each call blocks for at most about its `timeout`.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from lab.innetns import run_in_netns

NETNS_RUN_DIR = "/run/netns"
DEFAULT_TIMEOUT = 1.0

Proto = Literal["tcp", "udp"]
FailureKind = Literal["refused", "timeout", "unreachable"]

_UDP_SOURCE_PORTS = range(20000, 32000)
"""Below the default ephemeral range (32768-60999), so the kernel never hands them out."""
_source_port_lock = threading.Lock()
# Start at a random point so that two runs in a row do not replay the same ports.
_first_port = random.choice(_UDP_SOURCE_PORTS)
_source_ports: Iterator[int] = itertools.cycle(
    [*range(_first_port, _UDP_SOURCE_PORTS.stop), *range(_UDP_SOURCE_PORTS.start, _first_port)]
)
_MAX_REPLY = 4096
_UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL})


@dataclass(frozen=True, slots=True)
class EchoReply:
    """What an echo server said: who answered and which source it saw."""

    pod: str
    src_ip: str
    src_port: int
    proto: str
    port: int

    @classmethod
    def parse(cls, line: str) -> EchoReply:
        """Parse ``pod=<name> src=<ip>:<port> proto=<tcp|udp> port=<local port>``."""
        fields = dict(word.split("=", 1) for word in line.split())
        src_ip, _, src_port = fields["src"].rpartition(":")
        return cls(
            pod=fields["pod"],
            src_ip=src_ip,
            src_port=int(src_port),
            proto=fields["proto"],
            port=int(fields["port"]),
        )


@dataclass(frozen=True, slots=True)
class ProbeFailure:
    """A probe that got no echo back, and why."""

    kind: FailureKind
    detail: str = ""


ProbeResult = EchoReply | ProbeFailure


class NamespaceError(OSError):
    """Entering a network namespace failed (missing namespace, or not root)."""


def socket_in(
    netns: str | None, kind: socket.SocketKind, family: socket.AddressFamily = socket.AF_INET
) -> socket.socket:
    """A new socket of `family` and `kind` living in the named namespace (None: the caller's)."""
    if netns is None:
        return socket.socket(family, kind)
    if not os.path.exists(os.path.join(NETNS_RUN_DIR, netns)):
        raise NamespaceError(errno.ENOENT, f"network namespace {netns!r}: no such namespace")
    return run_in_netns(netns, lambda: socket.socket(family, kind))


def _family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _next_udp_source_port() -> int:
    with _source_port_lock:
        return next(_source_ports)


def _classify(err: OSError) -> ProbeFailure:
    if isinstance(err, TimeoutError):
        return ProbeFailure("timeout")
    if err.errno == errno.ECONNREFUSED:
        return ProbeFailure("refused", os.strerror(err.errno))
    if err.errno in _UNREACHABLE_ERRNOS:
        return ProbeFailure("unreachable", os.strerror(err.errno))
    raise err


def probe_tcp(
    netns: str | None, dst: str, port: int, *, timeout: float = DEFAULT_TIMEOUT
) -> ProbeResult:
    """Connect to `dst:port` from `netns`, read the echo line, and parse it."""
    with socket_in(netns, socket.SOCK_STREAM, _family_of(dst)) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((dst, port))
            data = _read_line(sock)
        except OSError as err:
            return _classify(err)
    if not data:
        return ProbeFailure("refused", "connection closed without an answer")
    return EchoReply.parse(data.decode())


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(_MAX_REPLY)
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n") or sum(map(len, chunks)) >= _MAX_REPLY:
            break
    return b"".join(chunks)


def probe_udp(
    netns: str | None, dst: str, port: int, *, timeout: float = DEFAULT_TIMEOUT
) -> ProbeResult:
    """Send one datagram to `dst:port` from `netns` (fresh source port) and parse the reply."""
    for _ in range(16):
        family = _family_of(dst)
        sock = socket_in(netns, socket.SOCK_DGRAM, family)
        try:
            sock.bind(("::" if family is socket.AF_INET6 else "0.0.0.0", _next_udp_source_port()))
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                continue
            raise
        break
    else:
        raise OSError(errno.EADDRINUSE, "no free UDP source port for the probe")
    with sock:
        sock.settimeout(timeout)
        try:
            # A connected UDP socket reports an ICMP port unreachable as ECONNREFUSED.
            sock.connect((dst, port))
            # A netfilter verdict in this namespace's OUTPUT path (DROP or REJECT) fails
            # the send itself with EPERM. A REJECT also sends us its ICMP error, which
            # the recv below reports as ECONNREFUSED; after a DROP the recv times out.
            with contextlib.suppress(PermissionError):
                sock.send(b"probe\n")
            data = sock.recv(_MAX_REPLY)
        except OSError as err:
            return _classify(err)
    return EchoReply.parse(data.decode())


def probe(
    netns: str | None, dst: str, port: int, proto: Proto, *, timeout: float = DEFAULT_TIMEOUT
) -> ProbeResult:
    """One TCP or UDP probe, see `probe_tcp` and `probe_udp`."""
    if proto == "tcp":
        return probe_tcp(netns, dst, port, timeout=timeout)
    return probe_udp(netns, dst, port, timeout=timeout)


def spread(
    netns: str | None,
    dst: str,
    port: int,
    proto: Proto,
    n: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_failures: int = 3,
) -> Counter[str]:
    """Send up to `n` probes; count answers by pod name, failures as ``!<kind>``.

    Stops early after `max_failures` failures, so that a broken path costs a few
    timeouts rather than `n` of them; the counts then add up to less than `n`.
    """
    seen: Counter[str] = Counter()
    failures = 0
    for _ in range(n):
        result = probe(netns, dst, port, proto, timeout=timeout)
        if isinstance(result, EchoReply):
            seen[result.pod] += 1
            continue
        seen[f"!{result.kind}"] += 1
        failures += 1
        if failures >= max_failures:
            break
    return seen
