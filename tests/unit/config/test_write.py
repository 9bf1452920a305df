"""--write-config-to: the settings as a KubeProxyConfiguration that reads back the same."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from proxy.cli import parse_settings
from proxy.config.errors import ConfigError
from proxy.config.file import load_config_file
from proxy.config.settings import SETTING_NAMES, Settings, default_value, setting_value
from proxy.config.write import RUN_ONLY, config_document, render_config, write_config_file

ENV = {"NODE_NAME": "node-1"}


def parse(argv: Sequence[str]) -> Settings:
    return parse_settings(argv, ENV)


def in_file(settings: Settings) -> Settings:
    """`settings` without what a KubeProxyConfiguration does not carry."""
    return dataclasses.replace(
        settings, **{name: default_value(name) for name in RUN_ONLY if name != "node_name"}
    )


CASES: dict[str, list[str]] = {
    "defaults": [],
    "iptables, everything set": [
        "--kubeconfig=/var/lib/kube-proxy/kubeconfig.conf",
        "--hostname-override=Node-A",
        "--cluster-cidr=198.18.0.0/16,fd00::/64",
        "--masquerade-all",
        "--iptables-localhost-nodeports=false",
        "--nodeport-addresses=198.18.0.0/24,fd00::/64",
        "--metrics-bind-address=0.0.0.0:9100",
        "--healthz-bind-address=[::1]:9999",
        "--iptables-sync-period=1m30s",
        "--iptables-min-sync-period=250ms",
        "--iptables-masquerade-bit=3",
        "-v=5",
        # Carried unchecked outside ipvs mode, as upstream: written back as they are.
        "--ipvs-scheduler=wlc",
        "--ipvs-exclude-cidrs=not-a-cidr",
        "--ipvs-tcp-timeout=-1s",
        "--conntrack-max-per-core=0",
        "--conntrack-min=0",
        "--conntrack-tcp-timeout-established=0",
        "--conntrack-tcp-timeout-close-wait=90s",
        "--conntrack-tcp-be-liberal",
        "--conntrack-udp-timeout=30s",
        "--conntrack-udp-timeout-stream=3m",
    ],
    "nftables": [
        "--proxy-mode=nftables",
        "--iptables-sync-period=10s",
        "--iptables-min-sync-period=10s",
        "--masquerade-all",
        "--iptables-masquerade-bit=0",
        "--nodeport-addresses=primary",
    ],
    "ipvs": [
        "--proxy-mode=ipvs",
        "--ipvs-sync-period=45s",
        "--ipvs-min-sync-period=1.5s",
        "--ipvs-scheduler=sh",
        "--ipvs-exclude-cidrs=198.18.0.1/15,fd00::1/64",
        "--ipvs-strict-arp",
        "--ipvs-tcp-timeout=15m",
        "--ipvs-tcpfin-timeout=30s",
        "--ipvs-udp-timeout=5m",
        "--conntrack-max-per-core=65536",
        "--conntrack-min=262144",
    ],
}


@pytest.mark.parametrize("argv", CASES.values(), ids=CASES.keys())
def test_config_of_the_written_file_gives_the_same_settings(
    argv: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "written.yaml"
    settings = parse([*argv, f"--write-config-to={out}"])
    write_config_file(settings, out)

    with caplog.at_level(logging.WARNING):
        config = load_config_file(out)  # our own reader: nothing unknown, nothing unsupported
    assert (config.unknown_fields, config.unsupported_fields) == ((), ())
    assert caplog.records == []

    reread = parse([f"--config={out}"])
    assert in_file(reread) == in_file(settings)
    assert reread.unsupported_flags == ()


def test_the_cases_give_every_written_setting_a_value_other_than_its_default() -> None:
    # Otherwise a setting the writer forgot would round-trip as its default, unnoticed.
    parsed = [parse(argv) for argv in CASES.values()]
    for name in SETTING_NAMES:
        if name in RUN_ONLY:
            continue
        values = {repr(setting_value(s, name)) for s in parsed}
        assert repr(default_value(name)) in values and len(values) > 1, name


def test_a_file_and_flags_over_it_are_written_merged(tmp_path: Path) -> None:
    source = tmp_path / "in.yaml"
    source.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
        "kind: KubeProxyConfiguration\n"
        "mode: ipvs\n"
        "ipvs: {scheduler: lc, syncPeriod: 20s}\n"
        "conntrack: {min: 1000}\n"
        "oomScoreAdj: -500\n"  # not implemented: not written
    )
    out = tmp_path / "out.yaml"
    settings = parse([f"--config={source}", "--conntrack-min=2000", "--ipvs-strict-arp"])
    write_config_file(settings, out)
    written = yaml.safe_load(out.read_text())
    assert written["ipvs"]["scheduler"] == "lc"
    assert written["ipvs"]["syncPeriod"] == "20s"
    assert written["ipvs"]["strictARP"] is True
    assert written["conntrack"]["min"] == 2000
    assert "oomScoreAdj" not in written


def test_the_default_document() -> None:
    assert config_document(Settings()) == {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": ""},
        "hostnameOverride": "",
        "mode": "iptables",
        "clusterCIDR": "",
        "nodePortAddresses": [],
        "metricsBindAddress": "127.0.0.1:10249",
        "healthzBindAddress": "0.0.0.0:10256",
        "logging": {"verbosity": 0},
        "iptables": {
            "localhostNodePorts": True,
            "masqueradeAll": False,
            "masqueradeBit": 14,
            "minSyncPeriod": "1s",
            "syncPeriod": "30s",
        },
        "ipvs": {
            "excludeCIDRs": [],
            "scheduler": "rr",
            "strictARP": False,
            "tcpFinTimeout": "0s",
            "tcpTimeout": "0s",
            "udpTimeout": "0s",
        },
        "conntrack": {
            "maxPerCore": 32768,
            "min": 131072,
            "tcpBeLiberal": False,
            "tcpCloseWaitTimeout": "1h0m0s",
            "tcpEstablishedTimeout": "24h0m0s",
            "udpStreamTimeout": "0s",
            "udpTimeout": "0s",
        },
    }
    text = render_config(Settings())
    assert text.startswith("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nclientConnection:")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--iptables-min-sync-period=0"], "a min sync period of 0s cannot be written"),
        (["--metrics-bind-address="], "reads an empty metricsBindAddress as the default"),
        (["--healthz-port=0"], "reads an empty healthzBindAddress as the default"),
    ],
)
def test_settings_a_file_cannot_hold_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^--write-config-to: .*{message}"):
        config_document(parse(argv))


def test_an_unwritable_path_is_named(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "kp.yaml"
    with pytest.raises(ConfigError, match=f"--write-config-to: cannot write {target}"):
        write_config_file(Settings(), target)
