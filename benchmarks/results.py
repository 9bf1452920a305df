"""The results of a harness run: one JSON document, and the checks that it is well formed.

`RunResult` is filled in by `benchmarks.run` as the grid progresses and written after
every grid point (a run cut short still leaves what it measured). Everything the
Markdown table, the plots and the README show is read from this document, never from
elsewhere; `validate` is what the CI smoke test asserts about it (shape and internal
consistency: every timed figure has a read-back that matched, ratios agree with the
figures they divide), not any speed.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import stats
from benchmarks.floors import Floor
from benchmarks.scenarios import Changes, Convergence, Programming

SCHEMA = 1


def machine() -> dict[str, Any]:
    """What the figures were measured on."""

    def version(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        except OSError:
            return "absent"
        return (
            (done.stdout or done.stderr).strip().splitlines()[0]
            if done.stdout or done.stderr
            else ""
        )

    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iptables": version(["iptables", "--version"]),
        "nft": version(["nft", "--version"]),
        "load_at_start": list(os.getloadavg()),
    }


@dataclass
class PointResult:
    """One backend at one grid point."""

    backend: str
    services: int
    endpoints: int
    status: str = "ok"
    """ok, deadline, failed, skipped."""
    detail: str = ""
    convergence: list[Convergence] = field(default_factory=list)
    """One per repetition, each followed by its own floor."""
    floor: list[Floor] = field(default_factory=list)
    upstream: Floor | None = None
    changes: Changes | None = None
    lock_busy: int = 0
    """Times the proxy found the host-wide xtables lock held by another process (its log's
    "xtables lock busy"): contention from outside this run, which its figures include."""

    def seconds(self) -> float | None:
        """Median first convergence over the repetitions that succeeded."""
        values = [c.seconds for c in self.convergence if c.status == "ok" and c.seconds]
        return sorted(values)[len(values) // 2] if values else None

    def floor_seconds(self) -> float | None:
        values = [f.seconds for f in self.floor if f.ok and f.seconds]
        return sorted(values)[len(values) // 2] if values else None

    def ratio(self) -> float | None:
        """Median of per-repetition ratios (each convergence / the floor timed right after)."""
        pairs = [
            c.seconds / f.seconds
            for c, f in zip(self.convergence, self.floor, strict=False)
            if c.status == "ok" and c.seconds and f.ok and f.seconds
        ]
        return sorted(pairs)[len(pairs) // 2] if pairs else None

    def first(self) -> Convergence | None:
        return self.convergence[0] if self.convergence else None

    def summary(self) -> dict[str, Any]:
        """Derived figures, stored next to the raw ones for readers of the JSON."""
        changes = {}
        if self.changes is not None:
            for kind, values in self.changes.latencies.items():
                changes[kind] = {**stats.summary(values), "lost": self.changes.lost.get(kind, 0)}
        touch = [f.touch_median for f in self.floor if f.touch_median is not None]
        return {
            "first_convergence_s": self.seconds(),
            "floor_s": self.floor_seconds(),
            "ratio_to_floor": self.ratio(),
            "upstream_floor_s": self.upstream.seconds if self.upstream else None,
            "touch_floor_s": sorted(touch)[len(touch) // 2] if touch else None,
            "changes": changes,
        }


@dataclass
class ClusterResult:
    """The cluster-wide scenario: several nodes, one proxy each, one control plane."""

    nodes: int
    services: int
    endpoints: int
    status: str = "ok"
    detail: str = ""
    latencies: list[float] = field(default_factory=list)
    """API write -> that node forwards by the new rule, every (change, node) pair."""
    lost: int = 0
    changes: int = 0
    """(change, node) pairs: every change is expected on every node."""
    proxy_histogram: dict[str, float | None] = field(default_factory=dict)
    """p50/p90/p99 and count of every node's network programming histogram, summed."""


@dataclass
class RunResult:
    command: str
    started: str
    config: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=machine)
    schema: int = SCHEMA
    finished: str = ""
    skipped: list[str] = field(default_factory=list)
    points: list[PointResult] = field(default_factory=list)
    churn: dict[str, Programming] = field(default_factory=dict)
    burst: dict[str, Programming] = field(default_factory=dict)
    churn_point: str = ""
    cluster: dict[str, ClusterResult] = field(default_factory=dict)
    kopf: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Grid point -> what `benchmarks.kopf_ingest` printed (or why it failed)."""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for raw, point in zip(doc["points"], self.points, strict=True):
            raw["summary"] = point.summary()
        for name in ("churn", "burst"):
            for backend, prog in getattr(self, name).items():
                doc[name][backend]["summary"] = stats.summary(prog.latencies)
        for backend, cluster in self.cluster.items():
            doc["cluster"][backend]["summary"] = stats.summary(cluster.latencies)
        return doc

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, default=str))
        tmp.replace(path)


def validate(doc: dict[str, Any]) -> list[str]:
    """What is wrong with a results document (empty when it is well formed)."""
    problems: list[str] = []
    for key in ("schema", "command", "machine", "config", "points", "churn", "burst"):
        if key not in doc:
            problems.append(f"missing {key}")
    if problems:
        return problems
    if doc["schema"] != SCHEMA:
        problems.append(f"schema {doc['schema']} is not {SCHEMA}")
    for point in doc["points"]:
        where = f"{point['backend']} {point['services']}x{point['endpoints']}"
        if point["status"] not in {"ok", "deadline", "failed", "skipped"}:
            problems.append(f"{where}: status {point['status']!r}")
        if point["status"] != "ok":
            continue
        for conv in point["convergence"]:
            if conv["status"] != "ok" or not conv["seconds"] or conv["seconds"] <= 0:
                problems.append(f"{where}: a timed convergence that is not ok")
            if conv["read_back_endpoints"] != conv["expected_endpoints"]:
                problems.append(f"{where}: timed although the read-back did not match")
        for floor in point["floor"]:
            if floor["ok"] and floor["read_back_endpoints"] != floor["expected_endpoints"]:
                problems.append(f"{where}: floor timed although its read-back did not match")
        summary = point["summary"]
        if summary["ratio_to_floor"] is not None and summary["ratio_to_floor"] <= 0:
            problems.append(f"{where}: ratio {summary['ratio_to_floor']}")
        for kind, figures in summary["changes"].items():
            if figures["count"] and not (0 < figures["p50"] <= figures["p99"] <= figures["max"]):
                problems.append(f"{where}: {kind} percentiles out of order")
    for name in ("churn", "burst"):
        for backend, prog in doc[name].items():
            if len(prog["latencies"]) + prog["lost"] != prog["changes"]:
                problems.append(f"{name} {backend}: seen + lost != written")
    for backend, cluster in doc.get("cluster", {}).items():
        if (
            cluster["status"] == "ok"
            and len(cluster["latencies"]) + cluster["lost"] != cluster["changes"]
        ):
            problems.append(f"cluster {backend}: seen + lost != written x nodes")
    return problems
