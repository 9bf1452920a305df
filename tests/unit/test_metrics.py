"""Metric names, types, buckets and exposition as upstream's; the /metrics server."""

from __future__ import annotations

import errno
import http.client
import socket
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import (
    NETWORK_PROGRAMMING_BUCKETS,
    SYNC_DURATION_BUCKETS,
    ProxyMetrics,
    ServeError,
    go_float,
)
from proxy.model import IPFamily

V4 = (("ip_family", "IPv4"),)
V6 = (("ip_family", "IPv6"),)

UPSTREAM = {
    "kubeproxy_sync_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_full_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_network_programming_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": "gauge",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": "gauge",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": "gauge",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total": "counter",
    "kubeproxy_sync_proxy_rules_service_changes_pending": "gauge",
    "kubeproxy_sync_proxy_rules_service_changes_total": "counter",
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total": "counter",
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total": "counter",
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total": "counter",
    "kubeproxy_sync_proxy_rules_iptables_total": "gauge",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total": "gauge",
    "kubeproxy_proxy_healthz_total": "counter",
    "kubeproxy_proxy_livez_total": "counter",
    "kubeproxy_conntrack_reconciler_deleted_entries_total": "counter",
    "kubeproxy_conntrack_reconciler_sync_duration_seconds": "histogram",
}
OURS = {
    "kubeproxy_py_sync_failures_total": "counter",
    "kubeproxy_py_skipped_objects_total": "counter",
    "kubeproxy_py_sync_phase_duration_seconds": "histogram",
    "kubeproxy_py_conntrack_cleanup_failures_total": "counter",
    "kubeproxy_py_unsupported_total": "counter",
    "kubeproxy_py_service_health_listen_failures_total": "counter",
    "kubeproxy_py_service_health_servers": "gauge",
}

# Upstream's `le` strings, as Go writes them.
SYNC_LE = ["0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128", "0.256",
           "0.512", "1.024", "2.048", "4.096", "8.192", "16.384", "+Inf"]  # fmt: skip
NETWORK_LE = (
    ["0", "0.25", "0.5"]
    + [str(s) for s in range(1, 60)]
    + [str(s) for s in range(60, 116, 5)]
    + ["120", "150", "180", "210", "240", "270", "300", "+Inf"]
)


def exposed(metrics: ProxyMetrics) -> str:
    return metrics.exposition().decode()


def samples(metrics: ProxyMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the exposition text."""
    result = {}
    for family in text_string_to_metric_families(exposed(metrics)):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def sample_lines(metrics: ProxyMetrics, prefix: str) -> list[str]:
    return [line for line in exposed(metrics).splitlines() if line.startswith(prefix)]


def touched() -> ProxyMetrics:
    """Metrics with every labelled family used once, so every name is exposed."""
    metrics = ProxyMetrics(backend="iptables", process_metrics=False)
    metrics.set_iptables_rules("nat", 10)
    metrics.set_no_local_endpoints(internal=1, external=2)
    metrics.count_healthz(200)
    metrics.count_livez(503)
    metrics.count_sync_failure(partial=True)
    metrics.count_skipped("service", "bad-cluster-ip")
    metrics.observe_sync(0.01, full=True)
    metrics.observe_sync(0.01, full=False)
    metrics.observe_network_programming(0.1)
    metrics.set_last_sync_timestamp(1.0)
    metrics.set_last_queued_timestamp(1.0)
    metrics.count_conntrack_deleted(IPFamily.V4, 1)
    metrics.observe_conntrack_cleanup(IPFamily.V4, 0.01)
    metrics.count_unsupported("ipv6")
    return metrics


# -- names, types, help ------------------------------------------------------------------


def test_exposed_names_and_types_are_upstreams_exactly() -> None:
    families = {
        f.name: f.type for f in text_string_to_metric_families(exposed(touched()))
    }  # the parser strips a counter's "_total"
    expected = {
        name.removesuffix("_total") if kind == "counter" else name: kind
        for name, kind in (UPSTREAM | OURS).items()
    }
    assert families == expected


def test_sample_names_carry_the_total_suffix_and_no_created_series() -> None:
    text = exposed(touched())
    for name, kind in UPSTREAM.items():
        assert f"# TYPE {name} {kind}" in text
    assert "_created" not in text
    assert "kubeproxy_sync_proxy_rules_endpoint_changes_total 0" in text


def test_upstream_help_texts_carry_the_alpha_marker_and_ours_do_not() -> None:
    text = exposed(touched())
    assert (
        "# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency"
        " in seconds"
    ) in text
    for name in UPSTREAM:
        assert f"# HELP {name} [ALPHA] " in text
    for name in OURS:
        assert f"# HELP {name} [ALPHA]" not in text


def test_process_metrics_are_exposed_by_default() -> None:
    assert "process_cpu_seconds_total" in exposed(ProxyMetrics())


def test_instances_do_not_share_state() -> None:
    first, second = ProxyMetrics(), ProxyMetrics()
    first.count_healthz(200)
    assert 'kubeproxy_proxy_healthz_total{code="200"}' in exposed(first)
    assert sample_lines(first, "kubeproxy_proxy_healthz_total{") != []
    assert sample_lines(second, "kubeproxy_proxy_healthz_total{") == []


# -- buckets -----------------------------------------------------------------------------


def test_sync_duration_buckets_are_upstreams() -> None:
    assert len(SYNC_DURATION_BUCKETS) == 15
    metrics = touched()
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    ):
        lines = sample_lines(metrics, f"{name}_bucket")
        assert [line.split('"')[3] for line in lines] == SYNC_LE


def test_network_programming_buckets_are_upstreams_including_the_zero_bucket() -> None:
    assert len(NETWORK_PROGRAMMING_BUCKETS) == 81
    lines = sample_lines(touched(), "kubeproxy_network_programming_duration_seconds_bucket")
    assert [line.split('"')[3] for line in lines] == NETWORK_LE


@pytest.mark.parametrize(
    ("value", "text"),
    [(1.0, "1"), (0.0, "0"), (0.25, "0.25"), (16.384, "16.384"), (300.0, "300"),
     (123456.0, "123456"), (1e6, "1e+06"), (1234567.0, "1.234567e+06"), (1e-05, "1e-05"),
     (0.0001, "0.0001"), (-2.5, "-2.5"), (float("inf"), "+Inf"), (float("-inf"), "-Inf"),
     (float("nan"), "NaN")],
)  # fmt: skip
def test_go_float_formatting(value: float, text: str) -> None:
    assert go_float(value) == text


# -- recording ---------------------------------------------------------------------------


def test_full_and_partial_syncs_go_to_their_own_histograms() -> None:
    metrics = ProxyMetrics(process_metrics=False)
    metrics.observe_sync(0.003, full=True)
    metrics.observe_sync(0.5, full=False)
    metrics.observe_sync(0.5, full=False)
    metrics.observe_sync(0.5, full=False, family=IPFamily.V6)
    values = samples(metrics)
    assert values[("kubeproxy_sync_proxy_rules_duration_seconds_count", V4)] == 3
    assert values[("kubeproxy_sync_full_proxy_rules_duration_seconds_count", V4)] == 1
    assert values[("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", V4)] == 2
    assert values[("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", V6)] == 1
    bucket = "kubeproxy_sync_proxy_rules_duration_seconds_bucket"
    assert values[(bucket, (("ip_family", "IPv4"), ("le", "0.002")))] == 0
    assert values[(bucket, (("ip_family", "IPv4"), ("le", "0.004")))] == 1
    assert values[(bucket, (("ip_family", "IPv4"), ("le", "0.512")))] == 3


def test_changes_timestamps_and_network_programming() -> None:
    metrics = ProxyMetrics(process_metrics=False)
    metrics.add_changes(services=2, endpoints=5)
    metrics.add_changes(services=0, endpoints=1)
    metrics.set_pending_changes(services=3, endpoints=4)
    metrics.set_last_sync_timestamp(1714564800.5)
    metrics.set_last_queued_timestamp(1714564799.0)
    metrics.observe_network_programming(0.3)
    values = samples(metrics)
    assert values[("kubeproxy_sync_proxy_rules_service_changes_total", ())] == 2
    assert values[("kubeproxy_sync_proxy_rules_endpoint_changes_total", ())] == 6
    assert values[("kubeproxy_sync_proxy_rules_service_changes_pending", ())] == 3
    assert values[("kubeproxy_sync_proxy_rules_endpoint_changes_pending", ())] == 4
    assert values[("kubeproxy_sync_proxy_rules_last_timestamp_seconds", V4)] == 1714564800.5
    assert values[("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", V4)] == 1714564799.0
    bucket = "kubeproxy_network_programming_duration_seconds_bucket"
    assert values[(bucket, (("ip_family", "IPv4"), ("le", "0.25")))] == 0
    assert values[(bucket, (("ip_family", "IPv4"), ("le", "0.5")))] == 1


@pytest.mark.parametrize(
    ("backend", "restore", "partial_restore", "nftables"),
    [
        ("iptables", 2, 1, 0),
        ("ipvs", 2, 0, 0),
        ("nftables", 0, 0, 2),
        (None, 0, 0, 0),
    ],
)
def test_sync_failures_move_the_backends_upstream_counter(
    backend: str | None, restore: int, partial_restore: int, nftables: int
) -> None:
    metrics = ProxyMetrics(backend=backend, process_metrics=False)
    metrics.count_sync_failure(partial=True)
    metrics.count_sync_failure(partial=False)
    values = samples(metrics)
    prefix = "kubeproxy_sync_proxy_rules_"
    assert values.get((f"{prefix}iptables_restore_failures_total", V4), 0) == restore
    assert values.get((f"{prefix}iptables_partial_restore_failures_total", V4), 0) == (
        partial_restore
    )
    assert values.get((f"{prefix}nftables_sync_failures_total", V4), 0) == nftables
    label = (("backend", backend or "unknown"),)
    assert values[("kubeproxy_py_sync_failures_total", label)] == 2


def test_labelled_gauges_and_counters() -> None:
    metrics = touched()
    metrics.set_iptables_rules("nat", 12)
    metrics.set_iptables_rules("filter", 3)
    metrics.count_skipped("service", "bad-cluster-ip")
    values = samples(metrics)
    rules = "kubeproxy_sync_proxy_rules_iptables_total"
    assert values[(rules, (("ip_family", "IPv4"), ("table", "nat")))] == 12
    assert values[(rules, (("ip_family", "IPv4"), ("table", "filter")))] == 3
    no_local = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
    assert values[(no_local, (("ip_family", "IPv4"), ("traffic_policy", "internal")))] == 1
    assert values[(no_local, (("ip_family", "IPv4"), ("traffic_policy", "external")))] == 2
    assert values[("kubeproxy_proxy_healthz_total", (("code", "200"),))] == 1
    assert values[("kubeproxy_proxy_livez_total", (("code", "503"),))] == 1
    skipped = (("reason", "bad-cluster-ip"), ("resource", "service"))
    assert values[("kubeproxy_py_skipped_objects_total", skipped)] == 2


def test_conntrack_unsupported_and_service_health_metrics() -> None:
    metrics = ProxyMetrics(process_metrics=False)
    metrics.count_conntrack_deleted(IPFamily.V4, 3)
    metrics.count_conntrack_deleted(IPFamily.V6, 1)
    metrics.observe_conntrack_cleanup(IPFamily.V4, 0.003)
    metrics.count_conntrack_failure()
    metrics.count_unsupported("ipv6")
    metrics.count_unsupported("ipv6")
    metrics.count_service_health_failure()
    metrics.set_service_health_servers(2)
    values = samples(metrics)
    deleted = "kubeproxy_conntrack_reconciler_deleted_entries_total"
    assert values[(deleted, V4)] == 3
    assert values[(deleted, V6)] == 1
    assert values[("kubeproxy_conntrack_reconciler_sync_duration_seconds_count", V4)] == 1
    assert values[("kubeproxy_py_conntrack_cleanup_failures_total", ())] == 1
    assert values[("kubeproxy_py_unsupported_total", (("feature", "ipv6"),))] == 2
    assert values[("kubeproxy_py_service_health_listen_failures_total", ())] == 1
    assert values[("kubeproxy_py_service_health_servers", ())] == 2


def test_ip_family_label_only_where_upstream_has_it() -> None:
    text = exposed(touched())
    labelled = {
        line.split("{")[0]
        for line in text.splitlines()
        if not line.startswith("#") and 'ip_family="' in line
    }
    bare = {name.removesuffix("_total") for name in labelled}
    assert "kubeproxy_sync_proxy_rules_duration_seconds_count" in labelled
    assert "kubeproxy_conntrack_reconciler_deleted_entries" in bare
    assert not any("changes" in name or "healthz" in name for name in labelled)


# -- the HTTP server ---------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[ProxyMetrics, int]]:
    metrics = ProxyMetrics(backend="nftables")
    bound = metrics.serve("127.0.0.1:0")
    assert bound is not None
    try:
        yield metrics, bound[1]
    finally:
        metrics.close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_metrics_are_served_over_http(served: tuple[ProxyMetrics, int]) -> None:
    metrics, port = served
    metrics.count_healthz(503)
    status, headers, body = get(port, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'kubeproxy_proxy_healthz_total{code="503"} 1.0' in body.decode()
    assert get(port, "/metrics?x=1")[0] == 200
    assert get(port, "/healthz")[::2] == (200, b"ok")
    assert get(port, "/proxyMode")[::2] == (200, b"nftables")
    assert get(port, "/nope")[0] == 404
    status, headers, body = get(port, "/metrics", method="HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) > 0


def test_a_taken_port_is_a_clear_error_at_start() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        metrics = ProxyMetrics()
        with pytest.raises(ServeError) as err:
            metrics.serve(address)
    assert err.value.errno == errno.EADDRINUSE
    assert f"cannot serve metrics on {address}" in str(err.value)
    assert isinstance(err.value, OSError)  # what `python -m proxy` reports as start-up failure


def test_an_empty_address_disables_the_server() -> None:
    assert ProxyMetrics().serve("") is None


def test_serving_on_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    metrics = ProxyMetrics()
    try:
        bound = metrics.serve("[::1]:0")
    except ServeError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    try:
        assert bound is not None and bound[0] == "::1"
        connection = http.client.HTTPConnection("::1", bound[1], timeout=5)
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        metrics.close()


def test_backend_phases_are_exposed_per_phase() -> None:
    metrics = ProxyMetrics(process_metrics=False)
    metrics.observe_phase("write", 0.003)
    metrics.observe_phase("render", 0.2)
    text = metrics.exposition().decode()
    assert 'kubeproxy_py_sync_phase_duration_seconds_bucket{le="0.004",phase="write"} 1.0' in text
    assert 'kubeproxy_py_sync_phase_duration_seconds_count{phase="render"} 1.0' in text
