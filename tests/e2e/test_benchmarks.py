"""The benchmarks run, end to end, at a size CI can afford: a smoke test, not a timing.

Nothing here asserts a speed (figures live in the benchmarks' own output and the
README); it proves the harness still works against the current code and that what it
reports is well formed and was checked against the kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("end-to-end tests must run as root on CI")
        pytest.skip("the scale benchmark needs root (network namespaces, iptables)")


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_the_scale_benchmark_converges_verifies_and_reports(variant: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.scale",
            "--services=40",
            "--endpoints=3",
            f"--variant={variant}",
            "--changes=3",
            "--repeat=2",
            "--sync-period=2",
            f"--json={out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["sep_chains"] == 40 * 3 + 1  # read back from the kernel
    assert result["vips_answering"] == result["vips_probed"] == 40  # real connections
    assert result["changes_lost"] == 0
    assert len(result["change_latencies"]) == 3
    assert len(result["repetitions"]) == 2
    assert all(run["ours"] > 0 and run["raw"] > 0 for run in result["repetitions"])
    assert result["rss_steady_mib"] > 0
    assert "ratio ours / raw" in done.stdout


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
