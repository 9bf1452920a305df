"""kube-proxy's command line: Go flag syntax, precedence over the config file, messages."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from proxy import __version__
from proxy.backends.base import IpvsOptions
from proxy.cli import FLAGS, Flag, help_text, parse_settings
from proxy.config.errors import ConfigError
from proxy.config.settings import ConntrackSettings, Settings

API = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}

# Every flag of cmd/kube-proxy/app/options.go (AddFlags) and of the logs API on Linux, with
# whether it takes a value. A manifest written for kube-proxy must never fail on one.
UPSTREAM_FLAGS = {
    "config": True, "write-config-to": True, "cleanup": False, "feature-gates": True,
    "kubeconfig": True, "master": True, "kube-api-content-type": True, "kube-api-burst": True,
    "kube-api-qps": True, "hostname-override": True, "bind-address": True,
    "healthz-bind-address": True, "metrics-bind-address": True, "bind-address-hard-fail": False,
    "profiling": False, "show-hidden-metrics-for-version": True, "init-only": False,
    "proxy-mode": True, "iptables-masquerade-bit": True, "masquerade-all": False,
    "iptables-localhost-nodeports": False, "iptables-sync-period": True,
    "iptables-min-sync-period": True, "ipvs-sync-period": True, "ipvs-min-sync-period": True,
    "ipvs-scheduler": True, "ipvs-exclude-cidrs": True, "ipvs-strict-arp": False,
    "ipvs-tcp-timeout": True, "ipvs-tcpfin-timeout": True, "ipvs-udp-timeout": True,
    "detect-local-mode": True, "pod-bridge-interface": True, "pod-interface-name-prefix": True,
    "cluster-cidr": True, "nodeport-addresses": True, "oom-score-adj": True,
    "conntrack-max-per-core": True, "conntrack-min": True,
    "conntrack-tcp-timeout-established": True, "conntrack-tcp-timeout-close-wait": True,
    "conntrack-tcp-be-liberal": False, "conntrack-udp-timeout": True,
    "conntrack-udp-timeout-stream": True, "config-sync-period": True, "healthz-port": True,
    "metrics-port": True, "v": True, "vmodule": True, "logging-format": True,
    "log-flush-frequency": True, "log-json-info-buffer-size": True,
    "log-json-split-stream": False, "log-text-info-buffer-size": True,
    "log-text-split-stream": False, "version": False, "help": False,
}  # fmt: skip


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    return parse_settings(argv, {"NODE_NAME": "node-1"} if environ is None else environ)


def config_file(tmp_path: Path, **fields: object) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(API | fields))
    return str(path)


def error_of(argv: Sequence[str]) -> str:
    with pytest.raises(ConfigError) as err:
        parse(argv)
    return str(err.value)


# -- defaults and Go syntax --------------------------------------------------------------


def test_no_flags_gives_kube_proxys_defaults() -> None:
    assert parse([]) == Settings(node_name="node-1")


@pytest.mark.parametrize(
    "argv",
    [
        ["--kubeconfig=/k", "--proxy-mode=nftables", "--iptables-sync-period=1m"],
        ["--kubeconfig", "/k", "--proxy-mode", "nftables", "--iptables-sync-period", "1m"],
    ],
)
def test_equals_and_space_forms_are_the_same(argv: list[str]) -> None:
    settings = parse(argv)
    assert (settings.kubeconfig, settings.proxy_mode, settings.sync_period) == (
        "/k",
        "nftables",
        60.0,
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--masquerade-all"], True),
        (["--masquerade-all=true"], True),
        (["--masquerade-all=1"], True),
        (["--masquerade-all=True"], True),
        (["--masquerade-all=false"], False),
        (["--masquerade-all", "--masquerade-all=F"], False),
        ([], False),
    ],
)
def test_booleans(argv: list[str], expected: bool) -> None:
    assert parse(argv).masquerade_all is expected


def test_a_bare_word_after_a_boolean_is_a_positional_argument_as_in_go() -> None:
    assert "does not take positional arguments, got ['false']" in error_of(
        ["--masquerade-all", "false"]
    )
    assert "positional" in error_of(["--", "x"])
    assert parse(["--", ""]).node_name == "node-1"  # cobra ignores empty arguments


def test_values_may_start_with_a_dash_as_in_pflag() -> None:
    assert parse(["--kubeconfig", "-kc"]).kubeconfig == "-kc"
    assert parse(["--master", "--cleanup"]).master == "--cleanup"
    assert parse(["--master", "--cleanup"]).cleanup is False


def test_invalid_node_names_are_refused_naming_their_source() -> None:
    with pytest.raises(ConfigError, match=r"'-node' \(from --hostname-override\)"):
        parse(["--hostname-override", "-node"])


@pytest.mark.parametrize("argv", [["-v4"], ["-v", "4"], ["-v=4"], ["--v=4"], ["--v", "4"]])
def test_verbosity_spellings(argv: list[str]) -> None:
    assert parse(argv).verbosity == 4


def test_unknown_flags_are_errors() -> None:
    assert error_of(["--foo"]) == "unknown flag: --foo"
    assert error_of(["--foo=bar"]) == "unknown flag: --foo"
    assert error_of(["--kube"]) == "unknown flag: --kube"  # no prefix matching
    assert error_of(["-x"]) == "unknown shorthand flag: 'x' in -x"
    assert error_of(["-kubeconfig=/k"]) == "unknown shorthand flag: 'k' in -kubeconfig=/k"
    assert error_of(["---v=1"]) == "bad flag syntax: ---v=1"


def test_a_missing_value_is_an_error() -> None:
    assert error_of(["--kubeconfig"]) == "flag needs an argument: --kubeconfig"
    assert error_of(["-v"]) == "flag needs an argument: -v"


# -- every kube-proxy flag is accepted ---------------------------------------------------


def test_every_upstream_flag_is_known_with_the_right_arity() -> None:
    ours = {flag.name: flag.takes_value for flag in FLAGS}
    for name, takes_value in UPSTREAM_FLAGS.items():
        assert name in ours, name
        assert ours[name] is takes_value, name


@pytest.mark.parametrize("flag", [f for f in FLAGS if not f.supported], ids=lambda f: f.name)
def test_unsupported_flags_are_accepted_and_collected(flag: Flag) -> None:
    name, takes_value = flag.name, flag.takes_value
    spaced = [f"--{name}", "x"] if takes_value else [f"--{name}"]
    settings = parse([*spaced, "--masquerade-all"])
    assert settings.unsupported_flags == (f"--{name}",)
    assert settings.masquerade_all is True
    equals = f"--{name}=x" if takes_value else f"--{name}=false"
    assert parse([equals]).unsupported_flags == (f"--{name}",)


def test_unsupported_flags_are_all_named_once() -> None:
    settings = parse(
        [
            "--kube-api-qps=10",
            "--profiling",
            "--feature-gates",
            "A=true,B=false",
            "--kube-api-qps=20",
            "--oom-score-adj",
            "-999",
            "--detect-local-mode=ClusterCIDR",
            "--bind-address-hard-fail",
        ]
    )
    assert sorted(settings.unsupported_flags) == [
        "--feature-gates",
        "--kube-api-qps",
        "--oom-score-adj",
        "--profiling",
    ]


IMPLEMENTED_NOW = [
    "ipvs-scheduler", "ipvs-exclude-cidrs", "ipvs-strict-arp", "ipvs-tcp-timeout",
    "ipvs-tcpfin-timeout", "ipvs-udp-timeout", "conntrack-max-per-core", "conntrack-min",
    "conntrack-tcp-timeout-established", "conntrack-tcp-timeout-close-wait",
    "conntrack-tcp-be-liberal", "conntrack-udp-timeout", "conntrack-udp-timeout-stream",
    "write-config-to", "init-only",
]  # fmt: skip


@pytest.mark.parametrize("name", IMPLEMENTED_NOW)
def test_ipvs_conntrack_and_exit_flags_are_implemented(name: str) -> None:
    flag = next(f for f in FLAGS if f.name == name)
    assert flag.supported
    argv = [f"--{name}=0s" if "timeout" in name else f"--{name}"]
    if name in ("ipvs-scheduler", "ipvs-exclude-cidrs", "write-config-to"):
        argv = [f"--{name}="]
    elif name in ("conntrack-max-per-core", "conntrack-min"):
        argv = [f"--{name}=0"]
    assert parse(argv).unsupported_flags == ()
    ignored_help = help_text().split("accepted but not implemented")[1]
    assert f"--{name} " not in ignored_help


def test_detect_local_mode_other_than_cluster_cidr_is_unsupported() -> None:
    assert parse(["--detect-local-mode=ClusterCIDR"]).unsupported_flags == ()
    settings = parse(["--detect-local-mode=InterfaceNamePrefix"])
    assert settings.unsupported_flags == ("--detect-local-mode",)


def test_a_bad_boolean_is_an_error_even_for_an_ignored_flag() -> None:
    assert error_of(["--profiling=maybe"]).startswith('--profiling: "maybe" is not a boolean')


# -- values and their messages -----------------------------------------------------------


def test_every_supported_flag_lands_in_settings() -> None:
    settings = parse(
        [
            "--kubeconfig=/etc/kubeconfig",
            "--master=https://198.18.0.1:6443",
            "--hostname-override= Node-A ",
            "--proxy-mode=ipvs",
            "--cluster-cidr=198.18.0.0/16,fd00::/64",
            "--metrics-bind-address=0.0.0.0",
            "--healthz-bind-address=[::]:9999",
            "--ipvs-sync-period=1h2m3.5s",
            "--ipvs-min-sync-period=500ms",
            "--iptables-masquerade-bit=3",
            "--masquerade-all",
            "--nodeport-addresses=198.18.0.0/24",
            "--nodeport-addresses=fd00::/64",
            "--cleanup",
            "-v=2",
        ]
    )
    assert settings == Settings(
        kubeconfig="/etc/kubeconfig",
        master="https://198.18.0.1:6443",
        hostname_override="node-a",
        node_name="node-a",
        proxy_mode="ipvs",
        cluster_cidrs=("198.18.0.0/16", "fd00::/64"),
        masquerade_all=True,
        nodeport_addresses=("198.18.0.0/24", "fd00::/64"),
        metrics_bind_address="0.0.0.0:10249",
        healthz_bind_address="[::]:9999",
        sync_period=3723.5,
        min_sync_period=0.5,
        masquerade_bit=3,
        verbosity=2,
        cleanup=True,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--iptables-sync-period=3x"], '--iptables-sync-period: "3x" is not a duration'),
        (["--iptables-sync-period=30"], '--iptables-sync-period: "30" is not a duration'),
        (["--iptables-min-sync-period", "1 s"],
         '--iptables-min-sync-period: "1 s" is not a duration'),
        (["--iptables-masquerade-bit=32"],
         '--iptables-masquerade-bit: "32" must be within the range [0, 31]'),
        (["--iptables-masquerade-bit=x"], '--iptables-masquerade-bit: "x" is not an integer'),
        (["--cluster-cidr=198.18.0.0/33"], '--cluster-cidr: "198.18.0.0/33" holds'),
        (["--nodeport-addresses=primary,198.18.0.0/24"],
         '--nodeport-addresses: "primary,198.18.0.0/24" can not mix'),
        (["--proxy-mode=userspace"], '--proxy-mode: "userspace" is not a proxy mode'),
        (["--proxy-mode=kernelspace"], '--proxy-mode: "kernelspace" is not a proxy mode'),
        (["--metrics-bind-address=localhost:10249"],
         '--metrics-bind-address: "localhost:10249" is not IP or IP:port'),
        (["--healthz-bind-address=0.0.0.0:70000"],
         '--healthz-bind-address: "0.0.0.0:70000" is not IP or IP:port'),
        (["--healthz-port=-1"], '--healthz-port: "-1" must be within the range [0, 65535]'),
        (["--v=-1"], '--v: "-1" must be within the range [0, 2147483647]'),
        (["-v", "high"], '--v: "high" is not an integer'),
        (["--masquerade-all=yes"], '--masquerade-all: "yes" is not a boolean'),
        (["--cleanup=2"], '--cleanup: "2" is not a boolean'),
        (["--hostname-override=  "], '--hostname-override: "  " is empty'),
        (["--iptables-sync-period=0s"], '--iptables-sync-period: "0s" must be greater than 0'),
        (["--iptables-min-sync-period=-1s"],
         '--iptables-min-sync-period: "-1s" must not be negative'),
        (["--iptables-min-sync-period=1m"],
         '--iptables-min-sync-period: "1m0s" must not be greater than the sync period '
         "(30s from the default)"),
    ],
)  # fmt: skip
def test_bad_values_name_the_flag_and_the_value(argv: list[str], message: str) -> None:
    assert error_of(argv).startswith(message)


def test_ipvs_mode_uses_the_ipvs_periods_and_ignores_the_iptables_ones() -> None:
    argv = ["--iptables-sync-period=10s", "--ipvs-sync-period=20s", "--ipvs-min-sync-period=2s"]
    iptables = parse(argv)
    assert (iptables.sync_period, iptables.min_sync_period) == (10.0, 1.0)
    ipvs = parse([*argv, "--proxy-mode=ipvs"])
    assert (ipvs.sync_period, ipvs.min_sync_period) == (20.0, 2.0)


def test_empty_proxy_mode_means_iptables() -> None:
    assert parse(["--proxy-mode="]).proxy_mode == "iptables"


def test_bind_addresses_and_the_deprecated_port_flags() -> None:
    assert parse(["--metrics-bind-address="]).metrics_bind_address == ""  # disabled
    assert parse(["--healthz-port=0"]).healthz_bind_address == ""  # disabled
    assert parse(["--metrics-port=0"]).metrics_bind_address == ""
    settings = parse(["--metrics-bind-address=198.18.0.1", "--metrics-port=9000"])
    assert settings.metrics_bind_address == "198.18.0.1:9000"  # bare IP takes the port flag
    # Upstream only appends to a bare IP; the defaults carry a port, so this changes nothing.
    assert parse(["--healthz-port=9000"]).healthz_bind_address == "0.0.0.0:10256"
    settings = parse(["--healthz-bind-address=198.18.0.1:8000", "--healthz-port=9000"])
    assert settings.healthz_bind_address == "198.18.0.1:8000"


def test_node_name_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "Worker-7.Example")
    assert parse([], {}).node_name == "worker-7.example"
    assert parse([], {"NODE_NAME": "Node-B"}).node_name == "node-b"
    assert parse(["--hostname-override=Node-C"], {"NODE_NAME": "node-b"}).node_name == "node-c"
    assert parse(["--hostname-override="], {"NODE_NAME": "node-b"}).node_name == "node-b"


# -- ipvs and conntrack -------------------------------------------------------------------


def test_ipvs_and_conntrack_flags_land_in_settings() -> None:
    settings = parse(
        [
            "--proxy-mode=ipvs",
            "--ipvs-scheduler=wrr",
            "--ipvs-exclude-cidrs=198.18.0.1/15",
            "--ipvs-exclude-cidrs= fd00::0001/64 ,",
            "--ipvs-strict-arp",
            "--ipvs-tcp-timeout=15m",
            "--ipvs-tcpfin-timeout=30s",
            "--ipvs-udp-timeout=5m",
            "--conntrack-max-per-core=0",
            "--conntrack-min=65536",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=30m",
            "--conntrack-tcp-be-liberal",
            "--conntrack-udp-timeout=45s",
            "--conntrack-udp-timeout-stream=2m",
        ]
    )
    assert settings.ipvs == IpvsOptions(
        scheduler="wrr",
        exclude_cidrs=("198.18.0.0/15", "fd00::/64"),  # appended over repeats, normalised
        strict_arp=True,
        tcp_timeout=900.0,
        tcp_fin_timeout=30.0,
        udp_timeout=300.0,
    )
    assert settings.conntrack == ConntrackSettings(
        max_per_core=0,
        min=65536,
        tcp_established_timeout=0.0,
        tcp_close_wait_timeout=1800.0,
        tcp_be_liberal=True,
        udp_timeout=45.0,
        udp_stream_timeout=120.0,
    )
    assert settings.unsupported_flags == ()


def test_an_empty_ipvs_scheduler_means_round_robin() -> None:
    assert parse(["--ipvs-scheduler="]).ipvs.scheduler == "rr"
    assert parse(["--ipvs-scheduler=sh", "--ipvs-scheduler="]).ipvs.scheduler == "rr"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--conntrack-max-per-core=-1"],
         '--conntrack-max-per-core: "-1" must be greater than or equal to 0'),
        (["--conntrack-min=lots"], '--conntrack-min: "lots" is not an integer'),
        (["--conntrack-min=2147483648"],
         '--conntrack-min: "2147483648" must be within the range [-2147483648, 2147483647]'),
        (["--conntrack-tcp-timeout-established=-1h"],
         '--conntrack-tcp-timeout-established: "-1h" must be greater than or equal to 0'),
        (["--conntrack-tcp-timeout-close-wait=1"],
         '--conntrack-tcp-timeout-close-wait: "1" is not a duration'),
        (["--conntrack-udp-timeout=-1s"],
         '--conntrack-udp-timeout: "-1s" must be greater than or equal to 0'),
        (["--conntrack-udp-timeout-stream=x"], '--conntrack-udp-timeout-stream: "x" is not a dur'),
        (["--conntrack-tcp-be-liberal=maybe"],
         '--conntrack-tcp-be-liberal: "maybe" is not a boolean'),
        (["--ipvs-strict-arp=2"], '--ipvs-strict-arp: "2" is not a boolean'),
        (["--ipvs-tcp-timeout=15"], '--ipvs-tcp-timeout: "15" is not a duration'),
        (["--proxy-mode=ipvs", "--ipvs-tcp-timeout=-1s"],
         '--ipvs-tcp-timeout: "-1s" must be greater than or equal to 0'),
        (["--proxy-mode=ipvs", "--ipvs-tcpfin-timeout=-2s"],
         '--ipvs-tcpfin-timeout: "-2s" must be greater than or equal to 0'),
        (["--proxy-mode=ipvs", "--ipvs-udp-timeout=-1m"],
         '--ipvs-udp-timeout: "-1m0s" must be greater than or equal to 0'),
        (["--proxy-mode=ipvs", "--ipvs-exclude-cidrs=198.18.0.0/15,198.18.0.1"],
         '--ipvs-exclude-cidrs: "198.18.0.1" is not a valid CIDR'),
    ],
)  # fmt: skip
def test_bad_ipvs_and_conntrack_values_name_the_flag(argv: list[str], message: str) -> None:
    assert error_of(argv).startswith(message)


def test_ipvs_values_are_checked_in_ipvs_mode_only_as_upstream(tmp_path: Path) -> None:
    argv = ["--ipvs-tcp-timeout=-1s", "--ipvs-exclude-cidrs=bogus"]
    carried = parse(argv)  # iptables mode: upstream neither checks nor uses ipvs.*
    assert (carried.ipvs.tcp_timeout, carried.ipvs.exclude_cidrs) == (-1.0, ("bogus",))
    assert "--ipvs-tcp-timeout" in error_of([*argv, "--proxy-mode=ipvs"])
    # The mode from a flag, the bad value from the file: the message names the file's field.
    path = config_file(tmp_path, ipvs={"excludeCIDRs": ["198.18.0.0/15", "bogus"]})
    assert parse([f"--config={path}"]).ipvs.exclude_cidrs == ("198.18.0.0/15", "bogus")
    assert error_of([f"--config={path}", "--proxy-mode=ipvs"]) == (
        f'{path}: ipvs.excludeCIDRs: "bogus" is not a valid CIDR'
    )


def test_ipvs_and_conntrack_merge_field_by_field_over_the_file(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        mode="ipvs",
        ipvs={"scheduler": "lc", "tcpTimeout": "10m"},
        conntrack={"min": 1000, "tcpBeLiberal": True},
    )
    settings = parse([f"--config={path}", "--ipvs-tcp-timeout=20m", "--conntrack-min=2000"])
    assert settings.ipvs == IpvsOptions(scheduler="lc", tcp_timeout=1200.0)
    assert settings.conntrack == ConntrackSettings(min=2000, tcp_be_liberal=True)
    assert settings.overridden_by_flags == ("--ipvs-tcp-timeout", "--conntrack-min")


def test_write_config_to_and_init_only_land_in_settings() -> None:
    assert parse(["--write-config-to=/tmp/kp.yaml"]).write_config_to == "/tmp/kp.yaml"
    assert parse(["--write-config-to="]).write_config_to is None  # upstream: empty means unset
    assert parse(["--init-only"]).init_only is True
    assert parse(["--init-only=false"]).init_only is False


# -- the config file and precedence ------------------------------------------------------


def test_precedence_defaults_then_file_then_flags(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        mode="nftables",
        clusterCIDR="198.18.0.0/16",
        nftables={"syncPeriod": "1m", "masqueradeAll": True},
        metricsBindAddress="0.0.0.0:9100",
        hostnameOverride="from-file",
    )
    from_file = parse([f"--config={path}"])
    assert from_file.config_file == path
    assert (from_file.proxy_mode, from_file.cluster_cidrs) == ("nftables", ("198.18.0.0/16",))
    assert (from_file.sync_period, from_file.min_sync_period) == (60.0, 1.0)  # min: default
    assert (from_file.masquerade_all, from_file.metrics_bind_address) == (True, "0.0.0.0:9100")
    assert from_file.node_name == "from-file"
    assert from_file.overridden_by_flags == ()

    flags = parse(
        [
            "--config",
            path,
            "--proxy-mode=iptables",
            "--iptables-sync-period=2m",
            "--masquerade-all=false",
            "--hostname-override=from-flag",
        ]
    )
    assert (flags.proxy_mode, flags.sync_period, flags.masquerade_all) == ("iptables", 120.0, False)
    assert flags.cluster_cidrs == ("198.18.0.0/16",)  # not given as a flag: the file's
    assert flags.node_name == "from-flag"
    assert flags.overridden_by_flags == (
        "--proxy-mode",
        "--masquerade-all",
        "--hostname-override",
        "--iptables-sync-period",
    )


def test_cross_checks_name_where_each_value_came_from(tmp_path: Path) -> None:
    path = config_file(tmp_path, iptables={"syncPeriod": "10s"})
    message = error_of([f"--config={path}", "--iptables-min-sync-period=20s"])
    assert message == (
        '--iptables-min-sync-period: "20s" must not be greater than the sync period '
        f"(10s from {path}: iptables.syncPeriod)"
    )


def test_config_file_errors_name_the_file_and_field(tmp_path: Path) -> None:
    path = config_file(tmp_path, iptables={"syncPeriod": "3x"})
    assert error_of([f"--config={path}"]).startswith(
        f'{path}: iptables.syncPeriod: "3x" is not a duration'
    )
    assert "cannot read the config file" in error_of([f"--config={tmp_path / 'nope.yaml'}"])


def test_unsupported_config_fields_join_the_unsupported_flags(tmp_path: Path) -> None:
    path = config_file(tmp_path, oomScoreAdj=0, conntrack={"maxPerCore": 0})
    settings = parse([f"--config={path}", "--profiling"])
    assert settings.unsupported_flags == ("--profiling", "oomScoreAdj")


# -- help and version --------------------------------------------------------------------


def test_help_prints_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["-h"], ["--kubeconfig=/k", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "--iptables-sync-period" in out
        assert "--conntrack-min" in out
    assert "accepted but not implemented" in help_text()


def test_version_prints_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--version"], ["--version=raw"], ["--version=true"]):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        assert exit_info.value.code == 0
        assert capsys.readouterr().out == f"kube-proxy-py {__version__}\n"
    assert parse(["--version=false"]).node_name == "node-1"
