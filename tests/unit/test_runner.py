"""Bounded-frequency scheduling with a fake clock, and the runner thread for real."""

from __future__ import annotations

import math
import threading

from proxy.runner import BoundedFrequencyRunner, Schedule


def test_first_run_waits_for_a_request() -> None:
    schedule = Schedule(min_interval=1, max_interval=30)
    assert math.isinf(schedule.due(0))
    schedule.request()
    assert schedule.due(5) == 5


def test_burst_is_coalesced_by_min_interval() -> None:
    schedule = Schedule(min_interval=1, max_interval=30)
    schedule.request()
    schedule.started(10)
    schedule.request()
    schedule.request()
    assert schedule.due(10.2) == 11
    schedule.started(11)
    assert schedule.due(11) == 41  # nothing requested: periodic run


def test_retry_is_bounded_by_min_interval_and_earliest_wins() -> None:
    schedule = Schedule(min_interval=2, max_interval=30)
    schedule.request()
    schedule.started(0)
    schedule.retry(1)
    assert schedule.due(0.5) == 2
    schedule.retry(5)
    assert schedule.due(0.5) == 2
    schedule.started(2)
    assert schedule.due(2) == 32


def test_runner_thread_runs_on_request_and_stops() -> None:
    ran = threading.Event()
    count = [0]

    def fn() -> None:
        count[0] += 1
        ran.set()

    runner = BoundedFrequencyRunner(fn, min_interval=0, max_interval=3600)
    runner.start()
    try:
        assert not ran.wait(0.05)
        runner.request()
        assert ran.wait(5)
    finally:
        runner.stop(timeout=5)
    assert count[0] == 1
