"""`python -m proxy`: what each exit-early mode runs, and what it never starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import proxy.__main__ as entry
from proxy.config.settings import Settings
from proxy.kernel.sysctl import ProcTunables, Sysctl
from tests.fakes.proc_root import CONNTRACK_DEFAULTS, make_root, read_root


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


@pytest.fixture
def fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`--init-only` writes under a directory laid out like / instead of the real kernel."""
    root = tmp_path / "root"
    make_root(root, CONNTRACK_DEFAULTS)
    monkeypatch.setattr(entry, "ProcTunables", lambda: ProcTunables(root))
    return root


def test_init_only_sets_the_tunables_and_starts_nothing(
    fake_root: Path, no_proxy: list[Settings]
) -> None:
    argv = ["--init-only", "--conntrack-tcp-be-liberal", "--conntrack-udp-timeout=45s"]
    assert entry.main(argv) == 0
    assert no_proxy == []
    after = read_root(fake_root, CONNTRACK_DEFAULTS)
    assert after[Sysctl("net.netfilter.nf_conntrack_tcp_be_liberal")] == 1
    assert after[Sysctl("net.netfilter.nf_conntrack_udp_timeout")] == 45
    assert after[Sysctl("net.netfilter.nf_conntrack_tcp_timeout_established")] == 86400


def test_init_only_exits_1_naming_a_sysctl_it_cannot_set(
    fake_root: Path, no_proxy: list[Settings], caplog: pytest.LogCaptureFixture
) -> None:
    assert entry.main(["--init-only", "--proxy-mode=ipvs"]) == 1  # this fake has no ip_vs
    assert "sysctl net.ipv4.vs.conntrack does not exist" in caplog.text
    assert no_proxy == []


def test_cleanup_wins_over_init_only_as_upstream(fake_root: Path, no_proxy: list[Settings]) -> None:
    assert entry.main(["--init-only", "--cleanup"]) == 0
    assert [s.cleanup for s in no_proxy] == [True]
    after = read_root(fake_root, CONNTRACK_DEFAULTS)
    assert after == CONNTRACK_DEFAULTS  # cleanup ran instead: nothing set
