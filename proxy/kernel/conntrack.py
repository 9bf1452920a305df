"""Deleting stale UDP flows from the kernel's connection tracking table, over netlink.

Why: conntrack pins a UDP "connection" (a client address and port talking to a
service address and port) to the endpoint its first packet was DNATed to, and keeps
it as long as packets keep coming (DNS clients reuse a source port for ever). When
that endpoint goes away, or when the first packets were rejected because the
service had no endpoint yet, the client stays stuck until the flow times out.
kube-proxy deletes such flows after each sync; `proxy.conntrack` decides which, this
module only executes the decision.

The vocabulary is one `UdpFlowSelector`: "UDP flows of this family whose original
destination is `dst_ip`:`dst_port` (any address when `dst_ip` is None, for a
NodePort) and whose reply source address and port, the endpoint that answers, is
not one of `keep_reply_sources`". With an empty keep set it selects every flow to
that destination.

How (`NetlinkConntrack`): one dump per selector, filtered in the kernel by protocol,
destination port and address (CTA_FILTER, kernel 5.8+: the kernel walks its table,
only matching flows cross netlink), then one delete per selected flow, by its
original tuple. The cost is proportional to the selectors (the services that changed)
and the flows they select, not to the size of the table; there is never a dump per
flow. When the selectors are many compared with the table (the first sync after a
start examines every UDP service), one dump of every UDP flow matched in Python
through an index is cheaper, and is used instead (`FILTERED_DUMP_COST`); pyroute2
parses about 2,500 flows a second here, so a first cleanup against a table of 100k
flows takes tens of seconds on the sync thread (the rules are already committed). A
flow that vanished between dump and delete (ENOENT) is not an error.
The socket is opened in `netns` when one is named (tests and the lab run a backend
in a namespace; the real proxy runs in the node's namespace and passes None).

The table is never flushed, and nothing but UDP flows selected this way is deleted.

Concurrency: called only from the proxier's sync thread; a socket is opened per call
and closed before returning, so nothing is shared between calls or threads.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.model import IPFamily

_IPPROTO_UDP = 17

FILTERED_DUMP_COST = 40
"""What one kernel-filtered dump costs, in flows parsed by pyroute2 (measured on the
development machine: about 15 ms per filtered dump against 0.4 ms per flow parsed).
With more selectors than the table's size over this, one dump of every UDP flow,
matched in Python through an index, is cheaper than a filtered dump per selector."""


@dataclass(frozen=True, slots=True)
class UdpFlowSelector:
    """UDP flows to `dst_ip`:`dst_port` answered by anyone but `keep_reply_sources`."""

    family: IPFamily
    dst_port: int
    dst_ip: str | None = None
    """The original destination address; None matches any (a NodePort on every address)."""
    keep_reply_sources: frozenset[tuple[str, int]] = frozenset()
    """Endpoints (address, port) whose flows stay; every other flow to the destination goes."""

    def sort_key(self) -> tuple[int, str, int]:
        """NodePorts (any address) first, then by address and port."""
        return (int(self.family), self.dst_ip or "", self.dst_port)

    def __str__(self) -> str:
        where = f"{self.dst_ip}:{self.dst_port}" if self.dst_ip else f"*:{self.dst_port}"
        keep = ",".join(f"{ip}:{port}" for ip, port in sorted(self.keep_reply_sources))
        keep = keep or "nothing"
        return f"udp to {where} keeping {keep}"


@dataclass(frozen=True, slots=True)
class UdpFlow:
    """One tracked UDP flow, as much of it as the selection needs."""

    family: IPFamily
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    reply_src_ip: str
    """Where replies come from: the endpoint after DNAT, the destination itself without."""
    reply_src_port: int


def selects(selector: UdpFlowSelector, flow: UdpFlow) -> bool:
    """True when `selector` asks for `flow` to be deleted."""
    return (
        flow.family == selector.family
        and flow.dst_port == selector.dst_port
        and (selector.dst_ip is None or flow.dst_ip == selector.dst_ip)
        and (flow.reply_src_ip, flow.reply_src_port) not in selector.keep_reply_sources
    )


class ConntrackError(OSError):
    """The conntrack table could not be read or changed."""


class ConntrackTable(Protocol):
    """What the core needs of the conntrack table (faked in unit tests)."""

    def delete_udp_flows(self, selectors: Iterable[UdpFlowSelector]) -> dict[IPFamily, int]:
        """Delete every flow a selector selects; return how many, per family.

        Raises `ConntrackError` when the table cannot be read or a delete fails for a
        reason other than the flow being gone already.
        """


class NetlinkConntrack:
    """The real table, through pyroute2's ctnetlink socket, in `netns` when named."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns

    def delete_udp_flows(self, selectors: Iterable[UdpFlowSelector]) -> dict[IPFamily, int]:
        by_family: dict[IPFamily, list[UdpFlowSelector]] = {}
        for selector in selectors:
            by_family.setdefault(selector.family, []).append(selector)
        deleted: dict[IPFamily, int] = {}
        for family, chosen in sorted(by_family.items()):  # IPFamily is an IntEnum
            deleted[family] = self._delete_family(family, chosen)
        return deleted

    def _delete_family(self, family: IPFamily, selectors: list[UdpFlowSelector]) -> int:
        # Imported here: pyroute2 is needed only once a flow must go, and a broken
        # install must not stop the proxy from programming rules.
        from pyroute2 import Conntrack  # type: ignore[import-untyped]  # noqa: PLC0415
        from pyroute2.netlink.exceptions import (  # type: ignore[import-untyped]  # noqa: PLC0415
            NetlinkError,
        )
        from pyroute2.netlink.nfnetlink.nfctsocket import (  # type: ignore[import-untyped]  # noqa: PLC0415
            NFCTAttrTuple,
        )

        failures = (OSError, NetlinkError)

        af = socket.AF_INET6 if family == IPFamily.V6 else socket.AF_INET
        count = 0
        try:
            table: Any = Conntrack(nfgen_family=af, netns=self._netns)
        except failures as err:
            raise ConntrackError(_code(err), f"cannot open the conntrack table: {err}") from err

        def dump(what: str, **match: Any) -> list[Any]:
            # The whole (kernel-filtered) dump first: pyroute2 cannot send a delete
            # while a dump is still being read on the same socket.
            query = NFCTAttrTuple(family=af, proto=_IPPROTO_UDP, **match)
            try:
                return list(table.dump_entries(tuple_orig=query))
            except failures as err:
                raise ConntrackError(_code(err), f"cannot list {what}: {err}") from err

        try:
            if len(selectors) * FILTERED_DUMP_COST < _table_size(table):
                candidates = [
                    (entry, [selector])
                    for selector in selectors
                    for entry in dump(str(selector), dport=selector.dst_port, daddr=selector.dst_ip)
                ]
            else:
                index = _Index(selectors)
                candidates = [(e, index.lookup(_flow(family, e))) for e in dump("udp flows")]
            for entry, chosen in candidates:
                flow = _flow(family, entry)
                if not any(selects(selector, flow) for selector in chosen):
                    continue
                try:
                    table.delete(entry)
                except failures as err:
                    if _code(err) == errno.ENOENT:  # expired or deleted meanwhile
                        continue
                    raise ConntrackError(_code(err), f"cannot delete a flow: {err}") from err
                count += 1
        finally:
            table.close()
        return count


class _Index:
    """Selectors by destination, to match the flows of one unfiltered dump quickly."""

    def __init__(self, selectors: Iterable[UdpFlowSelector]) -> None:
        self._by_dest: dict[tuple[str | None, int], list[UdpFlowSelector]] = {}
        for selector in selectors:
            self._by_dest.setdefault((selector.dst_ip, selector.dst_port), []).append(selector)

    def lookup(self, flow: UdpFlow) -> list[UdpFlowSelector]:
        return [
            *self._by_dest.get((flow.dst_ip, flow.dst_port), ()),
            *self._by_dest.get((None, flow.dst_port), ()),  # NodePorts: any address
        ]


def _table_size(table: Any) -> int:
    """Flows in the whole table (every family and protocol).

    Only a cost estimate: when it cannot be read, a huge table is assumed, so that the
    filtered dumps (whose cost does not grow with the table) are used."""
    try:
        size = table.count()
    except Exception:
        return sys.maxsize
    return size if isinstance(size, int) else sys.maxsize


def _code(err: BaseException) -> int:
    """The errno of an OSError or of pyroute2's NetlinkError (which is no OSError)."""
    code = getattr(err, "errno", None) or getattr(err, "code", None)
    return code if isinstance(code, int) else errno.EIO


def _flow(family: IPFamily, entry: Any) -> UdpFlow:
    orig, reply = entry.tuple_orig, entry.tuple_reply
    return UdpFlow(
        family=family,
        src_ip=str(orig.saddr),
        src_port=int(orig.sport or 0),
        dst_ip=str(orig.daddr),
        dst_port=int(orig.dport or 0),
        reply_src_ip=str(reply.saddr),
        reply_src_port=int(reply.sport or 0),
    )


def matching(selectors: Iterable[UdpFlowSelector], flows: Iterable[UdpFlow]) -> Iterator[UdpFlow]:
    """The flows at least one selector selects (what a fake table deletes)."""
    chosen = list(selectors)
    return (flow for flow in flows if any(selects(s, flow) for s in chosen))
