"""The reflector against a scripted ListWatchClient, with a fake clock and no real sleeping.

`FakeClient` holds what each list page and each watch returns, in order; the call
that finds its script empty is still recorded, sets the stop event and ends the run,
so `run()` returns in the test's own thread. A watch script is a list of steps: an
event (one simulated second each), an exception raised mid-stream, or `BLOCK` (wait
until the stream is closed). A watch that ends normally lasts `lasts` simulated
seconds (the server's timeout).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.kube.backoff import Backoff, BackoffPolicy
from proxy.kube.listwatch import (
    SERVICES,
    ApiError,
    ListPage,
    RawObject,
    ResourceRef,
    WatchDisconnected,
    WatchError,
    WatchEvent,
    WatchExpired,
    WatchTimeout,
    metadata_only,
)
from proxy.kube.reflector import Reflector

BLOCK = "block"
MAX_CALLS = 50  # a runaway loop ends the test instead of hanging it


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


@dataclass
class Watch:
    steps: list[WatchEvent | Exception | str] = field(default_factory=list)
    lasts: float = 300.0


class FakeStream:
    def __init__(self, script: Watch, clock: FakeClock) -> None:
        self._steps = deque(script.steps)
        self._lasts = script.lasts
        self._clock = clock
        self.closed = threading.Event()

    def __iter__(self) -> FakeStream:
        return self

    def __next__(self) -> WatchEvent:
        if self.closed.is_set():
            raise StopIteration
        if not self._steps:
            self._clock.now += self._lasts
            raise StopIteration
        step = self._steps.popleft()
        if isinstance(step, Exception):
            raise step
        if step == BLOCK:
            self.closed.wait(10)
            raise StopIteration
        assert isinstance(step, WatchEvent)
        self._clock.now += 1
        return step

    def close(self) -> None:
        self.closed.set()


@dataclass
class ListCall:
    label_selector: str
    field_selector: str
    limit: int
    continue_: str | None


@dataclass
class WatchCall:
    resource_version: str
    label_selector: str
    field_selector: str
    timeout_seconds: int
    allow_bookmarks: bool
    read_timeout: float | None


class FakeClient:
    def __init__(self, clock: FakeClock, stop: threading.Event) -> None:
        self.clock = clock
        self.stop = stop
        self.pages: deque[ListPage | Exception] = deque()
        self.watches: deque[Watch | Exception] = deque()
        self.list_calls: list[ListCall] = []
        self.watch_calls: list[WatchCall] = []
        self.streams: list[FakeStream] = []
        self.watching = threading.Event()

    def _guard(self) -> None:
        if len(self.list_calls) + len(self.watch_calls) > MAX_CALLS:
            self.stop.set()

    def list(
        self,
        resource: ResourceRef,
        *,
        label_selector: str = "",
        field_selector: str = "",
        limit: int = 500,
        continue_: str | None = None,
    ) -> ListPage:
        assert resource == SERVICES
        self.list_calls.append(ListCall(label_selector, field_selector, limit, continue_))
        self._guard()
        if not self.pages:
            self.stop.set()
            raise ApiError(0, "ScriptEnded", "no more list pages scripted")
        page = self.pages.popleft()
        if isinstance(page, Exception):
            raise page
        return page

    def watch(
        self,
        resource: ResourceRef,
        *,
        resource_version: str,
        label_selector: str = "",
        field_selector: str = "",
        timeout_seconds: int,
        allow_bookmarks: bool = True,
        read_timeout: float | None = None,
    ) -> FakeStream:
        self.watch_calls.append(
            WatchCall(
                resource_version,
                label_selector,
                field_selector,
                timeout_seconds,
                allow_bookmarks,
                read_timeout,
            )
        )
        self._guard()
        if not self.watches:
            self.stop.set()
            return FakeStream(Watch(), self.clock)
        script = self.watches.popleft()
        if isinstance(script, Exception):
            raise script
        stream = FakeStream(script, self.clock)
        self.streams.append(stream)
        self.watching.set()
        return stream


def rv_of(obj: RawObject) -> str:
    return str(obj["metadata"].get("resourceVersion", ""))


def name_of(obj: RawObject) -> str:
    return str(obj["metadata"]["name"])


class Recorder:
    """Records handler calls; raises for objects named in `fail_on`."""

    def __init__(self, fail_on: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail_on = fail_on

    def _maybe_fail(self, obj: RawObject) -> None:
        if name_of(obj) in self.fail_on:
            raise RuntimeError(f"cannot handle {name_of(obj)}")

    def on_add(self, obj: RawObject) -> None:
        self.calls.append(("add", name_of(obj), rv_of(obj)))
        self._maybe_fail(obj)

    def on_update(self, old: RawObject, new: RawObject) -> None:
        self.calls.append(("update", name_of(new), rv_of(old), rv_of(new)))
        self._maybe_fail(new)

    def on_delete(self, obj: RawObject) -> None:
        self.calls.append(("delete", name_of(obj)))
        self._maybe_fail(obj)

    def on_synced(self) -> None:
        self.calls.append(("synced",))


def obj(name: str, rv: str, namespace: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": rv}}


def page(rv: str, *objs: RawObject, continue_: str | None = None) -> ListPage:
    return ListPage(list(objs), rv, continue_)


def added(o: RawObject) -> WatchEvent:
    return WatchEvent("ADDED", o)


def modified(o: RawObject) -> WatchEvent:
    return WatchEvent("MODIFIED", o)


def deleted(o: RawObject) -> WatchEvent:
    return WatchEvent("DELETED", o)


def bookmark(rv: str) -> WatchEvent:
    return WatchEvent("BOOKMARK", {"kind": "Service", "metadata": {"resourceVersion": rv}})


@dataclass
class Rig:
    clock: FakeClock
    stop: threading.Event
    client: FakeClient
    handler: Recorder
    reflector: Reflector

    def run(self) -> list[tuple[str, ...]]:
        self.reflector.run(self.stop)
        return self.handler.calls

    @property
    def watched_from(self) -> list[str]:
        return [call.resource_version for call in self.client.watch_calls]


def rig(handler: Recorder | None = None, **options: Any) -> Rig:
    clock = FakeClock()
    stop = threading.Event()
    client = FakeClient(clock, stop)
    handler = handler or Recorder()
    options.setdefault("rand", lambda: 0.0)
    reflector = Reflector(client, SERVICES, handler, clock=clock, sleep=clock.sleep, **options)
    return Rig(clock, stop, client, handler, reflector)


# -- list and initial sync ------------------------------------------------------------


def test_pages_reach_the_handler_as_they_arrive() -> None:
    """Only one page of decoded JSON is alive at a time (70 MiB for 10k slices at once)."""
    handled_before_second_page: list[int] = []
    r = rig()
    original = r.client.list

    def list_page(*args: Any, **kwargs: Any) -> ListPage:
        if kwargs.get("continue_"):
            handled_before_second_page.append(len(r.handler.calls))
        return original(*args, **kwargs)

    r.client.list = list_page  # type: ignore[method-assign]
    r.client.pages.extend([page("10", obj("a", "1"), continue_="next"), page("10", obj("b", "2"))])
    r.client.watches.append(Watch())
    r.run()
    assert handled_before_second_page == [1]


def test_a_list_restarted_after_an_expired_continue_deletes_what_it_gave_and_lost() -> None:
    """Page 1 handed out b; the restarted list no longer has it: b must be deleted."""
    r = rig()
    r.client.pages.extend(
        [
            page("10", obj("a", "1"), obj("b", "2"), continue_="next"),
            WatchExpired("continue token expired"),
            page("12", obj("a", "1"), continue_="next2"),
            page("12", obj("c", "3")),
        ]
    )
    r.client.watches.append(Watch())
    calls = r.run()
    assert calls == [
        ("add", "a", "1"),
        ("add", "b", "2"),
        ("add", "c", "3"),
        ("delete", "b"),
        ("synced",),
    ]
    assert set(r.reflector.snapshot()) == {"default/a", "default/c"}


def test_initial_sync_reports_every_page_then_synced_once() -> None:
    r = rig(label_selector="!x.io/a", field_selector="spec.x=y")
    r.client.pages.extend(
        [
            page("10", obj("a", "1"), obj("b", "2"), continue_="next"),
            page("10", obj("c", "3", namespace="kube-system")),
        ]
    )
    r.client.watches.append(Watch())
    assert not r.reflector.has_synced()

    calls = r.run()

    assert calls == [
        ("add", "a", "1"),
        ("add", "b", "2"),
        ("add", "c", "3"),
        ("synced",),
    ]
    assert r.reflector.has_synced()
    assert [c.continue_ for c in r.client.list_calls] == [None, "next"]
    assert {c.limit for c in r.client.list_calls} == {500}
    assert {c.label_selector for c in r.client.list_calls} == {"!x.io/a"}
    assert {c.field_selector for c in r.client.list_calls} == {"spec.x=y"}
    first_watch = r.client.watch_calls[0]
    assert first_watch.resource_version == "10"  # resumes exactly where the list ended
    assert first_watch.allow_bookmarks
    assert first_watch.read_timeout == 90.0
    assert first_watch.timeout_seconds == 300
    assert (first_watch.label_selector, first_watch.field_selector) == ("!x.io/a", "spec.x=y")
    assert set(r.reflector.snapshot()) == {"default/a", "default/b", "kube-system/c"}
    assert r.clock.sleeps == []


def test_watch_timeout_is_random_between_5_and_10_minutes() -> None:
    for rand, expected in ((0.0, 300), (0.5, 450), (0.9999, 600)):
        r = rig(rand=lambda value=rand: value)
        r.client.pages.append(page("1"))
        r.client.watches.append(Watch())
        r.run()
        assert r.client.watch_calls[0].timeout_seconds == expected


def test_cluster_scoped_objects_are_keyed_by_name() -> None:
    r = rig()
    r.client.pages.append(page("1", {"metadata": {"name": "node-1", "resourceVersion": "1"}}))
    r.client.watches.append(Watch())
    r.run()
    assert set(r.reflector.snapshot()) == {"node-1"}


def test_objects_without_a_name_are_skipped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    r = rig()
    r.client.pages.append(page("1", {"metadata": {}}, obj("a", "1")))
    r.client.watches.append(Watch([added({"spec": {}}), added(obj("b", "2"))]))
    calls = r.run()
    assert calls == [("add", "a", "1"), ("synced",), ("add", "b", "2")]
    assert r.reflector.stats().skipped_objects == 2
    assert "no metadata.name" in caplog.text


# -- watch ----------------------------------------------------------------------------


def test_watch_events_update_the_store_and_the_handler() -> None:
    r = rig()
    r.client.pages.append(page("5", obj("a", "1"), obj("b", "2")))
    r.client.watches.append(
        Watch([added(obj("c", "6")), modified(obj("a", "7")), deleted(obj("b", "8"))])
    )

    calls = r.run()

    assert calls[3:] == [("add", "c", "6"), ("update", "a", "1", "7"), ("delete", "b")]
    assert set(r.reflector.snapshot()) == {"default/a", "default/c"}
    assert rv_of(r.reflector.snapshot()["default/a"]) == "7"
    assert r.watched_from == ["5", "8"]
    assert r.reflector.resource_version == "8"


def test_added_for_a_known_key_is_an_update() -> None:
    r = rig()
    r.client.pages.append(page("5", obj("a", "1")))
    r.client.watches.append(Watch([added(obj("a", "6"))]))
    assert r.run()[2:] == [("update", "a", "1", "6")]


def test_bookmarks_advance_the_resource_version_without_handler_calls() -> None:
    r = rig()
    r.client.pages.append(page("5", obj("a", "1")))
    r.client.watches.append(Watch([bookmark("50"), bookmark("60")]))

    calls = r.run()

    assert calls == [("add", "a", "1"), ("synced",)]
    assert r.watched_from == ["5", "60"]
    assert set(r.reflector.snapshot()) == {"default/a"}


def test_server_closing_the_watch_rewatches_from_the_last_version_without_relist() -> None:
    r = rig()
    r.client.pages.append(page("5"))
    r.client.watches.extend([Watch([added(obj("a", "6"))]), Watch(), Watch()])
    r.run()
    assert len(r.client.list_calls) == 1
    assert r.watched_from == ["5", "6", "6", "6"]
    assert r.clock.sleeps == []
    assert r.reflector.stats().failures == 0


@pytest.mark.parametrize(
    "lost",
    [WatchTimeout("no data from the API server for 90s"), WatchDisconnected("connection lost")],
)
def test_silent_or_broken_connection_rewatches_from_the_last_version(
    lost: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    r = rig()
    r.client.pages.append(page("5", obj("a", "1")))
    r.client.watches.append(Watch([modified(obj("a", "6")), lost]))

    calls = r.run()

    assert calls == [("add", "a", "1"), ("synced",), ("update", "a", "1", "6")]
    assert len(r.client.list_calls) == 1  # no relist
    assert r.watched_from == ["5", "6"]
    assert r.clock.sleeps == []
    records = [rec for rec in caplog.records if "watching again" in rec.getMessage()]
    assert records
    assert records[0].levelno == logging.INFO


def test_unknown_event_types_are_ignored() -> None:
    r = rig()
    r.client.pages.append(page("5"))
    r.client.watches.append(Watch([WatchEvent("SURPRISE", obj("a", "6")), added(obj("b", "7"))]))
    assert r.run() == [("synced",), ("add", "b", "7")]


# -- 410 and the sweep ----------------------------------------------------------------


def test_expired_watch_relists_and_sweeps_what_changed_meanwhile() -> None:
    r = rig()
    r.client.pages.append(page("3", obj("a", "1"), obj("b", "1"), obj("c", "1")))
    r.client.watches.append(
        Watch([modified(obj("a", "4")), WatchExpired("too old resource version: 4 (90)")])
    )
    # While disconnected: b changed, c was deleted, d was created; a is as we saw it.
    r.client.pages.append(page("12", obj("a", "4"), obj("b", "9"), obj("d", "10")))

    calls = r.run()

    assert calls == [
        ("add", "a", "1"),
        ("add", "b", "1"),
        ("add", "c", "1"),
        ("synced",),
        ("update", "a", "1", "4"),
        ("update", "b", "1", "9"),
        ("add", "d", "10"),
        ("delete", "c"),
    ]
    assert set(r.reflector.snapshot()) == {"default/a", "default/b", "default/d"}
    assert r.watched_from == ["3", "12"]
    assert r.clock.sleeps == []  # a 410 after progress relists at once
    assert r.reflector.stats().lists == 2


def test_expired_at_watch_start_relists() -> None:
    r = rig()
    r.client.pages.append(page("3", obj("a", "1")))
    r.client.watches.append(Watch([bookmark("7"), WatchTimeout("no data")]))
    r.client.watches.append(WatchExpired("too old resource version: 7 (9)"))
    r.client.pages.append(page("9"))

    calls = r.run()

    assert calls[-1] == ("delete", "a")
    assert r.watched_from == ["3", "7", "9"]
    assert r.clock.sleeps == []


def test_expired_right_after_a_list_backs_off_before_relisting() -> None:
    r = rig()
    r.client.pages.extend([page("3"), page("3")])
    r.client.watches.extend([WatchExpired("too old"), Watch()])
    r.run()
    assert r.clock.sleeps == [0.8]
    assert len(r.client.list_calls) == 2


# -- errors, backoff, recovery --------------------------------------------------------


def test_api_errors_back_off_exponentially_then_recover(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig()
    r.client.pages.extend(
        [
            ApiError(500, "InternalError", "etcd is unhappy"),
            ApiError(0, "NewConnectionError", "Connection refused"),
            ApiError(403, "Forbidden", 'services is forbidden: cannot list "services"'),
            page("5", obj("a", "1")),
        ]
    )
    # Healthy for a while, then an error again: the backoff has forgotten the past.
    r.client.watches.extend([Watch(lasts=600), ApiError(500, "InternalError", "again")])
    r.client.pages.append(page("6", obj("a", "1")))
    r.client.watches.append(Watch())

    calls = r.run()

    assert calls == [("add", "a", "1"), ("synced",)]
    assert r.clock.sleeps == [0.8, 1.6, 3.2, 0.8]
    assert r.reflector.stats().failures == 4
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 4
    assert errors[0].startswith("services: list failed: HTTP 500 InternalError: etcd is unhappy")
    assert "Connection refused" in errors[1]
    assert "HTTP 403 Forbidden" in errors[2]
    assert errors[3].startswith("services: watch failed: HTTP 500")


def test_backoff_is_capped() -> None:
    r = rig()
    r.client.pages.extend([ApiError(500, "InternalError", "down")] * 8)
    r.client.pages.append(page("1"))
    r.client.watches.append(Watch())
    r.run()
    assert r.clock.sleeps == [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    assert r.reflector.has_synced()


@pytest.mark.parametrize(
    "failure",
    [
        WatchError(500, "InternalError", "etcdserver: leader changed"),
        ApiError(0, "ProtocolError", "connection reset"),
        RuntimeError("a bug in the client"),
    ],
)
def test_errors_during_a_watch_back_off_and_relist(failure: Exception) -> None:
    r = rig()
    r.client.pages.append(page("5", obj("a", "1"), obj("b", "1")))
    r.client.watches.append(Watch([added(obj("c", "6")), failure]))
    r.client.pages.append(page("7", obj("a", "1"), obj("c", "6")))

    calls = r.run()

    assert calls[-1] == ("delete", "b")
    assert r.clock.sleeps == [0.8]
    assert len(r.client.list_calls) == 2
    assert r.watched_from == ["5", "7"]


def test_a_client_bug_during_list_does_not_kill_the_reflector() -> None:
    r = rig()
    r.client.pages.extend([KeyError("raw_object"), page("1", obj("a", "1"))])
    r.client.watches.append(Watch())
    assert r.run() == [("add", "a", "1"), ("synced",)]
    assert r.clock.sleeps == [0.8]


def test_a_watch_closed_at_once_counts_as_a_failure() -> None:
    r = rig()
    r.client.pages.extend([page("1"), page("1")])
    r.client.watches.extend([Watch(lasts=0), Watch()])
    r.run()
    assert r.clock.sleeps == [0.8]
    assert len(r.client.list_calls) == 2


def test_jitter_spreads_the_delays() -> None:
    r = rig(rand=lambda: 0.5, backoff=BackoffPolicy(initial=1, maximum=10, jitter=0.5))
    r.client.pages.extend([ApiError(500, "InternalError", "down")] * 5)
    r.client.pages.append(page("1"))
    r.client.watches.append(Watch())
    r.run()
    assert r.clock.sleeps == [1.25, 2.5, 5.0, 10.0, 10.0]


def test_backoff_arithmetic() -> None:
    backoff = Backoff(BackoffPolicy(initial=0.8, maximum=30, jitter=0.0, reset_after=120))
    assert [backoff.failure(t) for t in (0, 1, 2, 3)] == [0.8, 1.6, 3.2, 6.4]
    assert backoff.failure(200) == 0.8  # healthy for longer than reset_after
    assert backoff.failure(201) == 1.6


def test_a_lean_store_still_sweeps_and_reports_full_new_objects() -> None:
    r = rig(store_transform=metadata_only)
    full = obj("a", "1") | {"spec": {"ports": [{"port": 80}]}}
    full["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    r.client.pages.append(page("5", full, obj("b", "1")))
    r.client.watches.append(Watch([modified(obj("a", "6") | {"spec": {}}), WatchExpired("gone")]))
    r.client.pages.append(page("9", obj("a", "6")))
    olds: list[RawObject] = []
    r.handler.on_update = lambda old, new: olds.append(old)  # type: ignore[method-assign]

    calls = r.run()

    assert calls[-1] == ("delete", "b")
    assert olds == [{"metadata": {"name": "a", "namespace": "default", "resourceVersion": "1"}}]
    kept = r.reflector.snapshot()["default/a"]
    assert kept == {"metadata": {"name": "a", "namespace": "default", "resourceVersion": "6"}}


# -- the handler ----------------------------------------------------------------------


def test_a_failing_handler_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    r = rig(Recorder(fail_on=("bad",)))
    r.client.pages.append(page("5", obj("a", "1"), obj("bad", "1"), obj("c", "1")))
    r.client.watches.append(Watch([modified(obj("bad", "6")), added(obj("d", "7"))]))

    calls = r.run()

    assert calls == [
        ("add", "a", "1"),
        ("add", "bad", "1"),
        ("add", "c", "1"),
        ("synced",),
        ("update", "bad", "1", "6"),
        ("add", "d", "7"),
    ]
    assert r.reflector.stats().handler_errors == 2
    assert r.reflector.stats().failures == 0
    assert "handler on_add failed for default/bad" in caplog.text
    assert "cannot handle bad" in caplog.text
    assert rv_of(r.reflector.snapshot()["default/bad"]) == "6"  # the store is still right
    assert r.watched_from == ["5", "7"]


def test_synced_is_reported_only_once() -> None:
    r = rig()
    r.client.pages.append(page("5"))
    r.client.watches.append(WatchExpired("too old"))
    r.client.pages.append(page("6"))
    r.client.watches.append(Watch())
    assert r.run().count(("synced",)) == 1


# -- stopping -------------------------------------------------------------------------


def test_stop_closes_the_live_watch_and_returns_promptly() -> None:
    r = rig()
    r.client.pages.append(page("5"))
    r.client.watches.append(Watch([BLOCK]))
    thread = threading.Thread(target=r.reflector.run, args=(threading.Event(),), daemon=True)
    thread.start()
    assert r.client.watching.wait(5)
    started = time.monotonic()
    r.reflector.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1.0
    assert r.client.streams[0].closed.is_set()
    assert len(r.client.watch_calls) == 1  # no rewatch after the stop


def test_the_stop_event_interrupts_a_backoff_wait() -> None:
    clock = FakeClock()
    stop = threading.Event()
    client = FakeClient(clock, threading.Event())
    client.pages.extend([ApiError(500, "InternalError", "down")] * 3)
    reflector = Reflector(client, SERVICES, Recorder(), backoff=BackoffPolicy(initial=30))
    thread = threading.Thread(target=reflector.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not client.list_calls and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1.0  # not the 30 s backoff
    assert len(client.list_calls) == 1


def test_stopped_before_running_does_nothing() -> None:
    r = rig()
    r.reflector.stop()
    r.run()
    assert r.client.list_calls == []
