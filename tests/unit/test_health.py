"""Upstream's health rule with fake clocks, the exact JSON answers, and the real server."""

from __future__ import annotations

import errno
import http.client
import json
import socket
from collections.abc import Iterator

import pytest

from proxy.health import GO_ZERO_TIME, ProxyHealth, go_json_time
from proxy.metrics import ProxyMetrics, ServeError
from proxy.model import IPFamily

EPOCH = 1714564800.0  # 2024-05-01 12:00:00 UTC
TIMEOUT = 60.0  # 2 x the default 30 s sync period


class FakeClocks:
    """A monotonic clock and a wall clock that move together unless told otherwise."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = EPOCH

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def health(self, metrics: ProxyMetrics | None = None) -> ProxyHealth:
        return ProxyHealth(
            timeout=TIMEOUT,
            metrics=metrics,
            clock=lambda: self.mono,
            wall_clock=lambda: self.wall,
        )


@pytest.fixture
def clocks() -> FakeClocks:
    return FakeClocks()


def body(response_body: bytes) -> dict[str, object]:
    parsed = json.loads(response_body)
    assert isinstance(parsed, dict)
    return parsed


# -- the rule ----------------------------------------------------------------------------


def test_queued_then_not_yet_late_then_late_then_updated(clocks: FakeClocks) -> None:
    health = clocks.health()
    health.updated()  # the sync loop starts
    assert health.is_healthy()
    clocks.advance(5)
    health.queued_update()
    clocks.advance(TIMEOUT - 0.001)
    assert health.is_healthy()  # queued, not late yet
    clocks.advance(0.001)
    assert not health.is_healthy()  # exactly the timeout: late (upstream: `< timeout` is ok)
    health.updated()
    assert health.is_healthy()
    clocks.advance(10 * TIMEOUT)
    assert health.is_healthy()  # nothing queued: healthy however long ago the last sync


def test_later_queued_updates_keep_the_oldest(clocks: FakeClocks) -> None:
    health = clocks.health()
    health.updated()
    health.queued_update()
    clocks.advance(TIMEOUT / 2)
    health.queued_update()
    clocks.advance(TIMEOUT / 2)
    assert not health.is_healthy()


def test_healthy_while_starting_until_the_first_update(clocks: FakeClocks) -> None:
    health = clocks.health()
    health.queued_update()
    clocks.advance(10 * TIMEOUT)
    assert health.is_healthy()  # never updated: upstream's "starting up"
    health.updated()
    health.queued_update()
    clocks.advance(TIMEOUT)
    assert not health.is_healthy()


def test_a_wall_clock_jump_does_not_change_health(clocks: FakeClocks) -> None:
    health = clocks.health()
    health.updated()
    health.queued_update()
    clocks.wall += 3600  # NTP step: ages come from the monotonic clock
    assert health.is_healthy()


# -- the answers -------------------------------------------------------------------------


def test_healthy_answers_report_last_updated_as_now(clocks: FakeClocks) -> None:
    health = clocks.health()
    health.updated()
    clocks.advance(1.5)
    now, last = "2024-05-01T12:00:01.5Z", "2024-05-01T12:00:00Z"
    healthz = health.healthz()
    assert (healthz.status, healthz.content_type) == (200, "application/json")
    assert healthz.headers == {"X-Content-Type-Options": "nosniff"}
    # Go's json.Marshal of upstream's ProxyHealth: compact, in field order; the
    # per-family lastUpdated is the real one.
    family = f'"status":{{"IPv4":{{"lastUpdated":"{last}","healthy":true}}}}'
    assert healthz.body.decode() == (
        f'{{"lastUpdated":"{now}","currentTime":"{now}","nodeEligible":true,'
        f'"healthy":true,{family}}}'
    )
    livez = health.livez()
    assert livez.status == 200
    assert livez.body.decode() == (
        f'{{"lastUpdated":"{now}","currentTime":"{now}","healthy":true,{family}}}'
    )


def test_unhealthy_answers_report_the_last_update(clocks: FakeClocks) -> None:
    health = clocks.health()
    health.updated()
    clocks.advance(0.25)
    health.queued_update()
    clocks.advance(TIMEOUT)
    last, now = "2024-05-01T12:00:00Z", "2024-05-01T12:01:00.25Z"
    healthz = health.healthz()
    assert healthz.status == 503
    family = f'"status":{{"IPv4":{{"lastUpdated":"{last}","healthy":false}}}}'
    assert healthz.body.decode() == (
        f'{{"lastUpdated":"{last}","currentTime":"{now}","nodeEligible":true,'
        f'"healthy":false,{family}}}'
    )
    livez = health.livez()
    assert (livez.status, body(livez.body)) == (
        503,
        {
            "lastUpdated": last,
            "currentTime": now,
            "healthy": False,
            "status": {"IPv4": {"lastUpdated": last, "healthy": False}},
        },
    )


def test_an_ineligible_node_fails_healthz_but_not_livez(clocks: FakeClocks) -> None:
    health = clocks.health()
    health.updated()
    health.sync_node(False)
    assert not health.node_eligible()
    assert health.is_healthy()  # the proxier itself is fine
    healthz = health.healthz()
    assert healthz.status == 503
    assert body(healthz.body)["nodeEligible"] is False
    assert body(healthz.body)["healthy"] is True  # the proxier's own health, as upstream
    assert body(healthz.body)["lastUpdated"] == "2024-05-01T12:00:00Z"
    assert health.livez().status == 200
    health.sync_node(True)
    assert health.healthz().status == 200


def test_an_ineligible_node_that_never_synced_reports_go_zero_time(clocks: FakeClocks) -> None:
    health = clocks.health()
    health.sync_node(False)
    answer = body(health.healthz().body)
    assert answer["lastUpdated"] == GO_ZERO_TIME == "0001-01-01T00:00:00Z"
    assert "status" not in answer  # omitempty: no family has synced


def test_one_late_family_makes_the_proxy_unhealthy(clocks: FakeClocks) -> None:
    health = ProxyHealth(
        timeout=TIMEOUT,
        clock=lambda: clocks.mono,
        wall_clock=lambda: clocks.wall,
        families=(IPFamily.V4, IPFamily.V6),
    )
    health.updated()
    health.queued_update(IPFamily.V6)
    clocks.advance(TIMEOUT)
    answer = body(health.livez().body)
    assert answer["healthy"] is False
    assert answer["status"] == {
        "IPv4": {"lastUpdated": "2024-05-01T12:00:00Z", "healthy": True},
        "IPv6": {"lastUpdated": "2024-05-01T12:00:00Z", "healthy": False},
    }
    health.updated(IPFamily.V6)
    assert health.is_healthy()


def test_answers_are_counted(clocks: FakeClocks) -> None:
    metrics = ProxyMetrics(process_metrics=False)
    health = clocks.health(metrics)
    health.healthz()
    health.sync_node(False)
    health.healthz()
    health.healthz()
    health.livez()
    text = metrics.exposition().decode()
    assert 'kubeproxy_proxy_healthz_total{code="200"} 1.0' in text
    assert 'kubeproxy_proxy_healthz_total{code="503"} 2.0' in text
    assert 'kubeproxy_proxy_livez_total{code="200"} 1.0' in text


@pytest.mark.parametrize(
    ("unix_time", "text"),
    [
        (EPOCH, "2024-05-01T12:00:00Z"),
        (EPOCH + 0.123456, "2024-05-01T12:00:00.123456Z"),
        (EPOCH + 0.1, "2024-05-01T12:00:00.1Z"),
        (EPOCH + 59.5, "2024-05-01T12:00:59.5Z"),
        (0.0, "1970-01-01T00:00:00Z"),
    ],
)
def test_go_json_times(unix_time: float, text: str) -> None:
    assert go_json_time(unix_time) == text


# -- the HTTP server ---------------------------------------------------------------------


@pytest.fixture
def served(clocks: FakeClocks) -> Iterator[tuple[ProxyHealth, int]]:
    health = clocks.health(ProxyMetrics(process_metrics=False))
    bound = health.serve("127.0.0.1:0")
    assert bound is not None
    try:
        yield health, bound[1]
    finally:
        health.close()


def request(port: int, path: str, method: str = "GET") -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request(method, path)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_http_healthz_and_livez(served: tuple[ProxyHealth, int], clocks: FakeClocks) -> None:
    health, port = served
    health.updated()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    assert body(response.read())["nodeEligible"] is True
    connection.request("GET", "/livez")  # the same keep-alive connection
    assert connection.getresponse().status == 200
    connection.close()

    health.sync_node(False)
    assert request(port, "/healthz").status == 503
    assert request(port, "/livez").status == 200
    health.queued_update()
    clocks.advance(TIMEOUT)
    assert request(port, "/livez").status == 503
    assert request(port, "/healthz", method="HEAD").status == 503
    assert request(port, "/healthz/extra").status == 404
    assert request(port, "/metrics").status == 404


def test_a_taken_health_port_is_a_clear_error(clocks: FakeClocks) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(ServeError) as err:
            clocks.health().serve(address)
    assert err.value.errno == errno.EADDRINUSE
    assert f"cannot serve health on {address}" in str(err.value)


def test_an_empty_address_disables_the_health_server(clocks: FakeClocks) -> None:
    assert clocks.health().serve("") is None
