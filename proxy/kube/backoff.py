"""Exponential backoff with jitter that forgets old failures, as client-go's reflector uses.

Pure arithmetic over times the caller passes in (no clock, no sleeping), so it is
tested without waiting. One `Backoff` belongs to one reflector thread; it is not
thread-safe and needs not be.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """How long to wait after consecutive failures."""

    initial: float = 0.8
    """Delay after the first failure, in seconds (client-go: 800 ms)."""
    maximum: float = 30.0
    """Ceiling of the delay, jitter included (client-go: 30 s)."""
    factor: float = 2.0
    """Each further failure multiplies the delay by this."""
    jitter: float = 0.5
    """Up to this fraction is added at random, so reflectors that failed together
    (an API server restart) do not all come back in the same instant."""
    reset_after: float = 120.0
    """A failure this long after the previous one starts again at `initial`: the
    reflector was healthy in between (client-go: 2 min)."""


class Backoff:
    """The delay to wait before retrying, given when each failure happened."""

    def __init__(self, policy: BackoffPolicy, rand: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self._rand = rand
        self._base = 0.0
        self._last_failure: float | None = None

    def failure(self, now: float) -> float:
        """Record a failure at `now` (monotonic seconds); return how long to wait."""
        policy = self.policy
        healthy_since_last = (
            self._last_failure is None or now - self._last_failure >= policy.reset_after
        )
        if healthy_since_last or self._base == 0.0:
            self._base = policy.initial
        else:
            self._base = min(self._base * policy.factor, policy.maximum)
        self._last_failure = now
        return min(self._base * (1.0 + policy.jitter * self._rand()), policy.maximum)
