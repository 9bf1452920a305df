"""scripts/conformance.py: junit XML of the feature suite -> the conformance table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "conformance.py"


@pytest.fixture(scope="module")
def conformance() -> ModuleType:
    spec = importlib.util.spec_from_file_location("conformance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["conformance"] = module
    spec.loader.exec_module(module)
    return module


def case(name: str, feature: str, backend: str, body: str = "") -> str:
    return (
        f'<testcase classname="tests.kernel.test_service_features" name="{name}[{backend}]">'
        f'<properties><property name="feature" value="{feature}" />'
        f'<property name="backend" value="{backend}" /></properties>{body}</testcase>'
    )


JUNIT = (
    '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
    + case("test_sticky", "session-affinity", "iptables-nft")
    + case("test_sticky2", "session-affinity", "iptables-nft")
    + case("test_sticky", "session-affinity", "iptables-legacy", '<failure message="x" />')
    + case("test_lo", "localhost-nodeports", "iptables-nft")
    + case(
        "test_lo",
        "localhost-nodeports",
        "nftables",
        '<skipped type="pytest.xfail" message="nftables does not implement it yet" />',
    )
    + case("test_sctp", "sctp", "iptables-nft", '<skipped type="pytest.skip" message="no SCTP" />')
    + '<testcase classname="tests.unit.test_x" name="test_unrelated" />'
    + "</testsuite></testsuites>"
)


def row(text: str, feature: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| `{feature}`"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_each_cell_is_decided_by_its_tests_only(conformance: ModuleType, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    out = tmp_path / "conformance.md"
    assert conformance.main(["--junit", str(junit), "--out", str(out)]) == 0
    text = out.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| feature"))
    assert "`iptables-nft` | `iptables-legacy` | `nftables`" in header
    assert row(text, "session-affinity") == ["pass (2)", "**fail** (1 of 1)", "no test"]
    assert row(text, "localhost-nodeports") == ["pass (1)", "no test", "not implemented"]
    assert row(text, "sctp") == ["skipped: no SCTP", "no test", "no test"]
    assert row(text, "external-ips") == ["no test", "no test", "no test"]
    assert "`test_sticky`, `test_sticky2`" in text


def test_check_fails_on_a_stale_table_and_passes_once_regenerated(
    conformance: ModuleType, tmp_path: Path
) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    out = tmp_path / "conformance.md"
    out.write_text("stale\n")
    assert conformance.main(["--junit", str(junit), "--out", str(out), "--check"]) == 1
    assert conformance.main(["--junit", str(junit), "--out", str(out), "--check"]) == 0


def test_no_feature_tests_is_an_error(conformance: ModuleType, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase name="t" /></testsuite></testsuites>')
    assert conformance.main(["--junit", str(junit), "--out", str(tmp_path / "c.md")]) == 2
