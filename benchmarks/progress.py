"""The live progress display: current backend, grid point, phase, elapsed time and ETA.

On a terminal it is a `rich` live panel redrawn four times a second from a background
thread that rich owns; elsewhere (CI logs, a pipe) each phase change prints one plain
line, so logs stay readable. The ETA weighs each remaining (backend, point) by a rough
cost (a fixed part plus one proportional to the endpoints it holds) and scales the
weights by the time the finished ones actually took.

Concurrency: `Progress` methods are called from the harness's main thread only; rich's
refresh thread calls `_render`, which only reads plain attributes (a torn read shows a
stale line for a quarter of a second, nothing worse).
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.table import Table

from benchmarks.grid import Point


def weight(point: Point) -> float:
    """Rough relative cost of one backend at one point (minutes-ish at 10k x 10)."""
    return 1.0 + point.size / 20_000


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_weight: float, *, live: bool | None = None) -> None:
        self.console = Console(stderr=True)
        self.live_mode = self.console.is_terminal if live is None else live
        self.total = max(total_weight, 1e-9)
        self.done = 0.0
        self.began = time.monotonic()
        self.backend = ""
        self.point = ""
        self.phase = "starting"
        self.detail = ""
        self.lines: list[str] = []
        self._live: Live | None = None

    def __enter__(self) -> Progress:
        if self.live_mode:
            # get_renderable: rich's refresh thread redraws from the current state, so the
            # clock and the ETA move during a long phase too.
            self._live = Live(
                console=self.console, refresh_per_second=4, get_renderable=self._render
            )
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)

    def eta(self) -> float | None:
        if self.done <= 0:
            return None
        elapsed = time.monotonic() - self.began
        return elapsed / self.done * (self.total - self.done)

    def _render(self) -> Table:
        table = Table.grid(padding=(0, 2))
        eta = self.eta()
        table.add_row("backend", self.backend or "-")
        table.add_row("grid point", self.point or "-")
        table.add_row("phase", f"{self.phase} {self.detail}".strip())
        table.add_row(
            "elapsed / ETA",
            f"{_clock(time.monotonic() - self.began)} / "
            + (_clock(eta) if eta is not None else "estimating"),
        )
        table.add_row("done", f"{100 * self.done / self.total:.0f} %")
        for line in self.lines[-8:]:
            table.add_row("", line)
        return table

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def set(self, *, backend: str | None = None, point: str | None = None, phase: str) -> None:
        """A new phase begins."""
        self.backend = backend if backend is not None else self.backend
        self.point = point if point is not None else self.point
        self.phase, self.detail = phase, ""
        if self._live is None:
            eta = self.eta()
            eta_text = _clock(eta) if eta is not None else "?"
            print(
                f"[{_clock(time.monotonic() - self.began)} eta {eta_text}] "
                f"{self.backend} {self.point}: {phase}",
                file=sys.stderr,
                flush=True,
            )
        self._refresh()

    def note(self, detail: str) -> None:
        """Progress inside a phase (samples taken, seconds waited); shown live only."""
        self.detail = detail
        self._refresh()

    def result(self, line: str) -> None:
        """A finished measurement, kept on screen and printed to stdout."""
        self.lines.append(line)
        if self._live is not None:
            self._live.console.print(line)
        else:
            print(line, flush=True)
        self._refresh()

    def advance(self, amount: float) -> None:
        self.done += amount
        self._refresh()
