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


def test_a_run_that_did_nothing_does_not_hold_the_next_change_back() -> None:
    """A periodic tick that found nothing to write must not delay a change by min_interval."""
    schedule = Schedule(min_interval=1, max_interval=30)
    schedule.request()
    schedule.started(0)  # wrote
    schedule.started(30)  # the tick ...
    schedule.idle()  # ... found nothing to do
    schedule.request()
    assert schedule.due(30.1) <= 30.1  # due now
    schedule.started(30.1)  # this one wrote
    schedule.request()
    assert schedule.due(30.2) == 31.1


def test_the_runner_marks_idle_runs() -> None:
    calls: list[float] = []
    done = threading.Event()

    def fn() -> bool:
        calls.append(0)
        if len(calls) == 2:
            done.set()
        return False  # never wrote anything

    runner = BoundedFrequencyRunner(fn, min_interval=3600, max_interval=3600)
    runner.start()
    try:
        runner.request()
        runner.request()  # with a min interval of an hour, only an idle first run lets this in
        for _ in range(100):
            if done.wait(0.05):
                break
            runner.request()
        assert done.is_set()
    finally:
        runner.stop(timeout=5)
