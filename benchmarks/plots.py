"""PNG plots of a results document (matplotlib, headless `Agg` backend).

- `convergence.png`: first convergence against services (log-log), one panel per number
  of endpoints per service, one line per backend, with its kernel floor (dashed) and
  upstream's layout (dotted) in the same colour.
- `changes.png`: one endpoint change (p50 solid, p99 dashed; the mean over add, remove
  and unready) against services (log-log), the same panels and lines. Adding a service
  is left out: it waits one min sync period by design (two API events).

Pure apart from writing the two files; reads only the results document.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure

matplotlib.use("Agg")
# After choosing the headless backend (ruff does not count a call as code before imports).
import matplotlib.pyplot as plt


def _panels(doc: dict[str, Any]) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """endpoints per service -> backend -> its points that succeeded, by services."""
    panels: dict[int, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for point in doc["points"]:
        if point["status"] == "ok":
            panels[point["endpoints"]][point["backend"]].append(point)
    for backends in panels.values():
        for points in backends.values():
            points.sort(key=lambda p: p["services"])
    return dict(sorted(panels.items()))


def _figure(count: int) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(1, max(count, 1), figsize=(max(6.0, 5.0 * count), 4.8), squeeze=False)
    return fig, list(axes[0])


def _colours(doc: dict[str, Any]) -> dict[str, str]:
    names = sorted({p["backend"] for p in doc["points"]})
    return {name: f"C{index}" for index, name in enumerate(names)}


def _finish(fig: Figure, axes: list[Axes], title: str, ylabel: str, path: Path) -> None:
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("services")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def convergence(doc: dict[str, Any], path: Path) -> None:
    panels = _panels(doc)
    colours = _colours(doc)
    fig, axes = _figure(len(panels))
    for ax, (endpoints, backends) in zip(axes, panels.items(), strict=False):
        ax.set_title(f"{endpoints} endpoint(s) per service")
        for backend, points in sorted(backends.items()):
            colour = colours[backend]
            series = {
                "this proxy": ("first_convergence_s", "o-"),
                "raw tool, same ruleset": ("floor_s", "s--"),
                "raw tool, upstream's layout": ("upstream_floor_s", "^:"),
            }
            for label, (key, style) in series.items():
                xy = [(p["services"], p["summary"][key]) for p in points if p["summary"][key]]
                if xy:
                    xs, ys = zip(*xy, strict=True)
                    ax.plot(xs, ys, style, color=colour, label=f"{backend}: {label}")
    _finish(fig, axes, "First full sync against cluster size", "seconds", path)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def changes(doc: dict[str, Any], path: Path) -> None:
    panels = _panels(doc)
    colours = _colours(doc)
    fig, axes = _figure(len(panels))
    for ax, (endpoints, backends) in zip(axes, panels.items(), strict=False):
        ax.set_title(f"{endpoints} endpoint(s) per service")
        for backend, points in sorted(backends.items()):
            rows = []
            for p in points:
                kinds = [
                    figures
                    for kind, figures in p["summary"]["changes"].items()
                    if kind != "add service"  # waits a min sync period by design
                ]
                p50 = _mean([k["p50"] for k in kinds if k["p50"] is not None])
                p99 = _mean([k["p99"] for k in kinds if k["p99"] is not None])
                if p50 is not None and p99 is not None:
                    rows.append((p["services"], p50, p99))
            if rows:
                xs, p50s, p99s = zip(*rows, strict=True)
                ax.plot(xs, p50s, "o-", color=colours[backend], label=f"{backend} p50")
                ax.plot(xs, p99s, "o--", color=colours[backend], alpha=0.7, label=f"{backend} p99")
    _finish(
        fig,
        axes,
        "One endpoint change, API write -> forwarded\n(mean of add / remove / unready)",
        "seconds",
        path,
    )


def render(doc: dict[str, Any], out: Path) -> None:
    convergence(doc, out / "convergence.png")
    changes(doc, out / "changes.png")
