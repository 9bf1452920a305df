"""A bounded-frequency runner: coalesce bursts, run periodically, retry after failures.

kube-proxy's sync loop rules, in two layers so the timing logic is testable with a
fake clock:

- `Schedule` is pure arithmetic over monotonic times: when is the next run due?
  A request runs at once unless the previous run that did work (wrote to the kernel)
  started less than `min_interval` ago (then it waits for the rest of it: a burst of
  events becomes one sync); with no request at all a run is due `max_interval` after
  the previous one; a retry asked for after a failure is due at its own time. A run
  that did nothing (a periodic tick finding no change) does not hold the next change
  back: `min_interval` spaces kernel writes, not looks.
- `BoundedFrequencyRunner` drives a function from one dedicated thread using a
  `Schedule` and a `threading.Condition`. `request()` and `retry()` may be called from
  any thread and never block on the function.

The function always runs on the runner's thread, never concurrently with itself.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Schedule:
    """When the next run is due, given requests, retries and the previous run."""

    def __init__(self, min_interval: float, max_interval: float) -> None:
        if min_interval < 0 or max_interval <= 0:
            raise ValueError("intervals must be positive")
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._last_run: float | None = None
        self._last_work: float | None = None
        """When the last run that did work started (what min_interval counts from)."""
        self._work_before: float | None = None
        self._requested = False
        self._retry_at: float | None = None

    def request(self) -> None:
        """Ask for a run as soon as `min_interval` allows."""
        self._requested = True

    def retry(self, at: float) -> None:
        """Ask for a run at time `at` (after a failure); an earlier retry wins."""
        if self._retry_at is None or at < self._retry_at:
            self._retry_at = at

    def due(self, now: float) -> float:
        """The time the next run is due (may be <= now: run now)."""
        if self._last_run is None:
            # Nothing has run yet: only a request or a retry starts the first run.
            if self._requested:
                return now
            return self._retry_at if self._retry_at is not None else math.inf
        earliest = -math.inf if self._last_work is None else self._last_work + self.min_interval
        candidates = [self._last_run + self.max_interval]
        if self._requested:
            candidates.append(earliest)
        if self._retry_at is not None:
            candidates.append(max(self._retry_at, earliest))
        return min(candidates)

    def started(self, now: float) -> None:
        """Record that a run starts now: pending requests and retries are consumed."""
        self._last_run = now
        self._work_before, self._last_work = self._last_work, now
        self._requested = False
        self._retry_at = None

    def idle(self) -> None:
        """The run that just started did no work: it does not count for min_interval."""
        self._last_work = self._work_before


class BoundedFrequencyRunner:
    """Runs `fn` on its own thread as `Schedule` dictates, until stopped.

    `fn` returns False when it did nothing (see `Schedule.idle`); None or True count
    as work."""

    def __init__(
        self,
        fn: Callable[[], bool | None],
        *,
        min_interval: float,
        max_interval: float,
        name: str = "sync",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fn = fn
        self._schedule = Schedule(min_interval, max_interval)
        self._clock = clock
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def request(self) -> None:
        """Ask for a run soon; many requests within min_interval become one run."""
        with self._cond:
            self._schedule.request()
            self._cond.notify_all()

    def retry(self, delay: float) -> None:
        """Ask for a run `delay` seconds from now (after a failure)."""
        with self._cond:
            self._schedule.retry(self._clock() + delay)
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    wait = self._schedule.due(self._clock()) - self._clock()
                    if wait <= 0:
                        break
                    self._cond.wait(None if math.isinf(wait) else wait)
                if self._stopped:
                    return
                self._schedule.started(self._clock())
            try:
                worked = self._fn()
            except Exception:
                # The function handles its own errors; this only keeps the loop alive.
                log.exception("sync function raised; retrying after min interval")
                self.retry(self._schedule.min_interval or 1.0)
                continue
            if worked is False:
                with self._cond:
                    self._schedule.idle()
