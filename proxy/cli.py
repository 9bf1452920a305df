"""kube-proxy's command line: its flag names, Go flag syntax, and the merge into `Settings`.

`parse_settings(argv)` accepts what kube-proxy's pflag command line accepts, so a
DaemonSet written for kube-proxy runs unchanged:

- `--flag=value` and `--flag value`; booleans as `--flag` or `--flag=true|false`
  (never `--flag false`: as in Go, a bare word after a boolean is a positional
  argument, and kube-proxy takes none); `-v 4`, `-v=4`, `-v4`; `--` ends the flags.
- Flags we implement are converted and checked; every other kube-proxy flag
  (current ones from `cmd/kube-proxy/app/options.go`, logging flags, and a few
  removed ones still found in old manifests) is accepted, with or without a value
  as it takes one, and named in `Settings.unsupported_flags` so the caller can log
  one warning. An unknown flag is an error: `unknown flag: --foo`.

Precedence: defaults < the `--config` file < flags given on the command line.
Upstream kube-proxy differs here: with `--config` it ignores most flags (all but
`--hostname-override`, `--master`, `--cleanup` and the logging flags). We let an
explicit flag win and list in `Settings.overridden_by_flags` every flag that
replaced a file value, so the caller can warn about the difference.

Other upstream rules kept: `--iptables-(min-)sync-period` set the periods unless
the mode is ipvs, where `--ipvs-(min-)sync-period` do (in nftables mode
`--nftables-(min-)sync-period`, when given, win over the iptables ones); the deprecated
`--healthz-port` / `--metrics-port` give the port of a bare-IP bind address, and 0
disables the server; an empty `--metrics-bind-address` disables metrics; the
`--ipvs-*` values are checked (non-negative timeouts, valid excluded CIDRs) only in
ipvs mode, as upstream's validation, while `--conntrack-*` are checked in every mode.
Settings are merged by name ("sync_period", "ipvs.scheduler", "conntrack.min"), so a
flag replaces one field of a group and the file's other fields stay.

The node name is `--hostname-override`, else the config file's `hostnameOverride`,
else the `NODE_NAME` environment variable, else `socket.gethostname()`: trimmed and
lower-cased in every case.

The flags are read in two steps: a small tokenizer applies Go's syntax (it knows
which flags take a value) and rewrites every flag to the canonical `--name=value`,
then argparse collects the values and renders `--help`. argparse alone would read
`--masquerade-all false` as a value and would mis-handle values starting with a dash.

`--help` and `--version` print to stdout and raise `SystemExit(0)`, as argparse's
own help action does. Everything else is pure; nothing here touches the network.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from proxy import __version__
from proxy.config.addresses import (
    parse_bind_address,
    parse_cluster_cidrs,
    parse_nodeport_addresses,
    split_list,
)
from proxy.config.durations import duration_value
from proxy.config.errors import BadValueError, ConfigError, invalid
from proxy.config.file import FileConfig, load_config_file
from proxy.config.node import normalize_hostname, resolve_node_name
from proxy.config.rules import check_ipvs, check_sync_periods
from proxy.config.settings import (
    DEFAULT_HEALTHZ_BIND_ADDRESS,
    DEFAULT_IPVS_SCHEDULER,
    DEFAULT_METRICS_BIND_ADDRESS,
    HEALTHZ_PORT,
    METRICS_PORT,
    Settings,
    default_value,
    settings_from,
)
from proxy.config.values import (
    check_masquerade_bit,
    check_proxy_mode,
    non_negative,
    parse_bool,
    parse_int,
)

PROGRAM = "kube-proxy-py"


@dataclass(frozen=True, slots=True)
class Flag:
    """One kube-proxy flag: its name, whether it takes a value, and whether we implement it."""

    name: str
    help: str
    takes_value: bool = True
    supported: bool = True
    shorthand: str | None = None
    metavar: str = "string"


def _value(name: str, help: str, metavar: str = "string", *, shorthand: str | None = None) -> Flag:
    return Flag(name, help, takes_value=True, shorthand=shorthand, metavar=metavar)


def _switch(name: str, help: str, *, shorthand: str | None = None) -> Flag:
    return Flag(name, help, takes_value=False, shorthand=shorthand, metavar="")


def _ignored(name: str) -> Flag:
    return Flag(name, "", supported=False, metavar="value")


def _ignored_switch(name: str) -> Flag:
    return Flag(name, "", takes_value=False, supported=False, metavar="")


FLAGS: tuple[Flag, ...] = (
    _value("config", "The path to the configuration file (KubeProxyConfiguration).", "path"),
    _switch("cleanup", "Remove every rule this proxy owns, then exit."),
    _value("kubeconfig", "Path to a kubeconfig file (in-cluster configuration if unset).", "path"),
    _value("master", "The address of the Kubernetes API server (overrides the kubeconfig)."),
    _value("hostname-override", "The name of this Node (default: $NODE_NAME, else the hostname)."),
    _value("proxy-mode", "Which proxy mode to use: iptables (default), nftables or ipvs.", "mode"),
    _value("cluster-cidr", "The pod CIDR range (or a comma-separated dual-stack pair).", "cidrs"),
    _value(
        "metrics-bind-address",
        f"IP or IP:port of the metrics server (default {DEFAULT_METRICS_BIND_ADDRESS}); "
        "empty disables it.",
        "ipport",
    ),
    _value(
        "healthz-bind-address",
        f"IP or IP:port of the health server (default {DEFAULT_HEALTHZ_BIND_ADDRESS}).",
        "ipport",
    ),
    _value(
        "healthz-port", "Deprecated: port for a bare-IP --healthz-bind-address; 0 disables.", "int"
    ),
    _value(
        "metrics-port", "Deprecated: port for a bare-IP --metrics-bind-address; 0 disables.", "int"
    ),
    _value(
        "iptables-sync-period", "How often rules are fully resynced (e.g. 30s, 1m).", "duration"
    ),
    _value("iptables-min-sync-period", "The minimum time between two syncs (e.g. 1s).", "duration"),
    _value("ipvs-sync-period", "As --iptables-sync-period, in ipvs mode.", "duration"),
    _value(
        "nftables-sync-period",
        "As --iptables-sync-period, in nftables mode (wins over it there).",
        "duration",
    ),
    _value(
        "nftables-min-sync-period",
        "As --iptables-min-sync-period, in nftables mode (wins over it there).",
        "duration",
    ),
    _value("ipvs-min-sync-period", "As --iptables-min-sync-period, in ipvs mode.", "duration"),
    _value("iptables-masquerade-bit", "The fwmark bit (0..31) marking packets to SNAT.", "int"),
    _switch("masquerade-all", "SNAT all traffic sent via Service cluster IPs."),
    _switch(
        "iptables-localhost-nodeports",
        "NodePorts also answer on 127.0.0.1 (iptables mode, IPv4; default true).",
    ),
    _value(
        "nodeport-addresses",
        "CIDRs of node IPs where NodePorts are open, or 'primary' (default: all local IPs).",
        "strings",
    ),
    _value(
        "detect-local-mode",
        "How to detect local traffic: only ClusterCIDR (the default) is implemented.",
        "mode",
    ),
    _switch("bind-address-hard-fail", "Accepted; failing to bind a port is always fatal here."),
    _value(
        "ipvs-scheduler", "The IPVS scheduler in ipvs mode (rr, wrr, lc, ...; empty: rr).", "name"
    ),
    _value(
        "ipvs-exclude-cidrs",
        "CIDRs whose IPVS virtual servers the ipvs proxy never removes (comma-separated).",
        "cidrs",
    ),
    _switch("ipvs-strict-arp", "Set arp_ignore=1 and arp_announce=2 (ipvs mode, --init-only)."),
    _value("ipvs-tcp-timeout", "Idle timeout of IPVS TCP connections; 0 leaves it.", "duration"),
    _value(
        "ipvs-tcpfin-timeout",
        "Timeout of IPVS TCP connections after a FIN; 0 leaves it.",
        "duration",
    ),
    _value("ipvs-udp-timeout", "Timeout of IPVS UDP flows; 0 leaves it.", "duration"),
    _value(
        "conntrack-max-per-core",
        "Conntrack entries per CPU (default 32768); 0 leaves the limit and --conntrack-min alone.",
        "int",
    ),
    _value("conntrack-min", "The least conntrack table size (default 131072).", "int"),
    _value(
        "conntrack-tcp-timeout-established",
        "Idle timeout of established TCP conntrack entries (default 24h0m0s; 0 leaves it).",
        "duration",
    ),
    _value(
        "conntrack-tcp-timeout-close-wait",
        "Timeout of TCP conntrack entries in CLOSE_WAIT (default 1h0m0s; 0 leaves it).",
        "duration",
    ),
    _switch("conntrack-tcp-be-liberal", "Set nf_conntrack_tcp_be_liberal to 1."),
    _value(
        "conntrack-udp-timeout", "Idle timeout of UNREPLIED UDP entries; 0 leaves it.", "duration"
    ),
    _value(
        "conntrack-udp-timeout-stream",
        "Idle timeout of ASSURED UDP entries; 0 leaves it.",
        "duration",
    ),
    _value(
        "write-config-to",
        "Write the effective configuration as a KubeProxyConfiguration file here, then exit.",
        "path",
    ),
    _switch(
        "init-only",
        "Set what needs full root privileges (conntrack, and ipvs-mode sysctls), then exit.",
    ),
    _value("v", "Log verbosity (4 and above: debug).", "int", shorthand="v"),
    _switch("version", "Print the version and exit."),
    _switch("help", "Show this help and exit.", shorthand="h"),
    # kube-proxy flags we accept but do not implement (options.go, logs API, removed ones).
    *(
        _ignored(name)
        for name in (
            "bind-address",
            "config-sync-period",
            "feature-gates",
            "kube-api-burst",
            "kube-api-content-type",
            "kube-api-qps",
            "log-backtrace-at",
            "log-dir",
            "log-file",
            "log-file-max-size",
            "log-flush-frequency",
            "log-json-info-buffer-size",
            "log-text-info-buffer-size",
            "logging-format",
            "oom-score-adj",
            "pod-bridge-interface",
            "pod-interface-name-prefix",
            "proxy-port-range",
            "resource-container",
            "show-hidden-metrics-for-version",
            "stderrthreshold",
            "udp-timeout",
            "vmodule",
        )
    ),
    *(
        _ignored_switch(name)
        for name in (
            "add-dir-header",
            "alsologtostderr",
            "cleanup-iptables",
            "cleanup-ipvs",
            "log-json-split-stream",
            "log-text-split-stream",
            "logtostderr",
            "one-output",
            "profiling",
            "skip-headers",
            "skip-log-headers",
            "windows-service",
        )
    ),
)

_BY_NAME: dict[str, Flag] = {flag.name: flag for flag in FLAGS}
_BY_SHORTHAND: dict[str, Flag] = {flag.shorthand: flag for flag in FLAGS if flag.shorthand}
_LOCAL_MODES = ("", "ClusterCIDR")
"""--detect-local-mode values that mean what we implement (upstream's default is ClusterCIDR)."""


# -- step 1: Go flag syntax -> canonical --name=value ------------------------------------


def _tokenize(argv: Sequence[str]) -> list[tuple[Flag, str]]:
    """Apply pflag's syntax: each flag with its value, in command-line order."""
    given: list[tuple[Flag, str]] = []
    positional: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            positional.extend(argv[i:])
            break
        if token.startswith("--"):
            name, has_value, value = token[2:].partition("=")
            if not name or name.startswith("-"):
                raise ConfigError(f"bad flag syntax: {token}")
            flag = _BY_NAME.get(name)
            if flag is None:
                raise ConfigError(f"unknown flag: --{name}")
            shown = f"--{name}"
        elif token.startswith("-") and len(token) > 1:
            letter, rest = token[1], token[2:]
            flag = _BY_SHORTHAND.get(letter)
            if flag is None:
                raise ConfigError(f"unknown shorthand flag: {letter!r} in {token}")
            shown = f"-{letter}"
            has_value = "=" if rest else ""
            value = rest.removeprefix("=")
            if rest and not rest.startswith("=") and not flag.takes_value:
                raise ConfigError(f"unknown shorthand flags in {token}")
        else:
            positional.append(token)
            continue
        if not has_value:
            if flag.takes_value:
                if i >= len(argv):
                    raise ConfigError(f"flag needs an argument: {shown}")
                value = argv[i]
                i += 1
            else:
                value = "true"
        given.append((flag, value))
    positional = [arg for arg in positional if arg]  # cobra ignores empty arguments
    if positional:
        raise ConfigError(f"{PROGRAM} does not take positional arguments, got {positional}")
    return given


# -- step 2: argparse collects the values ------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROGRAM,
        usage=f"{PROGRAM} [flags]",
        description="A kube-proxy replacement: kube-proxy's flags and config file.",
        add_help=False,
        allow_abbrev=False,
    )
    implemented = parser.add_argument_group("flags")
    ignored = parser.add_argument_group(
        "kube-proxy flags accepted but not implemented (ignored, with one warning)"
    )
    for flag in FLAGS:
        names = [f"--{flag.name}"] + ([f"-{flag.shorthand}"] if flag.shorthand else [])
        group = implemented if flag.supported else ignored
        if flag.takes_value:
            group.add_argument(
                *names, dest=flag.name, action="append", metavar=flag.metavar, help=flag.help
            )
        else:  # the tokenizer always passes a value; this only shapes the help text
            group.add_argument(
                *names,
                dest=flag.name,
                action="append",
                nargs="?",
                const="true",
                metavar="true|false",
                help=flag.help,
            )
    return parser


def help_text() -> str:
    """What `--help` prints."""
    return _build_parser().format_help()


def _collect(argv: Sequence[str]) -> dict[str, list[str]]:
    """Flag name -> the values given, in order; only flags that were given."""
    canonical = [f"--{flag.name}={value}" for flag, value in _tokenize(argv)]
    namespace = _build_parser().parse_args(canonical)
    return {name: values for name, values in vars(namespace).items() if values is not None}


# -- step 3: merge into Settings ---------------------------------------------------------


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> Settings:
    """kube-proxy's command line (and the `--config` file it names) -> `Settings`.

    Raises `ConfigError` naming the flag or config field and its value. `--help`
    and `--version` print and raise `SystemExit(0)`.
    """
    return _parse(argv, environ, socket.gethostname)


def _parse(
    argv: Sequence[str], environ: Mapping[str, str], gethostname: Callable[[], str]
) -> Settings:
    given = _collect(argv)
    flags = _FlagValues(given)
    for name in given:
        if not _BY_NAME[name].takes_value and name != "version":
            flags.boolean(name)  # a bad boolean is an error even for a flag we ignore
    if flags.boolean("help"):
        print(help_text(), end="")
        raise SystemExit(0)
    if _wants_version(given.get("version", [])):
        print(f"{PROGRAM} {__version__}")
        raise SystemExit(0)

    config_path = flags.text("config")
    file = load_config_file(config_path) if config_path else FileConfig(path="")
    merged = _Merge(file)

    merged.put("kubeconfig", flags, "kubeconfig", lambda v: v.strip() or None)
    master = flags.text("master")
    merged.put("proxy_mode", flags, "proxy-mode", check_proxy_mode)
    merged.put("cluster_cidrs", flags, "cluster-cidr", lambda v: parse_cluster_cidrs(v.split(",")))
    merged.put("masquerade_all", flags, "masquerade-all", parse_bool)
    merged.put("localhost_nodeports", flags, "iptables-localhost-nodeports", parse_bool)
    merged.put(
        "nodeport_addresses",
        flags,
        "nodeport-addresses",
        lambda v: parse_nodeport_addresses(v.split(",")),
        raw=flags.appended("nodeport-addresses"),
    )
    merged.put(
        "masquerade_bit",
        flags,
        "iptables-masquerade-bit",
        lambda v: check_masquerade_bit(parse_int(v, low=-(2**31), high=2**31 - 1)),
    )
    merged.put("verbosity", flags, "v", lambda v: parse_int(v, low=0, high=2**31 - 1))
    merged.put("hostname_override", flags, "hostname-override", _hostname_flag)
    _bind_address(merged, flags, "metrics", METRICS_PORT)
    _bind_address(merged, flags, "healthz", HEALTHZ_PORT)

    # Upstream: the iptables-* periods apply unless the mode is ipvs, then the ipvs-* ones.
    mode = merged.get("proxy_mode")
    prefix = "ipvs" if mode == "ipvs" else "iptables"
    merged.put("sync_period", flags, f"{prefix}-sync-period", duration_value)
    merged.put("min_sync_period", flags, f"{prefix}-min-sync-period", duration_value)
    if mode == "nftables":
        # Upstream's nftables mode reads the iptables-* flags; ours also take these names.
        merged.put("sync_period", flags, "nftables-sync-period", duration_value)
        merged.put("min_sync_period", flags, "nftables-min-sync-period", duration_value)
    check_sync_periods(
        merged.get("sync_period"),
        merged.get("min_sync_period"),
        sync_from=merged.source("sync_period"),
        min_from=merged.source("min_sync_period"),
    )
    _ipvs_flags(merged, flags)
    _conntrack_flags(merged, flags)
    if mode == "ipvs":
        ipvs = check_ipvs(settings_from(merged.values).ipvs, source=merged.source)
        if ipvs.exclude_cidrs:
            merged.values["ipvs.exclude_cidrs"] = ipvs.exclude_cidrs  # normalised

    unsupported = [f"--{name}" for name in given if not _BY_NAME[name].supported]
    local_mode = flags.text("detect-local-mode")
    if local_mode is not None and local_mode not in _LOCAL_MODES:
        unsupported.append("--detect-local-mode")
    unsupported.extend(file.unsupported_fields)

    hostname_override = merged.get("hostname_override")
    return settings_from(
        {
            **merged.values,
            "master": master or None,
            "node_name": resolve_node_name(hostname_override, environ, gethostname),
            "cleanup": flags.boolean("cleanup"),
            "write_config_to": flags.text("write-config-to") or None,
            "init_only": flags.boolean("init-only"),
            "config_file": config_path or None,
            "unsupported_flags": tuple(unsupported),
            "overridden_by_flags": tuple(merged.overridden),
        }
    )


def _ipvs_flags(merged: _Merge, flags: _FlagValues) -> None:
    """--ipvs-*: read in every mode; checked by `check_ipvs` in ipvs mode only, as upstream."""
    merged.put("ipvs.scheduler", flags, "ipvs-scheduler", lambda v: v or DEFAULT_IPVS_SCHEDULER)
    merged.put(
        "ipvs.exclude_cidrs",
        flags,
        "ipvs-exclude-cidrs",
        lambda v: split_list(v.split(",")),
        raw=flags.appended("ipvs-exclude-cidrs"),
    )
    merged.put("ipvs.strict_arp", flags, "ipvs-strict-arp", parse_bool)
    merged.put("ipvs.tcp_timeout", flags, "ipvs-tcp-timeout", duration_value)
    merged.put("ipvs.tcp_fin_timeout", flags, "ipvs-tcpfin-timeout", duration_value)
    merged.put("ipvs.udp_timeout", flags, "ipvs-udp-timeout", duration_value)


def _conntrack_flags(merged: _Merge, flags: _FlagValues) -> None:
    """--conntrack-*: upstream's int32 flags and durations, none of them negative."""

    def count(value: str) -> int:
        return non_negative(parse_int(value, low=-(2**31), high=2**31 - 1))

    def timeout(value: str) -> float:
        return non_negative(duration_value(value))

    merged.put("conntrack.max_per_core", flags, "conntrack-max-per-core", count)
    merged.put("conntrack.min", flags, "conntrack-min", count)
    merged.put(
        "conntrack.tcp_established_timeout", flags, "conntrack-tcp-timeout-established", timeout
    )
    merged.put(
        "conntrack.tcp_close_wait_timeout", flags, "conntrack-tcp-timeout-close-wait", timeout
    )
    merged.put("conntrack.tcp_be_liberal", flags, "conntrack-tcp-be-liberal", parse_bool)
    merged.put("conntrack.udp_timeout", flags, "conntrack-udp-timeout", timeout)
    merged.put("conntrack.udp_stream_timeout", flags, "conntrack-udp-timeout-stream", timeout)


def _wants_version(values: Sequence[str]) -> bool:
    # --version takes true/false/raw (and newer kube-proxy a version string): all but false print.
    if not values:
        return False
    try:
        return parse_bool(values[-1])
    except BadValueError:
        return True


def _hostname_flag(value: str) -> str | None:
    # Upstream: an empty --hostname-override is ignored, a blank one is an error.
    return normalize_hostname(value) if value else None


def _bind_address(merged: _Merge, flags: _FlagValues, server: str, default_port: int) -> None:
    """--<server>-bind-address with the deprecated --<server>-port, as upstream combines them."""
    address_flag, port_flag = f"{server}-bind-address", f"{server}-port"
    port = default_port
    if flags.given(port_flag):
        port = flags.convert(port_flag, lambda v: parse_int(v, low=0, high=65535))

    def convert(value: str) -> str:
        if not value.strip():
            return ""  # an empty flag disables the server
        return parse_bind_address(value, port or default_port)

    setting = f"{server}_bind_address"
    merged.put(setting, flags, address_flag, convert)
    # Upstream appends the port only to a bare IP (the defaults already carry one), so the
    # port flag alone changes nothing unless it is 0, which disables the server.
    if port == 0:
        merged.force(setting, "", f"--{port_flag}")


class _FlagValues:
    """The flags given, with conversion errors that name the flag and the value."""

    def __init__(self, given: Mapping[str, list[str]]) -> None:
        self._given = given

    def given(self, name: str) -> bool:
        return name in self._given

    def last(self, name: str) -> str | None:
        values = self._given.get(name)
        return values[-1] if values else None

    def appended(self, name: str) -> str:
        """pflag's string-slice flags append over repeats: `--x=a --x=b,c` is a, b, c."""
        return ",".join(self._given.get(name, []))

    def text(self, name: str) -> str | None:
        return self.last(name)

    def boolean(self, name: str) -> bool:
        return self.convert(name, parse_bool) if self.given(name) else False

    def convert(self, name: str, convert: Callable[[str], Any], value: str | None = None) -> Any:
        raw = self.last(name) if value is None else value
        assert raw is not None
        try:
            return convert(raw)
        except BadValueError as err:
            raise invalid(f"--{name}", raw, str(err)) from None


class _Merge:
    """Settings values in precedence order, remembering where each came from."""

    def __init__(self, file: FileConfig) -> None:
        self.values: dict[str, Any] = {}
        self._sources: dict[str, str] = {}
        self.overridden: list[str] = []
        self._from_file: set[str] = set()
        for setting, dotted in file.fields.items():
            self.values[setting] = file.values[setting]
            self._sources[setting] = f"{file.path}: {dotted}"
            self._from_file.add(setting)

    def get(self, setting: str) -> Any:
        """The merged value so far: the flag's, else the file's, else the default."""
        return self.values[setting] if setting in self.values else default_value(setting)

    def source(self, setting: str) -> str:
        return self._sources.get(setting, "the default")

    def put(
        self,
        setting: str,
        flags: _FlagValues,
        flag: str,
        convert: Callable[[str], Any],
        *,
        raw: str | None = None,
    ) -> None:
        if not flags.given(flag):
            return
        value = flags.convert(flag, convert, raw)
        if value is None:
            return  # the flag's "unset" spelling (e.g. an empty --hostname-override)
        self.force(setting, value, f"--{flag}")

    def force(self, setting: str, value: Any, flag: str) -> None:
        if setting in self._from_file:
            self._from_file.discard(setting)
            self.overridden.append(flag)
        self.values[setting] = value
        self._sources[setting] = flag
