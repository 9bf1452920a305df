"""The sync function with a recording backend: what reaches the backend, and when."""

from __future__ import annotations

from typing import Any

from proxy import proxier as proxier_module
from proxy.backends.base import BackendError
from proxy.changes import ChangeTracker
from proxy.handlers import ServiceHandler, SliceHandler
from proxy.health import ProxyHealth
from proxy.model import IPFamily, NodeContext, NodeInfo, ProxyState, ServiceKey, SyncHint
from proxy.proxier import Proxier


class RecordingBackend:
    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[dict[Any, Any], SyncHint]] = []
        self.nodes: list[NodeContext] = []
        self.fail_next = 0
        self.drift = False
        self.drift_checks = 0
        self.drift_error: Exception | None = None
        self.crash: Exception | None = None

    def sync(self, state: ProxyState, hint: SyncHint) -> None:
        self.nodes.append(state.node)
        if self.crash is not None:
            crash, self.crash = self.crash, None
            raise crash
        if self.fail_next:
            self.fail_next -= 1
            raise BackendError("refused", offending_lines=["-A KPY-BAD"])
        self.calls.append((dict(state.services), hint))

    def cleanup(self) -> bool:
        return False

    def drifted(self) -> bool:
        self.drift_checks += 1
        if self.drift_error is not None:
            error, self.drift_error = self.drift_error, None
            raise error
        return self.drift


class FakeMetrics:
    def __init__(self) -> None:
        self.syncs: list[tuple[float, bool]] = []
        self.programming: list[float] = []
        self.failures: list[bool] = []
        self.changes = [0, 0]
        self.no_local = (-1, -1)
        self.programming_families: list[IPFamily] = []

    def observe_sync(self, seconds: float, *, full: bool, family: IPFamily = IPFamily.V4) -> None:
        self.syncs.append((seconds, full))

    def observe_network_programming(
        self, seconds: float, *, family: IPFamily = IPFamily.V4
    ) -> None:
        self.programming.append(seconds)
        self.programming_families.append(family)

    def set_last_sync_timestamp(self, unix_time: float, *, family: IPFamily = IPFamily.V4) -> None:
        pass

    def set_pending_changes(self, *, services: int, endpoints: int) -> None:
        pass

    def add_changes(self, *, services: int, endpoints: int) -> None:
        self.changes[0] += services
        self.changes[1] += endpoints

    def count_sync_failure(self, *, partial: bool, family: IPFamily = IPFamily.V4) -> None:
        self.failures.append(partial)

    def set_no_local_endpoints(
        self, *, internal: int, external: int, family: IPFamily = IPFamily.V4
    ) -> None:
        self.no_local = (internal, external)


class FakeHealth:
    def __init__(self) -> None:
        self.queued = 0
        self.updated_count = 0
        self.updated_families: list[IPFamily | None] = []

    def queued_update(self, family: IPFamily | None = None) -> None:
        self.queued += 1

    def updated(self, family: IPFamily | None = None) -> None:
        self.updated_count += 1
        self.updated_families.append(family)


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
    def __init__(self, wall: float = 2_000_000_000.0, **proxier_args: Any) -> None:
        self.backend = RecordingBackend()
        self.metrics = FakeMetrics()
        self.health = FakeHealth()
        self.retries: list[float] = []
        self.wall = wall
        self.now = 0.0
        self.tracker = ChangeTracker(on_queued=self.health.queued_update, start_time=0.0)
        self.proxier = Proxier(
            backend=self.backend,
            tracker=self.tracker,
            node=NodeContext("n1", ("198.18.0.2",), ("198.18.64.0/18",)),
            metrics=self.metrics,
            health=self.health,
            request_retry=self.retries.append,
            wall_clock=lambda: self.wall,
            clock=lambda: self.now,
            **proxier_args,
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


def synced(h: Harness | None = None) -> Harness:
    h = h or Harness()
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


def test_drift_found_on_the_periodic_tick_forces_a_full_sync() -> None:
    h = timed()
    h.backend.drift = True
    h.now = 29.0
    h.proxier.sync()  # the canary is not due yet: nothing is written
    assert len(h.backend.calls) == 1
    h.now = 30.0
    h.proxier.sync()
    _, hint = h.backend.calls[-1]
    assert hint.full and hint.changed == frozenset()


def test_node_zone_change_recomputes_everything() -> None:
    h = synced()
    h.tracker.set_node(NodeInfo("n1", ("198.18.0.2",), zone="z1"))
    out = h.tracker.checkout()
    assert out.keys == {ServiceKey("ns", "web"), ServiceKey("ns", "api")}
    assert out.node is not None and out.node.zone == "z1"
    assert out.node_changed


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


def timed() -> Harness:
    """Synced at monotonic time 0 with a 30 s canary period and the default hourly full sync."""
    return synced(Harness(canary_period=30.0))


def test_periodic_ticks_write_only_changes_and_full_syncs_come_hourly() -> None:
    """Upstream's rules since KEP-3453: the sync period is not a full rewrite."""
    h = timed()
    h.now = 10.0
    h.slices.on_update({}, eps("web", "198.18.64.5", "198.18.64.6"))
    h.proxier.sync()
    h.now = 30.0
    h.proxier.sync()  # the tick: canary checked, nothing changed, nothing written
    h.now = 31.0
    h.slices.on_update({}, eps("web", "198.18.64.6"))
    h.proxier.sync()
    assert [hint.full for _, hint in h.backend.calls] == [True, False, False]
    assert h.backend.drift_checks == 1  # on the tick only, never on a change's sync
    h.now = 3599.0
    h.proxier.sync()
    assert len(h.backend.calls) == 3
    h.now = 3600.0
    h.proxier.sync()
    assert [hint.full for _, hint in h.backend.calls] == [True, False, False, True]
    assert h.backend.calls[-1][1].changed == frozenset()


def test_a_node_whose_addresses_arrive_after_start_reaches_the_backend() -> None:
    """Defect: node addresses are not part of any port state, so the change was dropped."""
    h = synced()
    assert h.backend.nodes[-1].node_ips == ("198.18.0.2",)
    h.tracker.set_node(NodeInfo("n1", ("198.18.0.7",)))
    h.proxier.sync()
    _, hint = h.backend.calls[-1]
    assert hint.node_changed and not hint.full and hint.changed == frozenset()
    assert h.backend.nodes[-1].node_ips == ("198.18.0.7",)
    h.tracker.set_node(NodeInfo("n1", ("198.18.0.7",)))  # the same again: nothing to do
    h.proxier.sync()
    assert len(h.backend.calls) == 2


def test_the_zone_used_is_the_one_taken_with_the_dirty_services() -> None:
    """Defect: the zone was read before the checkout, so a Node update in between was
    recomputed with the old zone and then counted as clean."""
    h = synced()
    hinted = eps("web", "198.18.64.5", "198.18.64.6")
    hinted["endpoints"][0]["hints"] = {"forZones": [{"name": "z2"}]}
    hinted["endpoints"][1]["hints"] = {"forZones": [{"name": "z1"}]}
    h.slices.on_update({}, hinted)
    real_checkout = h.tracker.checkout

    def checkout_after_a_node_update() -> Any:
        h.tracker.set_node(NodeInfo("n1", ("198.18.0.2",), zone="z2"))  # lands just before
        return real_checkout()

    h.tracker.checkout = checkout_after_a_node_update  # type: ignore[method-assign]
    h.proxier.sync()
    state, _ = h.backend.calls[-1]
    web = next(port for name, port in state.items() if name.service.name == "web")
    assert [ep.ip for ep in web.cluster_endpoints] == ["198.18.64.5"]


def test_a_canary_probe_that_raises_loses_no_change() -> None:
    """Defect: checkout consumed the dirty set, then an OSError outside the try lost it."""
    h = timed()
    h.now = 30.0
    h.slices.on_update({}, eps("web", "198.18.64.9"))
    h.backend.drift_error = OSError("iptables: cannot exec")
    updated = h.health.updated_count
    h.proxier.sync()
    assert len(h.backend.calls) == 1
    assert h.health.updated_count == updated  # not reported as synced
    assert h.retries
    h.proxier.sync()
    state, hint = h.backend.calls[-1]
    assert hint.full
    assert [str(name) for name in hint.changed] == ["ns/web:http"]
    web = next(port for name, port in state.items() if name.service.name == "web")
    assert [ep.ip for ep in web.cluster_endpoints] == ["198.18.64.9"]
    assert [ep.ip for ep in hint.previous[next(iter(hint.changed))].cluster_endpoints] == [
        "198.18.64.5"
    ]


def test_a_backend_bug_makes_the_next_sync_full_and_keeps_the_change() -> None:
    h = synced()
    h.slices.on_update({}, eps("web", "198.18.64.9"))
    h.backend.crash = ValueError("a rendering bug")
    h.proxier.sync()
    assert h.metrics.failures == [False]
    h.proxier.sync()
    _, hint = h.backend.calls[-1]
    assert hint.full
    assert [str(name) for name in hint.changed] == ["ns/web:http"]


def test_a_change_reverted_before_a_successful_sync_is_not_written() -> None:
    h = synced()
    h.backend.fail_next = 1
    h.slices.on_update({}, eps("web", "198.18.64.9"))
    h.proxier.sync()  # fails; the change stays owed
    h.slices.on_update({}, eps("web", "198.18.64.5"))  # back to what the kernel has
    h.proxier.sync()
    _, hint = h.backend.calls[-1]
    assert hint.full  # after a failure, whatever happened
    assert hint.changed == frozenset()


def test_a_service_that_cannot_be_computed_keeps_its_state_and_others_sync(
    monkeypatch: Any,
) -> None:
    h = synced()
    real = proxier_module.categorize

    def categorize(port: Any, *args: Any) -> Any:
        if port.name.service.name == "web":
            raise RuntimeError("a categorisation bug")
        return real(port, *args)

    monkeypatch.setattr(proxier_module, "categorize", categorize)
    h.slices.on_update({}, eps("web", "198.18.64.9"))
    h.slices.on_add(eps("api", "198.18.64.8"))
    h.proxier.sync()
    state, hint = h.backend.calls[-1]
    assert [str(name) for name in hint.changed] == ["ns/api:http"]
    web = next(port for name, port in state.items() if name.service.name == "web")
    assert [ep.ip for ep in web.cluster_endpoints] == ["198.18.64.5"]


def test_ports_without_local_endpoints_are_counted_every_sync() -> None:
    h = synced()
    assert h.metrics.no_local == (0, 0)
    local = svc("loc", "198.19.0.20", node_port=30020)
    local["spec"]["internalTrafficPolicy"] = "Local"
    local["spec"]["externalTrafficPolicy"] = "Local"
    h.services.on_add(local)
    remote = eps("loc", "198.18.64.30")
    remote["endpoints"][0]["nodeName"] = "elsewhere"
    h.slices.on_add(remote)
    h.proxier.sync()
    assert h.metrics.no_local == (1, 1)
    h.services.on_delete(local)
    h.proxier.sync()
    assert h.metrics.no_local == (0, 0)


class DualHarness(Harness):
    """Two lanes, as a dual-stack node has: IPv4 first, then IPv6."""

    def __init__(self) -> None:
        super().__init__()
        self.v6 = RecordingBackend()
        self.proxier = Proxier(
            backends=[(IPFamily.V4, self.backend), (IPFamily.V6, self.v6)],
            tracker=self.tracker,
            node=NodeContext("n1", ("198.18.0.2", "2001:2::2"), ("198.18.64.0/18",)),
            metrics=self.metrics,
            health=self.health,
            request_retry=self.retries.append,
            wall_clock=lambda: self.wall,
            clock=lambda: self.now,
        )
        count = lambda r, why: self.bad.append((r, why))  # noqa: E731
        self.services = ServiceHandler(self.tracker, self.proxier.services_synced, count)
        self.slices = SliceHandler(self.tracker, self.proxier.slices_synced, count)


def v6_eps(name: str, *ips: str, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": f"{name}-v6",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv6",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {
                "addresses": [ip],
                "nodeName": "n1",
                "conditions": {"ready": ready, "serving": True, "terminating": not ready},
            }
            for ip in ips
        ],
    }


def test_a_family_whose_kernel_refuses_is_retried_fully_alone() -> None:
    """Upstream runs one proxier per family: the IPv6 side failing must not turn every
    IPv4 sync into a full rewrite (at 10k services that is seconds per retry)."""
    h = DualHarness()
    for name, ip in (("web", "198.19.0.10"), ("api", "198.19.0.11")):
        h.services.on_add(dual_svc(name, ip))
    h.slices.on_add(eps("web", "198.18.64.5"))
    h.services.on_synced()
    h.slices.on_synced()
    h.proxier.sync()
    assert [hint.full for _, hint in h.backend.calls] == [True]
    assert [hint.full for _, hint in h.v6.calls] == [True]
    assert h.health.updated_families == [IPFamily.V4, IPFamily.V6]
    h.v6.fail_next = 1
    h.slices.on_update({}, eps("web", "198.18.64.5", "198.18.64.6", trigger="2033-05-18T03:33:19Z"))
    h.proxier.sync()
    # Only the family that wrote its change is fresh; IPv6's change is still queued.
    assert h.health.updated_families[2:] == [IPFamily.V4]
    assert h.metrics.programming_families == [IPFamily.V4]
    h.slices.on_update({}, eps("web", "198.18.64.6"))
    h.proxier.sync()
    v4_hints = [hint for _, hint in h.backend.calls]
    v6_hints = [hint for _, hint in h.v6.calls]
    assert [hint.full for hint in v4_hints] == [True, False, False]
    assert [hint.full for hint in v6_hints] == [True, True]
    # The IPv6 lane still owes the first change: its `previous` is its own last success.
    (previous,) = v6_hints[-1].previous.values()
    assert [e.ip for e in previous.cluster_endpoints] == ["198.18.64.5"]
    assert v4_hints[-1].previous[next(iter(v4_hints[-1].changed))].cluster_endpoints[1].ip == (
        "198.18.64.6"
    )
    assert h.metrics.failures == [True]
    assert h.health.updated_families[3:] == [IPFamily.V4, IPFamily.V6]
    # Each family observes the change's trigger time once, when it has written it.
    assert h.metrics.programming_families == [IPFamily.V4, IPFamily.V6]


def dual_svc(name: str, ip: str, node_port: int | None = None) -> dict[str, Any]:
    service = svc(name, ip, node_port=node_port)
    service["spec"]["clusterIPs"] = [ip, "2001:2:0:ff::" + ip.rsplit(".", 1)[1]]
    return service


def test_a_backend_sees_only_the_ports_with_a_cluster_ip_of_its_family() -> None:
    """Upstream's per-family service tracker skips a service without a ClusterIP of its
    family: a single-stack IPv4 NodePort service must not open an IPv6 NodePort."""
    h = DualHarness()
    h.services.on_add(svc("v4only", "198.19.0.10", node_port=30080))
    h.services.on_add(dual_svc("dual", "198.19.0.11"))
    h.slices.on_add(eps("v4only", "198.18.64.5"))
    h.services.on_synced()
    h.slices.on_synced()
    h.proxier.sync()
    v4_state, _ = h.backend.calls[-1]
    v6_state, _ = h.v6.calls[-1]
    assert sorted(str(n) for n in v4_state) == ["ns/dual:http", "ns/v4only:http"]
    assert sorted(str(n) for n in v6_state) == ["ns/dual:http"]
    # The v4-only service goes: the IPv6 backend is told nothing it ever had.
    h.services.on_delete(svc("v4only", "198.19.0.10", node_port=30080))
    h.proxier.sync()
    _, v6_hint = h.v6.calls[-1]
    assert dict(v6_hint.previous) == {}


def test_each_family_falls_back_to_terminating_endpoints_on_its_own() -> None:
    """Upstream's per-family proxiers see only their family's slices: IPv4 endpoints
    that are ready must not hide the IPv6 family's serving-terminating fallback."""
    h = DualHarness()
    service = svc("web", "198.19.0.10")
    service["spec"]["clusterIPs"] = ["198.19.0.10", "2001:2:0:ff::10"]
    h.services.on_add(service)
    h.slices.on_add(eps("web", "198.18.64.5"))
    h.slices.on_add(v6_eps("web", "2001:2:0:40::5", ready=False))
    h.services.on_synced()
    h.slices.on_synced()
    h.proxier.sync()
    state, _ = h.v6.calls[-1]
    (port_state,) = state.values()
    assert [e.ip for e in port_state.cluster_endpoints] == ["198.18.64.5", "2001:2:0:40::5"]


# -- after-sync hooks and service checks -------------------------------------------------


def test_after_sync_hooks_run_after_a_committed_sync_only_and_cannot_fail_it() -> None:
    seen: list[tuple[list[str], list[str]]] = []

    def record(state: ProxyState, hint: SyncHint, _family: IPFamily) -> None:
        seen.append((sorted(str(n) for n in state.services), sorted(str(n) for n in hint.changed)))

    def broken(_state: ProxyState, _hint: SyncHint, _family: IPFamily) -> None:
        raise RuntimeError("bug in a hook")

    h = synced(Harness(after_sync=(broken, record)))
    assert seen == [(["ns/api:http", "ns/web:http"], ["ns/api:http", "ns/web:http"])]
    assert h.backend.calls[-1][1].full

    # A failed backend sync runs no hook: the kernel still has the old rules.
    h.backend.fail_next = 1
    h.slices.on_update({}, eps("web", "198.18.64.5", "198.18.64.6"))
    h.proxier.sync()
    assert len(seen) == 1
    # The retry commits, and the hooks see the change with its previous state.
    h.proxier.sync()
    assert seen[-1][1] == ["ns/web:http"]
    assert h.retries == [1.0]  # the broken hook caused no extra failure


def test_every_recomputed_service_is_checked_with_its_new_ports() -> None:
    checked: list[tuple[str, int]] = []
    h = synced(Harness(check_service=lambda key, states: checked.append((str(key), len(states)))))
    assert sorted(checked) == [("ns/api", 1), ("ns/web", 1)]
    h.services.on_delete(svc("api", "198.19.0.11"))
    h.proxier.sync()
    assert checked[-1] == ("ns/api", 0)
