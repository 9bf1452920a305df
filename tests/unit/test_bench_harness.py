"""The benchmark harness's pure parts: grid, statistics, upstream's layout, backends, report.

Nothing here runs a proxy or touches the kernel (`tests/e2e/test_benchmarks.py` runs the
harness end to end); these pin the arithmetic and the formats the reports rely on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import grid, markdown, plots, report, stats, upstream
from benchmarks.backends import (
    BACKENDS,
    available,
    count_iptables_endpoints,
    count_nft_endpoints,
)
from benchmarks.cluster import SPARE_PORTS, metric
from benchmarks.results import validate
from benchmarks.scenarios import Generations
from benchmarks.workload import ServiceSpec, endpoint_addresses, services, vip


def test_grid_points_parse_and_sort_by_size() -> None:
    points = grid.parse_points("1000x10, 100x1,1000x10,10000x1")
    assert [p.label for p in points] == ["100x1", "1000x10", "10000x1"]
    with pytest.raises(ValueError, match="SERVICESxENDPOINTS"):
        grid.parse_points("1000")
    with pytest.raises(ValueError, match="at least 1"):
        grid.parse_points("0x3")


def test_the_full_grid_is_the_issues() -> None:
    labels = {p.label for p in grid.FULL_GRID}
    assert labels == {f"{s}x{e}" for s in (100, 1000, 5000, 10000) for e in (1, 10)} | {"1000x100"}


def test_churn_runs_at_the_largest_point_unless_told() -> None:
    config = grid.Config(points=grid.parse_points("100x10,1000x1,1000x10"), backends=(), out=Path())
    assert config.churn_at() == grid.Point(1000, 10)
    told = grid.Config(
        points=config.points, backends=(), out=Path(), churn_point=grid.Point(100, 10)
    )
    assert told.churn_at() == grid.Point(100, 10)


def test_percentiles_are_observed_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert stats.percentile(values, 0.5) == 50.0
    assert stats.percentile(values, 0.99) == 99.0
    assert stats.percentile([3.0], 0.99) == 3.0
    assert stats.percentile([], 0.5) is None


EXPOSITION = """\
# TYPE kubeproxy_network_programming_duration_seconds histogram
kubeproxy_network_programming_duration_seconds_bucket{le="0.25"} 10.0
kubeproxy_network_programming_duration_seconds_bucket{le="0.5"} 30.0
kubeproxy_network_programming_duration_seconds_bucket{le="1.0"} 40.0
kubeproxy_network_programming_duration_seconds_bucket{le="+Inf"} 40.0
kubeproxy_network_programming_duration_seconds_count 40.0
"""


def test_histogram_quantiles_interpolate_as_promql_does() -> None:
    buckets = stats.histogram(EXPOSITION, "kubeproxy_network_programming_duration_seconds")
    assert buckets == {0.25: 10.0, 0.5: 30.0, 1.0: 40.0, float("inf"): 40.0}
    assert stats.histogram_quantile(buckets, 0.5) == pytest.approx(0.375)
    assert stats.histogram_quantile(buckets, 0.25) == pytest.approx(0.25)
    before = {0.25: 10.0, 0.5: 10.0, 1.0: 10.0, float("inf"): 10.0}
    delta = stats.histogram_delta(buckets, before)
    assert stats.histogram_quantile(delta, 1.0) == pytest.approx(1.0)
    assert stats.histogram_quantile({0.25: 0.0, float("inf"): 0.0}, 0.5) is None


def test_upstream_chain_names_are_upstreams() -> None:
    # The names upstream's own proxier_test.go expects for ns1/svc1:p80 and 10.180.0.1:80.
    spec = ServiceSpec("svc1", "172.30.0.41", ("10.180.0.1:80",))
    assert upstream._hash16("ns1/svc1:p80tcp") == "XPGD46QRK7WJZT7O"
    assert upstream._hash16("ns1/svc1:p80tcp10.180.0.1:80") == "SXIVWICOYRO3J4NJ"
    assert upstream.svc_chain(spec).startswith("KUBE-SVC-")


def test_upstream_layout_has_one_sep_chain_per_endpoint_and_drops_comments_when_large() -> None:
    eps = endpoint_addresses(["198.18.64.10", "198.18.64.11"], 3)
    assert eps == ("198.18.64.10:8080", "198.18.64.11:8080", "198.18.65.1:8080")
    small = upstream.ruleset(services(2, eps), cluster_cidr="198.18.64.0/18")
    assert small.count("\n:KUBE-SEP-") == 6
    assert "--probability 0.3333333333 " in small
    assert '--comment "bench/svc0:http -> 198.18.64.10:8080"' in small
    large = upstream.ruleset(services(400, eps), cluster_cidr="198.18.64.0/18")
    assert large.count("\n:KUBE-SEP-") == 1200
    assert "-> 198.18" not in large  # past 1,000 endpoints: no per-endpoint comments


def test_vips_stay_in_the_service_cidr() -> None:
    assert vip(0) == "198.19.0.1"
    assert vip(253) == "198.19.0.254"
    assert vip(254) == "198.19.1.1"
    with pytest.raises(ValueError):
        vip(254 * 256)


def test_backends_missing_from_the_proxy_are_skipped_with_a_line() -> None:
    names = tuple(b.name for b in BACKENDS)
    chosen, skipped = available(names, known=lambda: ["iptables"])
    assert [b.name for b in chosen] == ["iptables-legacy", "iptables-nft"]
    assert len(skipped) == 1
    assert skipped[0].startswith("nftables: skipped")
    chosen, skipped = available(names, known=lambda: ["iptables", "nftables"])
    assert [b.name for b in chosen] == list(names)
    assert skipped == []


def test_iptables_read_back_counts_endpoint_chains() -> None:
    saved = "*nat\n:KPY-SEP-AAA - [0:0]\n:KPY-SEP-BBB - [0:0]\n:KPY-SVC-CCC - [0:0]\nCOMMIT\n"
    assert count_iptables_endpoints(saved) == 2


def _doc() -> dict[str, Any]:
    """A small results document as `RunResult.to_json` writes it."""
    change = {"count": 3, "p50": 0.01, "p90": 0.02, "p99": 0.03, "max": 0.03, "lost": 0}
    point = {
        "backend": "iptables-legacy",
        "services": 10000,
        "endpoints": 10,
        "status": "ok",
        "detail": "",
        "convergence": [
            {
                "status": "ok",
                "seconds": 9.0,
                "cpu_list_watch": 1.5,
                "rss_steady_mib": 120.0,
                "rss_peak_mib": 140.0,
                "tool_peak_mib": 300.0,
                "expected_endpoints": 100041,
                "read_back_endpoints": 100041,
            }
        ],
        "floor": [
            {
                "ok": True,
                "seconds": 5.0,
                "tool_peak_mib": 310.0,
                "expected_endpoints": 100041,
                "read_back_endpoints": 100041,
            }
        ],
        "changes": {"partial_syncs": 9, "full_syncs": 0, "span_sync_periods": 3.0},
        "summary": {
            "first_convergence_s": 9.0,
            "floor_s": 5.0,
            "ratio_to_floor": 1.8,
            "upstream_floor_s": 6.0,
            "touch_floor_s": 1.2,
            "changes": {"add endpoint": change, "add service": change},
        },
    }
    half = json.loads(json.dumps(point))
    half["services"] = 5000
    half["summary"]["first_convergence_s"] = 4.0
    prog = {
        "changes": 1200,
        "latencies": [0.5] * 1200,
        "lost": 0,
        "rate": 20.0,
        "wall_seconds": 61.0,
        "proxy_histogram": {"count": 1200.0, "p50": 0.3, "p90": 0.5, "p99": 0.9},
        "summary": {"count": 1200, "p50": 0.5, "p90": 0.5, "p99": 0.5, "max": 0.5},
    }
    return {
        "schema": 1,
        "command": ".venv/bin/python -m benchmarks",
        "started": "s",
        "finished": "f",
        "machine": {
            "cpus": 2,
            "cpu_model": "x",
            "memory_gib": 1.0,
            "kernel": "k",
            "python": "3.11",
            "iptables": "iptables v1.8.9",
            "nft": "nftables v1.0.6",
            "load_at_start": [1.0, 1.0, 1.0],
        },
        "config": {},
        "skipped": ["nftables: skipped"],
        "points": [half, point],
        "churn": {"iptables-legacy": prog},
        "burst": {},
        "churn_point": "10000x10",
        "cluster": {},
    }


def test_the_report_names_each_target_met_or_missed() -> None:
    text = markdown.render(_doc())
    assert "| first convergence / kernel floor | 1.80 x | <= 1.5 x | **missed** |" in text
    assert "| initial list + watch, CPU | 1.50 s | <= 2 s | met |" in text
    assert "| RSS steady | 120.00 MiB | <= 150 MiB | met |" in text
    assert "| growth 5k -> 10k (x 10) | 2.25 x | <= 2.2 x | **missed** |" in text
    assert "| network programming p99 under churn | 0.50 s | <= 1 s | met |" in text
    assert "nftables: skipped" in text


def test_targets_not_on_the_grid_say_so() -> None:
    doc = _doc()
    doc["points"] = doc["points"][:1]
    assert "not measured: 10000x10 on iptables-legacy is not in this run" in markdown.render(doc)


def test_plots_are_written(tmp_path: Path) -> None:
    plots.render(_doc(), tmp_path)
    for name in ("convergence.png", "changes.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_catches_a_timed_run_whose_read_back_did_not_match() -> None:
    doc = _doc()
    assert validate(doc) == []
    doc["points"][1]["convergence"][0]["read_back_endpoints"] = 7
    assert validate(doc) == ["iptables-legacy 10000x10: timed although the read-back did not match"]
    doc = _doc()
    doc["churn"]["iptables-legacy"]["lost"] = 1
    assert validate(doc) == ["churn iptables-legacy: seen + lost != written"]


def test_a_reply_marks_its_generation_and_every_earlier_one_programmed() -> None:
    gens = Generations(first_vip=0, services=2)
    for generation, written in ((1, 10.0), (2, 11.0), (3, 12.0)):
        gens.record(0, generation, written)
    gens.observe(0, SPARE_PORTS[0], 12.5)  # generation 0 still answers: nothing is in
    assert gens.latencies == [] and gens.waiting() == [0]
    gens.observe(0, SPARE_PORTS[2], 13.0)  # generation 2 answers: 1 and 2 are in
    assert gens.latencies == [3.0, 2.0]
    gens.observe(0, SPARE_PORTS[3], 14.0)
    assert gens.latencies == [3.0, 2.0, 2.0] and gens.waiting() == []


def test_ports_repeat_after_a_full_cycle_and_map_to_the_newest_generation() -> None:
    gens = Generations(first_vip=0, services=1)
    cycle = len(SPARE_PORTS)
    gens.record(0, cycle + 1, 100.0)  # generations up to cycle were seen before
    gens.observe(0, SPARE_PORTS[1], 101.0)
    assert gens.latencies == [1.0]


def test_reports_of_several_runs_merge_point_by_point() -> None:
    first, second = _doc(), _doc()
    first["points"] = first["points"][1:]  # 10000x10
    second["points"] = second["points"][:1]  # 5000x10
    second["command"] = ".venv/bin/python -m benchmarks --grid 5000x10"
    merged = report.merge([first, second])
    assert [p["services"] for p in merged["points"]] == [5000, 10000]
    assert "--grid 5000x10" in merged["command"]
    assert validate(merged) == []
    assert "| growth 5k -> 10k (x 10) | 2.25 x |" in markdown.render(merged)


NFT_SAVED = """\
table ip kube-proxy-py {
\tmap ip-endpoints-tcp {
\t\ttypeof ip daddr . tcp dport . numgen random mod 1 : ip daddr . tcp dport
\t\telements = { 198.19.0.1 . 80 . 0x00000000 : 198.18.64.10 . 8080,
\t\t\t     198.19.0.2 . 80 . 0x00000000 : 198.18.64.10 . 8080,
\t\t\t     198.19.0.1 . 80 . 0x00000001 : 198.18.64.11 . 8080 }
\t}

\tmap ip-endpoints-udp {
\t\ttype ipv4_addr . inet_service . mark : ipv4_addr . inet_service
\t}

\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t\telements = { 198.19.0.1 . tcp . 80 : goto cluster-tcp-2 }
\t}
}
"""


def test_nftables_read_back_counts_endpoint_map_elements() -> None:
    assert count_nft_endpoints(NFT_SAVED) == 3


def test_metrics_are_summed_over_label_sets_unless_labels_are_given() -> None:
    text = (
        'kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"} 12.5\n'
        'kubeproxy_py_sync_phase_duration_seconds_sum{phase="write"} 3.0\n'
        "plain_metric 2.0\n"
    )
    assert metric(text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") == 12.5
    assert metric(text, "plain_metric") == 2.0
    assert metric(text, "kubeproxy_py_sync_phase_duration_seconds_sum", '{phase="write"}') == 3.0
    assert metric(text, "absent") == 0.0
    both = text + 'kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv6"} 11.0\n'
    assert metric(both, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", combine=max) == 12.5
