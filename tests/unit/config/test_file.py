"""Reading a KubeProxyConfiguration file: every field, the mode's section, checks and messages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from proxy.config.errors import ConfigError
from proxy.config.file import FileConfig, load_config_file, parse_config_document
from proxy.config.settings import Settings, setting_value
from tests.unit.config.documents import UPSTREAM_DEFAULTS, doc, write


def test_upstream_default_document_sets_defaults_and_reports_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        config = load_config_file(write(tmp_path, UPSTREAM_DEFAULTS))
    assert caplog.records == []
    assert config.unknown_fields == ()
    assert config.unsupported_fields == ()
    assert config.get("proxy_mode") == "iptables"
    assert config.get("kubeconfig") is None  # "" means in-cluster
    assert config.get("hostname_override") is None
    assert config.get("metrics_bind_address") == "127.0.0.1:10249"
    assert config.get("healthz_bind_address") == "0.0.0.0:10256"
    assert (config.get("sync_period"), config.get("min_sync_period")) == (30.0, 1.0)
    assert (config.get("masquerade_all"), config.get("masquerade_bit")) == (False, 14)
    assert config.get("cluster_cidrs") is None
    assert config.fields["sync_period"] == "iptables.syncPeriod"
    # Every ipvs.* and conntrack.* value is upstream's default, so ours too.
    defaults = Settings()
    for name, value in config.values.items():
        if name.startswith(("ipvs.", "conntrack.")):
            assert value == setting_value(defaults, name), name
    assert config.get("ipvs.scheduler") == "rr"  # "" means round robin
    assert config.get("ipvs.exclude_cidrs") is None  # null: not set


def test_every_supported_field_is_read(tmp_path: Path) -> None:
    text = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
hostnameOverride: " Node-A "
mode: nftables
clusterCIDR: 198.18.0.0/16,fd00:1::/64
metricsBindAddress: 0.0.0.0
healthzBindAddress: "[::]:9999"
nodePortAddresses: [primary]
logging:
  verbosity: 3
nftables:
  syncPeriod: 1m0s
  minSyncPeriod: 500ms
  masqueradeAll: true
  masqueradeBit: 5
ipvs:
  scheduler: wrr
  excludeCIDRs: [" 198.18.0.0/15 ", ""]
  strictARP: true
  tcpTimeout: 15m
  tcpFinTimeout: 30s
  udpTimeout: 5m
conntrack:
  maxPerCore: 0
  min: 65536
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 30m
  tcpBeLiberal: true
  udpTimeout: 45s
  udpStreamTimeout: 2m
"""
    config = load_config_file(write(tmp_path, text))
    assert config == FileConfig(
        path=str(tmp_path / "config.yaml"),
        values={
            "kubeconfig": "/var/lib/kube-proxy/kubeconfig.conf",
            "hostname_override": "node-a",
            "proxy_mode": "nftables",
            "cluster_cidrs": ("198.18.0.0/16", "fd00:1::/64"),
            "masquerade_all": True,
            "nodeport_addresses": ("primary",),
            "metrics_bind_address": "0.0.0.0:10249",
            "healthz_bind_address": "[::]:9999",
            "sync_period": 60.0,
            "min_sync_period": 0.5,
            "masquerade_bit": 5,
            "verbosity": 3,
            "ipvs.scheduler": "wrr",
            "ipvs.exclude_cidrs": ("198.18.0.0/15",),
            "ipvs.strict_arp": True,
            "ipvs.tcp_timeout": 900.0,
            "ipvs.tcp_fin_timeout": 30.0,
            "ipvs.udp_timeout": 300.0,
            "conntrack.max_per_core": 0,
            "conntrack.min": 65536,
            "conntrack.tcp_established_timeout": 0.0,  # explicit 0: leave the kernel's value
            "conntrack.tcp_close_wait_timeout": 1800.0,
            "conntrack.tcp_be_liberal": True,
            "conntrack.udp_timeout": 45.0,
            "conntrack.udp_stream_timeout": 120.0,
        },
        fields=config.fields,
    )
    assert config.fields["masquerade_bit"] == "nftables.masqueradeBit"
    assert config.fields["conntrack.tcp_be_liberal"] == "conntrack.tcpBeLiberal"
    assert config.fields["ipvs.tcp_fin_timeout"] == "ipvs.tcpFinTimeout"
    assert config.unsupported_fields == ()


def test_an_empty_ipvs_scheduler_means_round_robin() -> None:
    assert parse_config_document(doc(ipvs={"scheduler": ""})).get("ipvs.scheduler") == "rr"
    assert parse_config_document(doc(ipvs={"scheduler": "sh"})).get("ipvs.scheduler") == "sh"


def test_ipvs_values_are_read_unchecked_in_every_mode() -> None:
    # Upstream validates ipvs.* only in ipvs mode; proxy.cli checks the merged result then.
    config = parse_config_document(doc(ipvs={"tcpTimeout": "-1s", "excludeCIDRs": ["bogus"]}))
    assert config.get("ipvs.tcp_timeout") == -1.0
    assert config.get("ipvs.exclude_cidrs") == ("bogus",)


def test_json_files_work(tmp_path: Path) -> None:
    text = json.dumps(doc(mode="ipvs", ipvs={"syncPeriod": "10s", "minSyncPeriod": "2s"}))
    config = load_config_file(write(tmp_path, text, "config.json"))
    assert config.values == {"proxy_mode": "ipvs", "sync_period": 10.0, "min_sync_period": 2.0}


def test_mode_picks_the_section_and_top_level_periods_win() -> None:
    periods = {"syncPeriod": "10s", "minSyncPeriod": "2s"}
    iptables = parse_config_document(doc(ipvs=periods, iptables={"syncPeriod": "20s"}))
    assert (iptables.get("sync_period"), iptables.get("min_sync_period")) == (20.0, None)
    ipvs = parse_config_document(doc(mode="ipvs", ipvs=periods, iptables={"syncPeriod": "20s"}))
    assert (ipvs.get("sync_period"), ipvs.get("min_sync_period")) == (10.0, 2.0)
    top = parse_config_document(doc(iptables={"syncPeriod": "20s"}, syncPeriod="45s"))
    assert (top.get("sync_period"), top.fields["sync_period"]) == (45.0, "syncPeriod")
    zero = parse_config_document(doc(iptables={"syncPeriod": "20s"}, syncPeriod="0s"))
    assert zero.get("sync_period") == 20.0  # zero means "default", as upstream's defaulting


def test_masquerade_bit_comes_from_iptables_except_in_nftables_mode() -> None:
    sections = {"iptables": {"masqueradeBit": 12}, "nftables": {"masqueradeBit": 3}}
    assert parse_config_document(doc(**sections)).get("masquerade_bit") == 12
    assert parse_config_document(doc(mode="ipvs", **sections)).get("masquerade_bit") == 12
    assert parse_config_document(doc(mode="nftables", **sections)).get("masquerade_bit") == 3


def test_unknown_fields_are_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = json.dumps(doc(mode="iptables", colour="blue", iptables={"syncPeriod": "5s", "x": 1}))
    with caplog.at_level(logging.WARNING):
        config = load_config_file(write(tmp_path, text))
    assert config.unknown_fields == ("colour", "iptables.x")
    assert config.get("sync_period") == 5.0
    assert len(caplog.records) == 1
    assert "colour, iptables.x" in caplog.records[0].getMessage()


def test_known_but_unimplemented_fields_are_reported_only_when_not_default() -> None:
    config = parse_config_document(
        doc(
            conntrack={"maxPerCore": 0, "min": 131072, "tcpEstablishedTimeout": "24h"},
            ipvs={"scheduler": "rr", "strictARP": True},
            detectLocalMode="ClusterCIDR",
            bindAddressHardFail=True,
            winkernel={"enableDSR": True},
            featureGates={"SomeGate": True},
            oomScoreAdj=-999,
            iptables={"localhostNodePorts": False},
        )
    )
    # conntrack.* and ipvs.* are implemented now: never "unsupported", whatever they hold.
    assert config.unsupported_fields == ("featureGates",)
    assert config.values["localhost_nodeports"] is False


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"apiVersion": "kubeproxy.config.k8s.io/v1alpha2"},
         'apiVersion: "kubeproxy.config.k8s.io/v1alpha2" is not supported'),
        ({"apiVersion": None}, "apiVersion: null is not supported"),
        ({"kind": "KubeletConfiguration"}, 'kind: "KubeletConfiguration" is not supported'),
        ({"iptables": {"syncPeriod": "3x"}}, 'iptables.syncPeriod: "3x" is not a duration'),
        ({"iptables": {"syncPeriod": 30}}, "iptables.syncPeriod: 30 is not a duration"),
        ({"conntrack": {"tcpCloseWaitTimeout": "1 h"}},
         'conntrack.tcpCloseWaitTimeout: "1 h" is not a duration'),
        ({"iptables": {"masqueradeBit": "14"}}, 'iptables.masqueradeBit: "14" is not an integer'),
        ({"iptables": {"masqueradeBit": True}}, "iptables.masqueradeBit: true is not an integer"),
        ({"iptables": {"masqueradeBit": 32}},
         "iptables.masqueradeBit: 32 must be within the range [0, 31]"),
        ({"iptables": {"masqueradeAll": "yes"}}, 'iptables.masqueradeAll: "yes" is not a boolean'),
        ({"iptables": "fast"}, 'iptables: "fast" must be an object'),
        ({"mode": "userspace"}, 'mode: "userspace" is not a proxy mode'),
        ({"mode": "IPTables"}, 'mode: "IPTables" is not a proxy mode'),
        ({"clusterCIDR": "198.18.0.0/16,198.19.0.0/16"},
         'clusterCIDR: "198.18.0.0/16,198.19.0.0/16" must be a dual-stack pair'),
        ({"clusterCIDR": "198.18.0.0"}, 'clusterCIDR: "198.18.0.0" holds "198.18.0.0"'),
        ({"nodePortAddresses": "198.18.0.0/24"},
         'nodePortAddresses: "198.18.0.0/24" is not a list of strings'),
        ({"nodePortAddresses": ["primary", "198.18.0.0/24"]},
         'nodePortAddresses: ["primary", "198.18.0.0/24"] can not mix'),
        ({"metricsBindAddress": "localhost:10249"},
         'metricsBindAddress: "localhost:10249" is not IP or IP:port'),
        ({"healthzBindAddress": "0.0.0.0:0"},
         'healthzBindAddress: "0.0.0.0:0" must have a port within the range [1, 65535]'),
        ({"hostnameOverride": "   "}, 'hostnameOverride: "   " is empty'),
        ({"logging": {"verbosity": -1}},
         "logging.verbosity: -1 must be greater than or equal to 0"),
        ({"oomScoreAdj": 2**40}, "oomScoreAdj: 1099511627776 is out of range"),
        ({"featureGates": {"A": "yes"}}, 'featureGates: {"A": "yes"} is not a map of booleans'),
        ({"conntrack": {"maxPerCore": -1}},
         "conntrack.maxPerCore: -1 must be greater than or equal to 0"),
        ({"conntrack": {"min": -5}}, "conntrack.min: -5 must be greater than or equal to 0"),
        ({"conntrack": {"min": "5"}}, 'conntrack.min: "5" is not an integer'),
        ({"conntrack": {"tcpEstablishedTimeout": "-1h"}},
         'conntrack.tcpEstablishedTimeout: "-1h" must be greater than or equal to 0'),
        ({"conntrack": {"tcpCloseWaitTimeout": "-1s"}},
         'conntrack.tcpCloseWaitTimeout: "-1s" must be greater than or equal to 0'),
        ({"conntrack": {"udpTimeout": "-1s"}},
         'conntrack.udpTimeout: "-1s" must be greater than or equal to 0'),
        ({"conntrack": {"udpStreamTimeout": "-1s"}},
         'conntrack.udpStreamTimeout: "-1s" must be greater than or equal to 0'),
        ({"conntrack": {"tcpBeLiberal": "yes"}}, 'conntrack.tcpBeLiberal: "yes" is not a boolean'),
        ({"ipvs": {"strictARP": 1}}, "ipvs.strictARP: 1 is not a boolean"),
        ({"ipvs": {"tcpTimeout": "15"}}, 'ipvs.tcpTimeout: "15" is not a duration'),
        ({"ipvs": {"excludeCIDRs": "198.18.0.0/15"}},
         'ipvs.excludeCIDRs: "198.18.0.0/15" is not a list of strings'),
        ({"ipvs": {"scheduler": 7}}, "ipvs.scheduler: 7 is not a string"),
    ],
)  # fmt: skip
def test_bad_values_name_the_field_and_the_value(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config_document(doc(**fields), path="/etc/kp.yaml")
    assert str(err.value).startswith(f"/etc/kp.yaml: {message}")


def test_null_means_not_set() -> None:
    config = parse_config_document(
        doc(mode=None, iptables=None, clusterCIDR=None, conntrack={"min": None}, ipvs=None)
    )
    assert config.values == {}


def test_file_problems_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"^{missing}: cannot read the config file"):
        load_config_file(missing)
    with pytest.raises(ConfigError, match="not valid YAML or JSON"):
        load_config_file(write(tmp_path, "mode: [unclosed"))
    with pytest.raises(ConfigError, match="must hold a KubeProxyConfiguration object"):
        load_config_file(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="must hold a KubeProxyConfiguration object"):
        load_config_file(write(tmp_path, ""))
