"""The sync function with a recording backend: what reaches the backend, and when."""

from __future__ import annotations

from typing import Any

from proxy.backends.base import BackendError
from proxy.changes import ChangeTracker
from proxy.handlers import ServiceHandler, SliceHandler
from proxy.health import ProxyHealth
from proxy.model import NodeContext, NodeInfo, ProxyState, ServiceKey, SyncHint
from proxy.proxier import Proxier


class RecordingBackend:
    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[dict[Any, Any], SyncHint]] = []
        self.fail_next = 0
        self.drift = False

    def sync(self, state: ProxyState, hint: SyncHint) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise BackendError("refused", offending_lines=["-A KPY-BAD"])
        self.calls.append((dict(state.services), hint))

    def cleanup(self) -> bool:
        return False

    def drifted(self) -> bool:
        return self.drift


class FakeMetrics:
    def __init__(self) -> None:
        self.syncs: list[tuple[float, bool]] = []
        self.programming: list[float] = []
        self.failures: list[bool] = []
        self.changes = [0, 0]

    def observe_sync(self, seconds: float, *, full: bool) -> None:
        self.syncs.append((seconds, full))

    def observe_network_programming(self, seconds: float) -> None:
        self.programming.append(seconds)

    def set_last_sync_timestamp(self, unix_time: float) -> None:
        pass

    def set_pending_changes(self, *, services: int, endpoints: int) -> None:
        pass

    def add_changes(self, *, services: int, endpoints: int) -> None:
        self.changes[0] += services
        self.changes[1] += endpoints

    def count_sync_failure(self, *, partial: bool) -> None:
        self.failures.append(partial)


class FakeHealth:
    def __init__(self) -> None:
        self.queued = 0
        self.updated_count = 0

    def queued_update(self) -> None:
        self.queued += 1

    def updated(self) -> None:
        self.updated_count += 1


def svc(name: str, ip: str, port: int = 80, node_port: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": ip, "ports": [{"name": "http", "port": port}]}
    if node_port:
        spec["type"] = "NodePort"
        spec["ports"][0]["nodePort"] = node_port
    return {"metadata": {"namespace": "ns", "name": name}, "spec": spec}


def eps(name: str, *ips: str, trigger: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "namespace": "ns",
        "name": f"{name}-x",
        "labels": {"kubernetes.io/service-name": name},
    }
    if trigger:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return {
        "metadata": meta,
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ip], "nodeName": "n1"} for ip in ips],
    }


class Harness:
    def __init__(self, wall: float = 2_000_000_000.0) -> None:
        self.backend = RecordingBackend()
        self.metrics = FakeMetrics()
        self.health = FakeHealth()
        self.retries: list[float] = []
        self.wall = wall
        self.tracker = ChangeTracker(on_queued=self.health.queued_update, start_time=0.0)
        self.proxier = Proxier(
            backend=self.backend,
            tracker=self.tracker,
            node=NodeContext("n1", ("198.18.0.2",), ("198.18.64.0/18",)),
            metrics=self.metrics,
            health=self.health,
            request_retry=self.retries.append,
            wall_clock=lambda: self.wall,
        )
        self.bad: list[tuple[str, str]] = []
        count = lambda r, why: self.bad.append((r, why))  # noqa: E731
        self.services = ServiceHandler(self.tracker, self.proxier.services_synced, count)
        self.slices = SliceHandler(self.tracker, self.proxier.slices_synced, count)


def test_nothing_is_written_before_both_lists_synced() -> None:
    h = Harness()
    h.services.on_add(svc("web", "198.19.0.10"))
    h.services.on_synced()
    h.proxier.sync()
    assert h.backend.calls == []
    h.slices.on_add(eps("web", "198.18.64.5"))
    h.slices.on_synced()
    h.proxier.sync()
    assert len(h.backend.calls) == 1
    state, hint = h.backend.calls[0]
    assert hint.full
    (port_state,) = state.values()
    assert [e.ip for e in port_state.cluster_endpoints] == ["198.18.64.5"]


def synced() -> Harness:
    h = Harness()
    h.services.on_add(svc("web", "198.19.0.10"))
    h.services.on_add(svc("api", "198.19.0.11"))
    h.slices.on_add(eps("web", "198.18.64.5"))
    h.services.on_synced()
    h.slices.on_synced()
    h.proxier.sync()
    return h


def test_partial_sync_names_only_changed_ports() -> None:
    h = synced()
    h.slices.on_update({}, eps("web", "198.18.64.5", "198.18.64.6"))
    h.proxier.sync()
    state, hint = h.backend.calls[-1]
    assert not hint.full
    assert [str(n) for n in hint.changed] == ["ns/web:http"]
    assert len(state) == 2  # the complete state is always handed over


def test_changes_that_cancel_out_do_not_sync() -> None:
    h = synced()
    h.services.on_add(svc("tmp", "198.19.0.12"))
    h.services.on_delete(svc("tmp", "198.19.0.12"))
    h.slices.on_update({}, eps("web", "198.18.64.5"))  # same endpoints
    h.proxier.sync()
    assert len(h.backend.calls) == 1
    assert h.health.updated_count == 2


def test_deleted_service_is_in_the_hint_and_gone_from_state() -> None:
    h = synced()
    h.services.on_delete(svc("api", "198.19.0.11"))
    h.proxier.sync()
    state, hint = h.backend.calls[-1]
    assert [str(n) for n in hint.changed] == ["ns/api:http"]
    assert [str(n) for n in state] == ["ns/web:http"]


def test_bad_service_is_skipped_and_counted_while_others_sync() -> None:
    h = synced()
    h.services.on_add(svc("bad", "10.0.0.999"))
    h.services.on_add(svc("good", "198.19.0.13"))
    h.proxier.sync()
    state, _ = h.backend.calls[-1]
    assert "ns/good:http" in {str(n) for n in state}
    assert "ns/bad:http" not in {str(n) for n in state}
    assert h.bad == [("service", "invalid_cluster_ip")]


def test_failure_retries_with_backoff_then_syncs_fully() -> None:
    h = synced()
    h.backend.fail_next = 2
    h.slices.on_update({}, eps("web", "198.18.64.7", trigger="2033-05-18T03:33:19Z"))
    h.proxier.sync()
    h.proxier.sync()
    assert h.metrics.failures == [True, False]
    assert h.retries == [1.0, 2.0]
    h.proxier.sync()
    _, hint = h.backend.calls[-1]
    assert hint.full
    # The trigger time of the failed change is observed once, after the successful write.
    assert len(h.metrics.programming) == 1
    assert h.metrics.programming == [1.0]


def test_drift_forces_full_sync() -> None:
    h = synced()
    h.backend.drift = True
    h.proxier.sync()
    _, hint = h.backend.calls[-1]
    assert hint.full and hint.changed == frozenset()


def test_node_zone_change_recomputes_everything() -> None:
    h = synced()
    h.proxier.set_node(NodeInfo("n1", ("198.18.0.2",), zone="z1"))
    out = h.tracker.checkout()
    assert out.keys == {ServiceKey("ns", "web"), ServiceKey("ns", "api")}


def test_failing_kernel_turns_healthz_503_after_twice_the_sync_period_then_recovers() -> None:
    """reliability.md row 16/30: health is about queued changes, not about being alive."""
    now = [1000.0]
    health = ProxyHealth(timeout=60.0, clock=lambda: now[0], wall_clock=lambda: now[0])
    h = Harness()
    h.tracker = ChangeTracker(on_queued=health.queued_update, start_time=0.0)
    h.proxier = Proxier(
        backend=h.backend,
        tracker=h.tracker,
        node=NodeContext("n1", ("198.18.0.2",), ("198.18.64.0/18",)),
        metrics=h.metrics,
        health=health,
        request_retry=h.retries.append,
    )
    services = ServiceHandler(h.tracker, h.proxier.services_synced, lambda *_: None)
    slices = SliceHandler(h.tracker, h.proxier.slices_synced, lambda *_: None)
    health.updated()  # the sync loop starts healthy, as upstream's
    services.on_add(svc("web", "198.19.0.10"))
    services.on_synced()
    slices.on_synced()
    h.backend.fail_next = 100
    for _ in range(3):
        h.proxier.sync()
        now[0] += 19.0
    assert health.is_healthy()  # the change has waited 57 s of the 60: not late yet
    now[0] += 4.0
    h.proxier.sync()
    assert not health.is_healthy()
    assert health.healthz().status == 503
    assert health.livez().status == 503
    h.backend.fail_next = 0
    h.proxier.sync()
    assert health.is_healthy()
    assert health.healthz().status == 200
    assert len(h.metrics.failures) == 4


def test_sync_period_forces_a_full_sync_and_partials_in_between() -> None:
    now = [0.0]
    h = Harness()
    h.proxier = Proxier(
        backend=h.backend,
        tracker=h.tracker,
        node=NodeContext("n1", ("198.18.0.2",), ()),
        metrics=h.metrics,
        health=h.health,
        full_sync_period=30.0,
        clock=lambda: now[0],
    )
    services = ServiceHandler(h.tracker, h.proxier.services_synced, lambda *_: None)
    slices = SliceHandler(h.tracker, h.proxier.slices_synced, lambda *_: None)
    services.on_add(svc("web", "198.19.0.10"))
    services.on_synced()
    slices.on_synced()
    h.proxier.sync()
    now[0] = 10.0
    slices.on_add(eps("web", "198.18.64.5"))
    h.proxier.sync()
    now[0] = 20.0
    h.proxier.sync()  # nothing changed and no full sync due: the kernel is not touched
    now[0] = 30.0
    h.proxier.sync()  # the periodic run: full, with nothing changed
    assert [hint.full for _, hint in h.backend.calls] == [True, False, True]
    assert h.backend.calls[-1][1].changed == frozenset()
