"""Render-time benchmark of the iptables backend, as services x endpoints grow.

    .venv/bin/python -m benchmarks.render [--grid 100x10,1000x10,10000x10] [--repeat 3]

Prints, per grid point, the best-of-N CPU time to render the full restore input and
to render a one-port partial input (the port before and after, as the backend does), with
the full input's size. No
kernel is touched: this isolates our share of a sync. The kernel's share (the
`iptables-restore` of the same text) is what the benchmark harness issue measures
against; this script is the regression guard that replaced a timed unit test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

from proxy.backends.iptables import render
from proxy.model import (
    Endpoint,
    IPFamily,
    NodeContext,
    Protocol,
    ServiceKey,
    ServicePort,
    ServicePortName,
    ServicePortState,
)


def build_state(services: int, endpoints: int) -> dict[ServicePortName, ServicePortState]:
    """`services` ClusterIP TCP services (every tenth with a NodePort), `endpoints` each."""
    states: dict[ServicePortName, ServicePortState] = {}
    for index in range(services):
        name = ServicePortName(ServiceKey(f"ns{index % 50}", f"svc{index}"), "http", Protocol.TCP)
        vip = f"198.19.{index // 256 % 256}.{index % 256}"
        eps = []
        for offset in range(endpoints):
            number = index * endpoints + offset
            ip = f"198.18.{64 + number // 65536 % 64}.{number // 256 % 256}"
            eps.append(Endpoint(ip=f"{ip.rsplit('.', 1)[0]}.{number % 256}", port=8080))
        port = ServicePort(
            name=name,
            cluster_ips=(vip,),
            port=80,
            node_port=30000 + index % 2000 if index % 10 == 0 else 0,
        )
        states[name] = ServicePortState(port, tuple(eps), tuple(eps), tuple(eps))
    return states


def render_full(states: dict[ServicePortName, ServicePortState], ctx: render.RenderContext) -> str:
    ports = [render.render_port(n, s, ctx) for n, s in states.items()]
    return render.render_full(ctx=ctx, ports=ports)


def render_partial(
    states: dict[ServicePortName, ServicePortState], ctx: render.RenderContext
) -> str:
    """A one-port partial sync: the port rendered before and after, as the backend does."""
    name, state = next(iter(states.items()))
    old = render.render_port(name, state, ctx)
    new = render.render_port(
        name, replace(state, cluster_endpoints=state.cluster_endpoints[1:]), ctx
    )
    top = render.top_level_change([old.top_level], [new.top_level])
    delete = [chain for chain in old.nat_chains if chain not in new.nat_chains]
    return render.render_partial(top=top, write=[new], delete_nat=delete)


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="100x10,1000x10,5000x10,10000x10,1000x100")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    node = NodeContext("bench", ("198.18.0.2",), ("198.18.64.0/18",))
    ctx = render.RenderContext.build(node, family=node_family(), masquerade_bit=14)
    print(f"{'grid':>10} {'full render s':>14} {'partial s':>10} {'input MB':>9}")
    for point in args.grid.split(","):
        services, endpoints = (int(x) for x in point.split("x"))
        states = build_state(services, endpoints)
        text = render_full(states, ctx)
        full_s = best_of(args.repeat, lambda: render_full(states, ctx))  # noqa: B023
        partial_s = best_of(args.repeat, lambda: render_partial(states, ctx))  # noqa: B023
        print(f"{point:>10} {full_s:>14.3f} {partial_s:>10.4f} {len(text) / 1e6:>9.1f}")


def node_family() -> IPFamily:
    return IPFamily.V4


if __name__ == "__main__":
    main()
