"""Echo servers that say who answered and whom they saw, for packet tests and the lab.

``python -m lab.echo --name POD --tcp 8080 --udp 5353 [--tcp ...] [--udp ...]``
answers every TCP connection and every UDP datagram with one line::

    pod=<name> src=<client ip>:<client port> proto=<tcp|udp> port=<local port>

and exits 0 on SIGTERM (or SIGINT). A test reads the line (`lab.probe`) to learn
which endpoint a Service sent it to and whether the source was masqueraded.

Design: one thread, one `selectors` loop over every listening socket. A TCP connection
is accepted, answered and closed at once (the line is far smaller than a socket buffer,
so the write cannot block for long); a UDP datagram is answered from the address it was
sent to (``IP_PKTINFO``), so a namespace with several addresses still replies from the
one the client expects. The server binds 0.0.0.0 and [::], so it answers on every address of its
namespace.

`start_echo` launches the server in a namespace (``ip netns exec``) as a background
process whose stdout is not inherited (a harness waiting for its own stdout to close
must not wait for the server), and `EchoServer.wait_listening` blocks, bounded, until
every port answers a probe.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from lab.probe import EchoReply, probe_tcp, probe_udp

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
"""Linux's value; Python 3.11 does not export the constant."""
_PKTINFO = struct.Struct("=i4s4s")
"""struct in_pktinfo: ifindex, spec_dst (local address), addr (header destination)."""
_PKTINFO6 = struct.Struct("=16sI")
"""struct in6_pktinfo: the header destination address, then the interface index."""
_MAX_DATAGRAM = 65535
_REPO_ROOT = Path(__file__).resolve().parents[1]


def reply_line(pod: str, src: tuple[str, int], proto: str, port: int) -> bytes:
    """The line the server answers with."""
    return f"pod={pod} src={src[0]}:{src[1]} proto={proto} port={port}\n".encode()


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # Unwinds the serve loop through its `finally`, and the process exits 0.
    raise SystemExit(0)


def serve(pod: str, tcp_ports: Sequence[int], udp_ports: Sequence[int]) -> None:
    """Answer on every port until SIGTERM or SIGINT."""
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    selector = selectors.DefaultSelector()
    sockets: list[socket.socket] = []
    for port in tcp_ports:
        for listener in _listeners(socket.SOCK_STREAM, port):
            listener.listen(128)
            selector.register(listener, selectors.EVENT_READ, ("tcp", port))
            sockets.append(listener)
    for port in udp_ports:
        for datagram in _listeners(socket.SOCK_DGRAM, port):
            if datagram.family is socket.AF_INET6:
                datagram.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                datagram.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            selector.register(datagram, selectors.EVENT_READ, ("udp", port))
            sockets.append(datagram)
    try:
        while True:
            for key, _ in selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                proto, port = key.data
                if proto == "tcp":
                    _answer_tcp(sock, pod, port)
                else:
                    _answer_udp(sock, pod, port)
    finally:
        for sock in sockets:
            sock.close()
        selector.close()


def _listeners(kind: socket.SocketKind, port: int) -> list[socket.socket]:
    """One IPv4 socket on 0.0.0.0 and, where the namespace has IPv6, one IPv6-only on ::."""
    made = []
    for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        if family is socket.AF_INET6 and not socket.has_ipv6:
            continue
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family is socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((wildcard, port))
        except OSError:
            sock.close()
            if family is socket.AF_INET6:
                continue  # IPv6 disabled in this namespace: serve IPv4 only
            raise
        sock.setblocking(False)
        made.append(sock)
    return made


def _answer_tcp(listener: socket.socket, pod: str, port: int) -> None:
    try:
        conn, peer = listener.accept()
    except BlockingIOError:
        return
    with conn:
        conn.settimeout(1.0)
        # The client may have gone away first; then there is nobody to tell.
        with contextlib.suppress(OSError):
            conn.sendall(reply_line(pod, peer, "tcp", port))


def _answer_udp(sock: socket.socket, pod: str, port: int) -> None:
    try:
        _, ancdata, _, peer = sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(_PKTINFO6.size))
    except BlockingIOError:
        return
    control = []
    for level, kind, data in ancdata:
        # Reply from the address the datagram was sent to, on whatever interface.
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            _, _, header_dst = _PKTINFO.unpack(data[: _PKTINFO.size])
            control.append((socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, header_dst, bytes(4))))
        elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            header_dst6, _ = _PKTINFO6.unpack(data[: _PKTINFO6.size])
            control.append(
                (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _PKTINFO6.pack(header_dst6, 0))
            )
    # No route back, say: the client sees a timeout, which is the truth.
    with contextlib.suppress(OSError):
        sock.sendmsg([reply_line(pod, peer, "udp", port)], control, 0, peer)


class EchoServer:
    """A running echo server process in a namespace."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        *,
        netns: str | None,
        name: str,
        tcp_ports: Sequence[int],
        udp_ports: Sequence[int],
    ) -> None:
        self.process = process
        self.netns = netns
        self.name = name
        self.tcp_ports = tuple(tcp_ports)
        self.udp_ports = tuple(udp_ports)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_listening(self, timeout: float = 10.0) -> None:
        """Block until this server answers on every port, probed inside its namespace, or raise."""
        deadline = time.monotonic() + timeout
        pending = [("tcp", port) for port in self.tcp_ports] + [
            ("udp", port) for port in self.udp_ports
        ]
        while pending:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"echo server {self.name} in {self.netns} exited with {code}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"echo server {self.name} not answering on {pending}")
            proto, port = pending[0]
            probe = probe_tcp if proto == "tcp" else probe_udp
            result = probe(self.netns, "127.0.0.1", port, timeout=0.2)
            # Another server on the same port (an earlier one still running) does not count.
            if isinstance(result, EchoReply) and result.pod == self.name:
                pending.pop(0)
            else:
                time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM the server and reap it (SIGKILL if it does not go); return its status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout)


def _spawn(argv: Sequence[str], env: dict[str, str], stderr: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env=env,
        # Its own session: a Ctrl-C meant for the test run is not delivered to it twice.
        start_new_session=True,
    )


def start_echo(
    netns: str | None,
    name: str,
    *,
    tcp_ports: Sequence[int] = (8080,),
    udp_ports: Sequence[int] = (5353,),
    log_path: Path | None = None,
) -> EchoServer:
    """Launch an echo server in `netns` in the background; call `wait_listening` next.

    Its stdout goes nowhere and its stderr to `log_path` (or nowhere), never to ours.
    """
    argv = [sys.executable, "-m", "lab.echo", "--name", name]
    for port in tcp_ports:
        argv += ["--tcp", str(port)]
    for port in udp_ports:
        argv += ["--udp", str(port)]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    if log_path is None:
        process = _spawn(argv, env, subprocess.DEVNULL)
    else:
        with open(log_path, "ab") as log:
            process = _spawn(argv, env, log.fileno())
    return EchoServer(process, netns=netns, name=name, tcp_ports=tcp_ports, udp_ports=udp_ports)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.echo", description=__doc__)
    parser.add_argument("--name", required=True, help="pod name to report in every answer")
    parser.add_argument("--tcp", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--udp", type=int, action="append", default=[], metavar="PORT")
    args = parser.parse_args(argv)
    if not args.tcp and not args.udp:
        parser.error("give at least one --tcp or --udp port")
    serve(args.name, args.tcp, args.udp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
