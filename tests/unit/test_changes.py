"""The change tracker and endpoint merging."""

from __future__ import annotations

from proxy.changes import ChangeTracker, merge_endpoints
from proxy.model import (
    IPFamily,
    Protocol,
    ServiceInfo,
    ServiceKey,
    ServicePort,
    ServicePortName,
    SliceEndpoint,
    SliceInfo,
    SlicePort,
)

KEY = ServiceKey("ns", "web")
PORT = ServicePort(ServicePortName(KEY, "http", Protocol.TCP), ("198.19.0.10",), 80)


def slice_info(
    name: str, *ips: str, port: int = 8080, ready: bool = True, t: float | None = None
) -> SliceInfo:
    return SliceInfo(
        namespace="ns",
        name=name,
        service=KEY,
        family=IPFamily.V4,
        ports=(SlicePort("http", port, Protocol.TCP),),
        endpoints=tuple(SliceEndpoint(ip, ready, ready, False, "n1") for ip in ips),
        trigger_time=t,
    )


def test_merge_dedupes_across_slices_and_prefers_ready() -> None:
    a = slice_info("a", "198.18.64.2", "198.18.64.10", ready=False)
    b = slice_info("b", "198.18.64.10", "198.18.64.3")
    merged = merge_endpoints(PORT, [a, b], "n1")
    assert [(e.ip, e.ready) for e in merged] == [
        ("198.18.64.2", False),
        ("198.18.64.3", True),
        ("198.18.64.10", True),
    ]
    assert all(e.is_local for e in merged)


def test_named_target_port_resolves_per_slice() -> None:
    a = slice_info("a", "198.18.64.2", port=8080)
    b = slice_info("b", "198.18.64.3", port=9090)
    assert [(e.ip, e.port) for e in merge_endpoints(PORT, [a, b], "x")] == [
        ("198.18.64.2", 8080),
        ("198.18.64.3", 9090),
    ]


def test_slice_port_must_match_name_and_protocol() -> None:
    udp = SliceInfo(
        "ns",
        "u",
        KEY,
        IPFamily.V4,
        (SlicePort("http", 53, Protocol.UDP),),
        (SliceEndpoint("198.18.64.2", True, True, False),),
    )
    assert merge_endpoints(PORT, [udp], "x") == ()


def test_checkout_takes_dirty_services_once() -> None:
    queued: list[int] = []
    tracker = ChangeTracker(on_queued=lambda: queued.append(1), start_time=0.0)
    info = ServiceInfo(KEY, (PORT,))
    tracker.set_service(KEY, info)
    tracker.set_service(KEY, info)  # no change: not queued again
    tracker.set_slice("ns", "a", slice_info("a", "198.18.64.2", t=100.0))
    assert len(queued) == 2
    out = tracker.checkout()
    assert out.services == {KEY: info}
    assert [s.name for s in out.slices[KEY]] == ["a"]
    assert out.trigger_times == {KEY: [100.0]}
    assert (out.service_changes, out.endpoint_changes) == (1, 1)
    assert tracker.checkout().services == {}


def test_deleting_a_slice_marks_its_service() -> None:
    tracker = ChangeTracker(start_time=0.0)
    tracker.set_slice("ns", "a", slice_info("a", "198.18.64.2"))
    tracker.checkout()
    tracker.set_slice("ns", "a", None)
    out = tracker.checkout()
    assert out.slices == {KEY: ()}
    tracker.set_slice("ns", "a", None)  # already gone: nothing queued
    assert tracker.checkout().services == {}


def test_trigger_times_before_start_are_ignored() -> None:
    tracker = ChangeTracker(start_time=1000.0)
    tracker.set_slice("ns", "a", slice_info("a", "198.18.64.2", t=999.0))
    tracker.set_slice("ns", "a", slice_info("a", "198.18.64.3", t=1001.0))
    assert tracker.checkout().trigger_times == {KEY: [1001.0]}


def test_relabelled_slice_moves_between_services() -> None:
    tracker = ChangeTracker(start_time=0.0)
    tracker.set_slice("ns", "a", slice_info("a", "198.18.64.2"))
    tracker.checkout()
    other = ServiceKey("ns", "other")
    moved = SliceInfo("ns", "a", other, IPFamily.V4, (), ())
    tracker.set_slice("ns", "a", moved)
    out = tracker.checkout()
    assert out.slices[KEY] == ()
    assert out.slices[other] == (moved,)
