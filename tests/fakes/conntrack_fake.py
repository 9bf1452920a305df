"""A conntrack table in memory: UDP flows, deleted by the same selection as the real one."""

from __future__ import annotations

from collections.abc import Iterable

from proxy.kernel.conntrack import ConntrackError, UdpFlow, UdpFlowSelector, matching
from proxy.model import IPFamily


def flow(src: str, sport: int, dst: str, dport: int, reply_src: str, reply_port: int) -> UdpFlow:
    family = IPFamily.V6 if ":" in dst else IPFamily.V4
    return UdpFlow(family, src, sport, dst, dport, reply_src, reply_port)


class FakeConntrack:
    """Holds flows; `delete_udp_flows` removes the selected ones, or fails when told to."""

    def __init__(self, flows: Iterable[UdpFlow] = ()) -> None:
        self.flows: list[UdpFlow] = list(flows)
        self.calls: list[list[UdpFlowSelector]] = []
        self.fail_next = 0

    def delete_udp_flows(self, selectors: Iterable[UdpFlowSelector]) -> dict[IPFamily, int]:
        chosen = list(selectors)
        self.calls.append(chosen)
        if self.fail_next:
            self.fail_next -= 1
            raise ConntrackError(1, "Operation not permitted")
        doomed = list(matching(chosen, self.flows))
        self.flows = [f for f in self.flows if f not in doomed]
        counts: dict[IPFamily, int] = {}
        for gone in doomed:
            counts[gone.family] = counts.get(gone.family, 0) + 1
        return counts
