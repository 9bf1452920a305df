"""Settings rules and the KubeProxyConfiguration file: Go durations, value checks, messages."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from proxy.config import (
    BadValueError,
    ConfigError,
    FileConfig,
    Settings,
    check_sync_periods,
    format_go_duration,
    load_config_file,
    parse_bind_address,
    parse_cluster_cidrs,
    parse_config_document,
    parse_go_duration,
    parse_go_duration_ns,
    parse_nodeport_addresses,
    resolve_node_name,
    split_host_port,
)

# Upstream's defaulted v1alpha1 document (scheme testdata "after/v1alpha1.yaml"), as a
# kubeadm-generated ConfigMap looks: every field present, every value the default.
UPSTREAM_DEFAULTS = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: ""
  qps: 5
clusterCIDR: ""
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpBeLiberal: false
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  localhostNodePorts: true
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 30s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 5s
  format: text
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 127.0.0.1:10249
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"""


def doc(**fields: object) -> dict[str, object]:
    return {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"} | (
        fields
    )


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- Go durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("30s", 30_000_000_000),
        ("1m0s", 60_000_000_000),
        ("500ms", 500_000_000),
        ("1h2m3.5s", 3_723_500_000_000),
        ("0", 0),
        ("-0", 0),
        ("0s", 0),
        (".5s", 500_000_000),
        ("5.s", 5_000_000_000),
        ("+2h", 7_200_000_000_000),
        ("-1.5h", -5_400_000_000_000),
        ("1us", 1_000),
        ("1\u00b5s", 1_000),
        ("1\u03bcs", 1_000),
        ("3ns", 3),
        ("1.000000001s", 1_000_000_001),
        ("2562047h47m16.854775807s", (1 << 63) - 1),
    ],
)
def test_go_durations_that_parse(text: str, nanos: int) -> None:
    assert parse_go_duration_ns(text) == nanos
    assert parse_go_duration(text) == pytest.approx(nanos / 1e9)


@pytest.mark.parametrize(
    "text",
    ["", "3x", "1", "30", ".s", "s", "-", "+", "1 s", " 1s", "1s ", "1d", "1S", "1.2.3s", "1e3s",
     "2562047h47m16.854775808s", "9223372036854775808ns"],
)  # fmt: skip
def test_go_durations_that_fail(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration_ns(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (30, "30s"),
        (60, "1m0s"),
        (0.5, "500ms"),
        (1.5, "1.5s"),
        (3723.5, "1h2m3.5s"),
        (86400, "24h0m0s"),
        (0.000001, "1\u00b5s"),
        (0.0000015, "1.5\u00b5s"),
        (-90, "-1m30s"),
    ],
)
def test_go_duration_strings(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text
    assert parse_go_duration(text) == pytest.approx(seconds)


# -- single values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0", "0.0.0.0:10256"),
        ("198.18.0.1:9999", "198.18.0.1:9999"),
        ("198.018.000.001:9999", "198.18.0.1:9999"),
        ("::", "[::]:10256"),
        ("[::1]:10256", "[::1]:10256"),
        ("[fd00::0001]:80", "[fd00::1]:80"),
        (" 198.18.0.1 ", "198.18.0.1:10256"),
        ("::1:80", "[::1:80]:10256"),  # an IPv6 address, not host:port (as in Go)
    ],
)
def test_bind_address_forms(text: str, expected: str) -> None:
    assert parse_bind_address(text, 10256) == expected


@pytest.mark.parametrize(
    "text",
    ["localhost:10249", "198.18.0.1:0", "198.18.0.1:65536", "198.18.0.1:", ":10249",
     "[198.18.0.1]:80", "fe80::1%eth0", "198.18.0.999", "[::1]", "198.18.0.1:http"],
)  # fmt: skip
def test_bind_address_rejects(text: str) -> None:
    with pytest.raises(BadValueError):
        parse_bind_address(text, 10256)


def test_split_host_port_allows_port_zero_for_servers() -> None:
    assert split_host_port("127.0.0.1:0") == ("127.0.0.1", 0)
    assert split_host_port("[::1]:8080") == ("::1", 8080)
    with pytest.raises(ValueError):
        split_host_port("127.0.0.1")


def test_cluster_cidrs_are_normalised_and_at_most_a_dual_stack_pair() -> None:
    assert parse_cluster_cidrs(["198.18.0.1/15", " fd00::/64 "]) == ("198.18.0.0/15", "fd00::/64")
    assert parse_cluster_cidrs(["198.018.0.0/16"]) == ("198.18.0.0/16",)
    assert parse_cluster_cidrs([""]) == ()
    with pytest.raises(BadValueError, match="dual-stack pair: one IPv4 and one IPv6"):
        parse_cluster_cidrs(["198.18.0.0/16", "198.19.0.0/16"])
    with pytest.raises(BadValueError, match="one CIDR or a dual-stack pair"):
        parse_cluster_cidrs(["198.18.0.0/16", "fd00::/64", "fd01::/64"])
    with pytest.raises(BadValueError, match=re.escape('"198.18.0.0/33"')):
        parse_cluster_cidrs(["198.18.0.0/33"])


def test_nodeport_addresses_are_cidrs_or_primary_alone() -> None:
    cidrs = ("198.18.0.0/24", "fd00::/64")
    assert parse_nodeport_addresses(list(cidrs)) == cidrs
    assert parse_nodeport_addresses(["primary"]) == ("primary",)
    with pytest.raises(BadValueError, match="primary"):
        parse_nodeport_addresses(["primary", "198.18.0.0/24"])
    with pytest.raises(BadValueError, match=re.escape('"198.18.0.1"')):
        parse_nodeport_addresses(["198.18.0.1"])


def test_node_name_prefers_override_then_env_then_hostname() -> None:
    assert resolve_node_name("node-a", {"NODE_NAME": "node-b"}, lambda: "host") == "node-a"
    assert resolve_node_name(None, {"NODE_NAME": " Node-B "}, lambda: "host") == "node-b"
    assert resolve_node_name(None, {}, lambda: "Host.Example ") == "host.example"
    with pytest.raises(ConfigError, match="NODE_NAME is set but empty"):
        resolve_node_name(None, {"NODE_NAME": "  "}, lambda: "host")
    with pytest.raises(ConfigError, match=r"'\$\(node_name\)' \(from NODE_NAME\)"):
        resolve_node_name(None, {"NODE_NAME": "$(NODE_NAME)"}, lambda: "host")
    with pytest.raises(ConfigError, match="--hostname-override"):
        resolve_node_name(None, {}, lambda: "")


def test_sync_period_rules_name_both_sources() -> None:
    check_sync_periods(30, 30, sync_from="a", min_from="b")
    check_sync_periods(30, 0, sync_from="a", min_from="b")
    with pytest.raises(ConfigError, match=r'^--iptables-sync-period: "0s" must be greater than 0$'):
        check_sync_periods(0, 0, sync_from="--iptables-sync-period", min_from="the default")
    with pytest.raises(ConfigError) as err:
        check_sync_periods(30, 60, sync_from="the default", min_from="f: iptables.minSyncPeriod")
    assert str(err.value) == (
        'f: iptables.minSyncPeriod: "1m0s" must not be greater than the sync period '
        "(30s from the default)"
    )
    with pytest.raises(ConfigError, match="must not be negative"):
        check_sync_periods(30, -1, sync_from="a", min_from="b")


def test_settings_defaults_are_kube_proxys() -> None:
    settings = Settings()
    assert settings.proxy_mode == "iptables"
    assert settings.metrics_bind_address == "127.0.0.1:10249"
    assert settings.healthz_bind_address == "0.0.0.0:10256"
    assert (settings.sync_period, settings.min_sync_period) == (30.0, 1.0)
    assert settings.masquerade_bit == 14
    assert settings.unsupported_flags == ()


# -- the config file ---------------------------------------------------------------------


def test_upstream_default_document_sets_defaults_and_reports_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        config = load_config_file(write(tmp_path, UPSTREAM_DEFAULTS))
    assert caplog.records == []
    assert config.unknown_fields == ()
    assert config.unsupported_fields == ()
    assert config.proxy_mode == "iptables"
    assert config.kubeconfig is None  # "" means in-cluster
    assert config.hostname_override is None
    assert config.metrics_bind_address == "127.0.0.1:10249"
    assert config.healthz_bind_address == "0.0.0.0:10256"
    assert (config.sync_period, config.min_sync_period) == (30.0, 1.0)
    assert (config.masquerade_all, config.masquerade_bit) == (False, 14)
    assert config.cluster_cidrs is None
    assert config.fields["sync_period"] == "iptables.syncPeriod"


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
"""
    config = load_config_file(write(tmp_path, text))
    assert config == FileConfig(
        path=str(tmp_path / "config.yaml"),
        kubeconfig="/var/lib/kube-proxy/kubeconfig.conf",
        hostname_override="node-a",
        proxy_mode="nftables",
        cluster_cidrs=("198.18.0.0/16", "fd00:1::/64"),
        masquerade_all=True,
        nodeport_addresses=("primary",),
        metrics_bind_address="0.0.0.0:10249",
        healthz_bind_address="[::]:9999",
        sync_period=60.0,
        min_sync_period=0.5,
        masquerade_bit=5,
        verbosity=3,
        fields=config.fields,
    )
    assert config.fields["masquerade_bit"] == "nftables.masqueradeBit"


def test_json_files_work(tmp_path: Path) -> None:
    text = json.dumps(doc(mode="ipvs", ipvs={"syncPeriod": "10s", "minSyncPeriod": "2s"}))
    config = load_config_file(write(tmp_path, text, "config.json"))
    assert (config.proxy_mode, config.sync_period, config.min_sync_period) == ("ipvs", 10.0, 2.0)


def test_mode_picks_the_section_and_top_level_periods_win() -> None:
    periods = {"syncPeriod": "10s", "minSyncPeriod": "2s"}
    iptables = parse_config_document(doc(ipvs=periods, iptables={"syncPeriod": "20s"}))
    assert (iptables.sync_period, iptables.min_sync_period) == (20.0, None)
    ipvs = parse_config_document(doc(mode="ipvs", ipvs=periods, iptables={"syncPeriod": "20s"}))
    assert (ipvs.sync_period, ipvs.min_sync_period) == (10.0, 2.0)
    top = parse_config_document(doc(iptables={"syncPeriod": "20s"}, syncPeriod="45s"))
    assert (top.sync_period, top.fields["sync_period"]) == (45.0, "syncPeriod")
    zero = parse_config_document(doc(iptables={"syncPeriod": "20s"}, syncPeriod="0s"))
    assert zero.sync_period == 20.0  # zero means "default", as upstream's defaulting


def test_masquerade_bit_comes_from_iptables_except_in_nftables_mode() -> None:
    sections = {"iptables": {"masqueradeBit": 12}, "nftables": {"masqueradeBit": 3}}
    assert parse_config_document(doc(**sections)).masquerade_bit == 12
    assert parse_config_document(doc(mode="ipvs", **sections)).masquerade_bit == 12
    assert parse_config_document(doc(mode="nftables", **sections)).masquerade_bit == 3


def test_unknown_fields_are_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = json.dumps(doc(mode="iptables", colour="blue", iptables={"syncPeriod": "5s", "x": 1}))
    with caplog.at_level(logging.WARNING):
        config = load_config_file(write(tmp_path, text))
    assert config.unknown_fields == ("colour", "iptables.x")
    assert config.sync_period == 5.0
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
        )
    )
    assert config.unsupported_fields == ("featureGates", "ipvs.strictARP", "conntrack.maxPerCore")


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
    ],
)  # fmt: skip
def test_bad_values_name_the_field_and_the_value(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config_document(doc(**fields), path="/etc/kp.yaml")
    assert str(err.value).startswith(f"/etc/kp.yaml: {message}")


def test_null_means_not_set() -> None:
    config = parse_config_document(doc(mode=None, iptables=None, clusterCIDR=None))
    assert (config.proxy_mode, config.sync_period, config.cluster_cidrs) == (None, None, None)


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
