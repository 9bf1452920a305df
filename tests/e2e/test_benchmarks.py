"""The benchmarks run, end to end, at a size CI can afford: a smoke test, not a timing.

Nothing here asserts a speed (figures live in the harness's own output and the
README); it proves the harness still works against the current code and that what it
reports is well formed and was checked against the kernel: every timed convergence
and floor read back the endpoints it should, every change was seen by a packet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.results import validate
from benchmarks.scenarios import CHURN_SERVICES
from proxy.backends.base import known

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("end-to-end tests must run as root on CI")
        pytest.skip("the benchmark harness needs root (network namespaces, iptables)")


def test_the_harness_quick_run_measures_verifies_and_reports(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", f"--out={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == []
    expected_backends = {"iptables-legacy", "iptables-nft"} | (
        {"nftables"} if "nftables" in known() else set()
    )
    assert {p["backend"] for p in doc["points"]} == expected_backends
    if "nftables" not in known():
        assert any(line.startswith("nftables: skipped") for line in doc["skipped"])
    for point in doc["points"]:
        assert point["status"] == "ok", point["detail"]
        expected = point["services"] * point["endpoints"] + 1 + CHURN_SERVICES
        (conv,) = point["convergence"]
        assert conv["read_back_endpoints"] == conv["expected_endpoints"] == expected
        assert conv["vips_answering"] == conv["vips_probed"] > 0  # real connections
        assert conv["cpu_list_watch"] > 0 and conv["rss_steady_mib"] > 0
        (floor,) = point["floor"]
        assert floor["ok"] and floor["read_back_endpoints"] == expected
        assert floor["tool_peak_mib"] > 0 and len(floor["touch_seconds"]) > 0
        if point["backend"].startswith("iptables"):
            up = point["upstream"]
            assert up["ok"] and up["read_back_endpoints"] == point["services"] * point["endpoints"]
        figures = point["summary"]["changes"]
        assert set(figures) == {
            "add endpoint",
            "remove endpoint",
            "unready endpoint",
            "add service",
        }
        assert all(f["count"] == 1 and f["lost"] == 0 for f in figures.values())
        assert point["summary"]["ratio_to_floor"] > 0
    for name in ("churn", "burst"):
        assert set(doc[name]) == expected_backends
        for prog in doc[name].values():
            assert prog["lost"] == 0 and len(prog["latencies"]) == prog["changes"] > 0
            assert prog["proxy_histogram"]["count"] > 0
    assert set(doc["cluster"]) == expected_backends
    for cluster in doc["cluster"].values():  # two nodes, one control plane
        assert cluster["status"] == "ok", cluster["detail"]
        assert cluster["nodes"] == 2 and cluster["lost"] == 0
        assert len(cluster["latencies"]) == cluster["changes"] > 0
        assert cluster["proxy_histogram"]["count"] > 0
    assert (tmp_path / "logs").is_dir()
    report = (tmp_path / "results.md").read_text()
    assert "## First convergence and floors" in report and "## Targets" in report
    for png in ("convergence.png", "changes.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_the_render_benchmark_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.render", "--grid=10x2,20x3", "--repeat=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert [line.split()[0] for line in done.stdout.splitlines()[1:]] == ["10x2", "20x3"]
