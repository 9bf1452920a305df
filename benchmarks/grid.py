"""What a harness run covers: the grid of cluster sizes and the knobs of each scenario.

`Config` is built once from the command line (`benchmarks.__main__`) and passed down
read-only; nothing here touches the kernel or the network. The full grid is the issue's
(100, 1k, 5k, 10k services x 1 and 10 endpoints, and 1k x 100); `--quick` swaps in a
tiny grid and small sample counts so that CI can check the harness end to end in well
under a minute (a smoke test of the machinery and of the output's shape, not a timing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, order=True)
class Point:
    """One cluster size: `services` ClusterIP services of one TCP port, `endpoints` each."""

    services: int
    endpoints: int

    @property
    def label(self) -> str:
        return f"{self.services}x{self.endpoints}"

    @property
    def size(self) -> int:
        """Endpoints in the cluster: what a full sync's work grows with."""
        return self.services * self.endpoints


FULL_GRID = (
    Point(100, 1),
    Point(100, 10),
    Point(1000, 1),
    Point(1000, 10),
    Point(1000, 100),
    Point(5000, 1),
    Point(5000, 10),
    Point(10000, 1),
    Point(10000, 10),
)
QUICK_GRID = (Point(40, 3),)


def parse_points(text: str) -> tuple[Point, ...]:
    """``"100x1,1000x10"`` -> points, sorted by size (smallest first)."""
    points = []
    for item in text.split(","):
        services, sep, endpoints = item.strip().partition("x")
        if not sep:
            raise ValueError(f"grid point {item!r}: write SERVICESxENDPOINTS, e.g. 1000x10")
        point = Point(int(services), int(endpoints))
        if point.services < 1 or point.endpoints < 1:
            raise ValueError(f"grid point {item!r}: both numbers must be at least 1")
        points.append(point)
    return tuple(sorted(set(points), key=lambda p: (p.size, p.services)))


@dataclass(frozen=True)
class Config:
    """Everything a run needs to know; see `python -m benchmarks --help` for each knob."""

    points: tuple[Point, ...]
    backends: tuple[str, ...]
    """Names from `benchmarks.backends.BACKENDS` to run, in order."""
    out: Path
    quick: bool = False
    samples: int = 100
    """One-change samples of each kind (add, remove, unready endpoint; add service)."""
    deadline: float = 600.0
    """Seconds a first convergence may take; past it the point is reported as missed."""
    sync_period: float = 10.0
    """The proxy's --iptables-sync-period: short, so periodic ticks fall inside the samples."""
    min_sync_period: float = 1.0
    """The proxy's --iptables-min-sync-period (kube-proxy's default)."""
    spacing: tuple[float, float] = (1.1, 1.6)
    """Seconds (uniformly drawn) between a change seen and the next one written: past the
    min sync period, so that each change is measured alone."""
    settle: float = 2.0
    """Seconds after convergence before the steady RSS is read."""
    repeat: int = 1
    """Convergences measured per point (each after `--cleanup`); the median is reported."""
    churn_rate: float = 20.0
    """Changes per second of the churn scenario."""
    churn_seconds: float = 60.0
    burst: int = 1000
    """Changes written back to back in the burst scenario."""
    churn_point: Point | None = None
    """Where churn and burst run (None: the largest point with at least 10 endpoints)."""
    upstream: bool = True
    """Also time upstream kube-proxy's ruleset layout with the raw tool."""
    kopf: str | None = None
    """An interpreter that has kopf: its `on.event` ingest is measured at every point."""
    nodes: int = 0
    """Nodes of the cluster-wide scenario (0: skip it)."""
    nodes_point: Point = field(default=Point(1000, 10))
    seed: int = 1

    def churn_at(self) -> Point | None:
        """The point churn and burst run at, if it is on the grid."""
        if self.churn_point is not None:
            return self.churn_point if self.churn_point in self.points else None
        tens = [p for p in self.points if p.endpoints >= 2]
        return max(tens, key=lambda p: (p.services, p.size)) if tens else None


def quick(out: Path, backends: tuple[str, ...], kopf: str | None = None) -> Config:
    """The CI smoke test's configuration: every scenario once, tiny."""
    return Config(
        points=QUICK_GRID,
        backends=backends,
        out=out,
        quick=True,
        samples=1,
        deadline=60.0,
        sync_period=2.0,
        # Nothing is timed: no min sync period, so the changes need no spacing.
        min_sync_period=0.0,
        spacing=(0.02, 0.05),
        settle=0.2,
        churn_rate=10.0,
        churn_seconds=1.0,
        burst=20,
        churn_point=QUICK_GRID[-1],
        kopf=kopf,
        nodes=2,
        nodes_point=Point(20, 2),
    )
