"""Addresses in settings: `IP:port`, bind addresses, the pod CIDRs, the NodePort address filter.

The rules are kube-proxy's: a bind address is an IP (a bare IP gets the server's default
port, as upstream's `AppendPortIfNeeded`) or `IP:port` with IPv6 in brackets, never a
host name; CIDR lists are normalised (host bits cleared, IPv4 leading zeros read as
decimal like Go's sloppy parser); `--cluster-cidr` holds one CIDR or a dual-stack pair;
`nodePortAddresses` holds CIDRs or the single word "primary".

`split_host_port` is also what the metrics and health servers use to bind (port 0 allowed
there, for tests). Pure functions; safe from any thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from proxy.config.errors import BadValueError, quote
from proxy.parse import normalize_cidr, normalize_ip

NODEPORT_ADDRESSES_PRIMARY = "primary"
"""The `nodePortAddresses` keyword for "the Node's primary IPs"."""


def split_host_port(address: str) -> tuple[str, int]:
    """`"IP:port"` or `"[IPv6]:port"` -> (IP, port); `ValueError` otherwise. Port may be 0."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not IP:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"{address!r} is not IP:port")
    elif ":" in host:
        raise ValueError(f"{address!r} is not IP:port (put an IPv6 address in brackets)")
    ip = _strict_ip(host)
    number = int(port)
    if ip is None or number > 65535:
        raise ValueError(f"{address!r} is not IP:port")
    return ip, number


def join_host_port(ip: str, port: int) -> str:
    """`ip:port`, bracketing IPv6 like Go's `net.JoinHostPort`."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _strict_ip(text: str) -> str | None:
    if "%" in text:  # zones are not accepted by Go's net.ParseIP
        return None
    return normalize_ip(text)


def parse_bind_address(text: str, default_port: int) -> str:
    """`IP` or `IP:port` (IPv6 in brackets with a port) -> canonical `IP:port`.

    A bare IP gets `default_port`, as kube-proxy's `AppendPortIfNeeded` does. The host
    must be an IP address (not a name) and the port 1..65535, as upstream validates.
    IPv4 leading zeros are read as decimal, like Go's `ParseIPSloppy`.
    """
    text = text.strip()
    ip = _strict_ip(text)
    if ip is not None:
        return join_host_port(ip, default_port)
    try:
        host, port = split_host_port(text)
    except ValueError:
        raise BadValueError("is not IP or IP:port") from None
    if port == 0:
        raise BadValueError("must have a port within the range [1, 65535]")
    return join_host_port(host, port)


def parse_cluster_cidrs(values: Sequence[str]) -> tuple[str, ...]:
    """The pod CIDRs: one, or a dual-stack pair (one IPv4, one IPv6); normalised."""
    cidrs = tuple(_cidr(v) for v in values if v.strip())
    if len(cidrs) > 2:
        raise BadValueError(
            "must be one CIDR or a dual-stack pair (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)"
        )
    if len(cidrs) == 2 and _family(cidrs[0]) == _family(cidrs[1]):
        raise BadValueError("must be a dual-stack pair: one IPv4 and one IPv6 CIDR")
    return cidrs


def parse_nodeport_addresses(values: Sequence[str]) -> tuple[str, ...]:
    """CIDRs limiting where NodePorts are open, or the single word "primary"; normalised."""
    items = split_list(values)
    if NODEPORT_ADDRESSES_PRIMARY in items:
        if len(items) != 1:
            raise BadValueError(f'can not mix "{NODEPORT_ADDRESSES_PRIMARY}" with CIDRs')
        return items
    return tuple(_cidr(v) for v in items)


def parse_cidr(text: str) -> str:
    """One CIDR, normalised (host bits cleared); `BadValueError` when it is not one."""
    cidr = normalize_cidr(text)
    if cidr is None or "%" in text:
        raise BadValueError("is not a valid CIDR")
    return cidr


def split_list(values: Sequence[str]) -> tuple[str, ...]:
    """The non-blank items, trimmed: a pflag string slice (`a,b`) or a file's list."""
    return tuple(v.strip() for v in values if v.strip())


def _cidr(text: str) -> str:
    try:
        return parse_cidr(text)
    except BadValueError:
        raise BadValueError(f"holds {quote(text.strip())}, which is not a valid CIDR") from None


def _family(cidr: str) -> int:
    return ipaddress.ip_network(cidr).version
