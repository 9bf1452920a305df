"""PNG plots of a results document (matplotlib, headless `Agg` backend).

- `convergence.png`: first convergence against services x endpoints (log-log), one line
  per backend, with its kernel floor (dashed) and upstream's layout (dotted) in the
  same colour.
- `changes.png`: one-change latency (p50 solid, p99 dashed; the mean over the kinds of
  change) against services x endpoints (log x, log y), one line per backend.

Pure apart from writing the two files; reads only the results document.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _by_backend(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for point in doc["points"]:
        if point["status"] == "ok":
            grouped[point["backend"]].append(point)
    for points in grouped.values():
        points.sort(key=lambda p: p["services"] * p["endpoints"])
    return grouped


def _size(point: dict[str, Any]) -> int:
    return int(point["services"] * point["endpoints"])


def convergence(doc: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (backend, points) in enumerate(sorted(_by_backend(doc).items())):
        colour = f"C{index}"
        sizes = [_size(p) for p in points]
        ax.plot(
            sizes,
            [p["summary"]["first_convergence_s"] for p in points],
            "o-",
            color=colour,
            label=f"{backend}: this proxy",
        )
        floor = [
            (s, p["summary"]["floor_s"])
            for s, p in zip(sizes, points, strict=True)
            if p["summary"]["floor_s"]
        ]
        if floor:
            ax.plot(
                *zip(*floor, strict=True),
                "s--",
                color=colour,
                alpha=0.7,
                label=f"{backend}: raw tool, same ruleset",
            )
        up = [
            (s, p["summary"]["upstream_floor_s"])
            for s, p in zip(sizes, points, strict=True)
            if p["summary"]["upstream_floor_s"]
        ]
        if up:
            ax.plot(
                *zip(*up, strict=True),
                "^:",
                color=colour,
                alpha=0.7,
                label=f"{backend}: raw tool, upstream's layout",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("endpoints in the cluster (services x endpoints)")
    ax.set_ylabel("first convergence, s")
    ax.set_title("First full sync against cluster size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def changes(doc: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (backend, points) in enumerate(sorted(_by_backend(doc).items())):
        colour = f"C{index}"
        rows = []
        for p in points:
            kinds = p["summary"]["changes"].values()
            p50 = _mean([k["p50"] for k in kinds if k["p50"] is not None])
            p99 = _mean([k["p99"] for k in kinds if k["p99"] is not None])
            if p50 is not None and p99 is not None:
                rows.append((_size(p), p50, p99))
        if rows:
            sizes, p50s, p99s = zip(*rows, strict=True)
            ax.plot(sizes, p50s, "o-", color=colour, label=f"{backend} p50")
            ax.plot(sizes, p99s, "o--", color=colour, alpha=0.7, label=f"{backend} p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("endpoints in the cluster (services x endpoints)")
    ax.set_ylabel("API write -> forwarded by the new rule, s")
    ax.set_title("One change (mean over add / remove / unready endpoint, add service)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(doc: dict[str, Any], out: Path) -> None:
    convergence(doc, out / "convergence.png")
    changes(doc, out / "changes.png")
