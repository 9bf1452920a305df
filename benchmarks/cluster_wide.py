"""Cluster-wide network programming: several nodes, one proxy each, one control plane.

Placeholder until the multi-node lab lands in this harness: reports `not run`.
"""

from __future__ import annotations

from benchmarks.backends import Backend
from benchmarks.grid import Config
from benchmarks.progress import Progress
from benchmarks.results import ClusterResult


def measure(config: Config, backend: Backend, progress: Progress) -> ClusterResult:
    point = config.nodes_point
    return ClusterResult(
        config.nodes, point.services, point.endpoints, status="not run", detail="not built yet"
    )
