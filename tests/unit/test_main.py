"""`python -m proxy`: what each exit-early mode runs, and what it never starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import proxy.__main__ as entry
from proxy.config.settings import Settings


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Replace `proxy.app.run`: any test reaching it records the settings it got."""
    started: list[Settings] = []

    def run(settings: Settings) -> int:
        started.append(settings)
        return 0

    monkeypatch.setattr(entry, "run", run)
    monkeypatch.setenv("NODE_NAME", "node-1")
    return started


def test_write_config_to_writes_and_starts_nothing(
    tmp_path: Path, no_proxy: list[Settings]
) -> None:
    out = tmp_path / "kp.yaml"
    # --cleanup too: upstream writes the file and returns before its cleanup.
    assert entry.main(["--write-config-to", str(out), "--conntrack-min=1000", "--cleanup"]) == 0
    assert no_proxy == []
    written = yaml.safe_load(out.read_text())
    assert written["kind"] == "KubeProxyConfiguration"
    assert written["conntrack"]["min"] == 1000


def test_write_config_to_failures_exit_1(tmp_path: Path, no_proxy: list[Settings]) -> None:
    assert entry.main(["--write-config-to", str(tmp_path / "no" / "such" / "dir.yaml")]) == 1
    assert entry.main(["--write-config-to", str(tmp_path / "x"), "--metrics-port=0"]) == 1
    assert no_proxy == []


def test_without_an_exit_early_flag_the_proxy_runs(no_proxy: list[Settings]) -> None:
    assert entry.main(["--proxy-mode=iptables"]) == 0
    assert [s.proxy_mode for s in no_proxy] == ["iptables"]
