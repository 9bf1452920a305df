"""Typed settings: kube-proxy's defaults, its `KubeProxyConfiguration` file, its value rules.

Three layers make the `Settings` the proxy runs with (merged by `proxy.cli`):

    built-in defaults  <  the config file (`--config`)  <  flags given on the command line

This module owns the first two and every rule about a single value: the strict Go
duration parser (`"30s"`, `"1m0s"`, `"1h2m3.5s"`), bind addresses (`IP` or
`IP:port`, a bare IP getting the default port as kube-proxy's defaulting does),
CIDR lists, the NodePort address filter, the masquerade bit and the proxy mode.
Every rule raises `ConfigError` naming where the value came from (a flag, or a
field path inside the file) and the value itself, e.g.
`iptables.syncPeriod: "3x" is not a duration`.

The config file is read the way kube-proxy reads `kubeproxy.config.k8s.io/v1alpha1`:
YAML or JSON, case-sensitive field names, `null` meaning "not set", a wrong type
or value is an error. Unknown fields are not fatal (upstream falls back to lenient
decoding for v1alpha1 and logs it): they are named in one warning. Known fields
this proxy does not implement are reported in `FileConfig.unsupported_fields` when
they hold something other than upstream's default, so the caller can warn once.

As in upstream's v1alpha1 conversion, the proxy mode picks which section supplies
the sync periods and masquerade settings: `ipvs.*` for ipvs, `nftables.*` for
nftables, `iptables.*` otherwise (the masquerade bit comes from `iptables.*` except
in nftables mode). Top-level `syncPeriod` / `minSyncPeriod` (the newer internal
layout) win over the section when present.

Nothing here touches the network or keeps state: it is pure functions and frozen
values, safe to call from any thread. The only side effect is the single
unknown-fields warning logged by `load_config_file`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from proxy.parse import normalize_cidr, normalize_ip

log = logging.getLogger(__name__)

ProxyMode = Literal["iptables", "nftables", "ipvs"]
PROXY_MODES: tuple[ProxyMode, ...] = ("iptables", "nftables", "ipvs")
DEFAULT_PROXY_MODE: ProxyMode = "iptables"
"""What an empty mode means on Linux (upstream: "the best-available proxy, currently iptables")."""

METRICS_PORT = 10249
HEALTHZ_PORT = 10256
DEFAULT_METRICS_BIND_ADDRESS = f"127.0.0.1:{METRICS_PORT}"
DEFAULT_HEALTHZ_BIND_ADDRESS = f"0.0.0.0:{HEALTHZ_PORT}"
DEFAULT_SYNC_PERIOD = 30.0
DEFAULT_MIN_SYNC_PERIOD = 1.0
DEFAULT_MASQUERADE_BIT = 14

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
NODE_NAME_ENV = "NODE_NAME"
NODEPORT_ADDRESSES_PRIMARY = "primary"


class ConfigError(ValueError):
    """A flag, config file or setting is wrong; the message names where and what."""


def invalid(where: str, value: object, problem: str) -> ConfigError:
    """`ConfigError` for one value: `where: "value" problem` (the value quoted as Go's %q)."""
    return ConfigError(f"{where}: {_quote(value)} {problem}")


def _quote(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, default=str)


class BadValueError(ValueError):
    """A value rule failed; `str()` is the problem, the caller adds where and what."""


# -- Go durations ------------------------------------------------------------------------

_NANOS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek small letter mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_MAX_NANOS = (1 << 63) - 1
_DURATION_HINT = 'is not a duration (want e.g. "30s", "1m0s", "500ms")'


def parse_go_duration_ns(text: str) -> int:
    """Go's `time.ParseDuration`, to integer nanoseconds; `ValueError` when it would fail.

    Accepts exactly what Go accepts: an optional sign, then one or more
    `<decimal><unit>` terms with units ns, us (or µs), ms, s, m, h, e.g. "1h2m3.5s",
    ".5s", "-1.5h"; the bare "0" is the only unit-less value. Spaces, empty input,
    unknown units and out-of-range values (beyond about 292 years) are refused.
    """
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    while rest:
        match = _DURATION_TERM.match(rest)
        if match is None:
            raise ValueError(f"invalid duration {text!r}")
        whole, fraction, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not fraction:
            raise ValueError(f"invalid duration {text!r}")
        if unit not in _NANOS:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        scale = _NANOS[unit]
        value = int(whole or "0") * scale
        if fraction:
            # Go keeps the digits that fit in int64 and adds them through a float.
            digits = fraction[:18]
            value += int(int(digits) * (scale / 10 ** len(digits)))
        total += value
        if total > _MAX_NANOS + (1 if negative else 0):
            raise ValueError(f"invalid duration {text!r}")
        rest = rest[match.end() :]
    return -total if negative else total


# One term: digits, an optional fraction, then a unit (anything up to the next digit or dot).
_DURATION_TERM = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]+)")


def parse_go_duration(text: str) -> float:
    """Go's `time.ParseDuration` in seconds (see `parse_go_duration_ns`)."""
    return parse_go_duration_ns(text) / 1e9


def format_go_duration(seconds: float) -> str:
    """Go's `time.Duration.String()`: 30 -> "30s", 60 -> "1m0s", 0.5 -> "500ms", 0 -> "0s"."""
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    u = abs(nanos)
    if u < 1_000_000_000:
        for unit, scale in (("ns", 1), ("\u00b5s", 1_000), ("ms", 1_000_000)):
            if u < scale * 1000:
                return f"{sign}{_fraction(u, scale)}{unit}"
    secs = _fraction(u % 60_000_000_000, 1_000_000_000)
    minutes = u // 60_000_000_000
    if minutes == 0:
        return f"{sign}{secs}s"
    hours, minutes = divmod(minutes, 60)
    head = f"{hours}h" if hours else ""
    return f"{sign}{head}{minutes}m{secs}s"


def _fraction(value: int, scale: int) -> str:
    whole, part = divmod(value, scale)
    if part == 0:
        return str(whole)
    width = len(str(scale)) - 1
    return f"{whole}.{str(part).rjust(width, '0').rstrip('0')}"


def duration_value(text: str) -> float:
    """A Go duration in seconds, or `BadValueError` with a hint of the accepted form."""
    try:
        return parse_go_duration(text)
    except ValueError:
        raise BadValueError(_DURATION_HINT) from None


# -- single-value rules ------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    """Go's `strconv.ParseBool`: 1, t, T, TRUE, true, True and their false spellings."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise BadValueError("is not a boolean (want true or false)")


def parse_int(text: str, *, low: int, high: int) -> int:
    """A decimal integer within [low, high]."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise BadValueError("is not an integer")
    value = int(text)
    if not low <= value <= high:
        raise BadValueError(f"must be within the range [{low}, {high}]")
    return value


def check_masquerade_bit(value: int) -> int:
    """The fwmark bit for masquerading: 0..31 (upstream validation)."""
    if not 0 <= value <= 31:
        raise BadValueError("must be within the range [0, 31]")
    return value


def check_proxy_mode(value: str) -> ProxyMode:
    """`""` means iptables on Linux; otherwise one of iptables, nftables, ipvs (case-sensitive)."""
    if value == "":
        return DEFAULT_PROXY_MODE
    if value in PROXY_MODES:
        return value
    raise BadValueError(
        f"is not a proxy mode (want one of {', '.join(PROXY_MODES)}, or empty for iptables)"
    )


def split_host_port(address: str) -> tuple[str, int]:
    """`"IP:port"` or `"[IPv6]:port"` -> (IP, port); `ValueError` otherwise. Port may be 0."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not IP:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"{address!r} is not IP:port")
    elif ":" in host:
        raise ValueError(f"{address!r} is not IP:port (put an IPv6 address in brackets)")
    ip = _strict_ip(host)
    number = int(port)
    if ip is None or number > 65535:
        raise ValueError(f"{address!r} is not IP:port")
    return ip, number


def join_host_port(ip: str, port: int) -> str:
    """`ip:port`, bracketing IPv6 like Go's `net.JoinHostPort`."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _strict_ip(text: str) -> str | None:
    if "%" in text:  # zones are not accepted by Go's net.ParseIP
        return None
    return normalize_ip(text)


def parse_bind_address(text: str, default_port: int) -> str:
    """`IP` or `IP:port` (IPv6 in brackets with a port) -> canonical `IP:port`.

    A bare IP gets `default_port`, as kube-proxy's `AppendPortIfNeeded` does. The host
    must be an IP address (not a name) and the port 1..65535, as upstream validates.
    IPv4 leading zeros are read as decimal, like Go's `ParseIPSloppy`.
    """
    text = text.strip()
    ip = _strict_ip(text)
    if ip is not None:
        return join_host_port(ip, default_port)
    try:
        host, port = split_host_port(text)
    except ValueError:
        raise BadValueError("is not IP or IP:port") from None
    if port == 0:
        raise BadValueError("must have a port within the range [1, 65535]")
    return join_host_port(host, port)


def parse_cluster_cidrs(values: Sequence[str]) -> tuple[str, ...]:
    """The pod CIDRs: one, or a dual-stack pair (one IPv4, one IPv6); normalised."""
    cidrs = tuple(_cidr(v) for v in values if v.strip())
    if len(cidrs) > 2:
        raise BadValueError(
            "must be one CIDR or a dual-stack pair (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)"
        )
    if len(cidrs) == 2 and _family(cidrs[0]) == _family(cidrs[1]):
        raise BadValueError("must be a dual-stack pair: one IPv4 and one IPv6 CIDR")
    return cidrs


def parse_nodeport_addresses(values: Sequence[str]) -> tuple[str, ...]:
    """CIDRs limiting where NodePorts are open, or the single word "primary"; normalised."""
    items = tuple(v.strip() for v in values if v.strip())
    if NODEPORT_ADDRESSES_PRIMARY in items:
        if len(items) != 1:
            raise BadValueError(f'can not mix "{NODEPORT_ADDRESSES_PRIMARY}" with CIDRs')
        return items
    return tuple(_cidr(v) for v in items)


def _cidr(text: str) -> str:
    cidr = normalize_cidr(text)
    if cidr is None or "%" in text:
        raise BadValueError(f"holds {_quote(text.strip())}, which is not a valid CIDR")
    return cidr


def _family(cidr: str) -> int:
    return ipaddress.ip_network(cidr).version


def normalize_hostname(text: str) -> str:
    """Trimmed and lower-cased, as upstream's `GetHostname`; `BadValueError` when empty."""
    name = text.strip().lower()
    if not name:
        raise BadValueError("is empty")
    return name


def resolve_node_name(
    hostname_override: str | None,
    environ: Mapping[str, str],
    gethostname: Callable[[], str] = socket.gethostname,
) -> str:
    """This node's name: the override, else `$NODE_NAME`, else the host name; lower-cased.

    Upstream uses the override or the host name; `NODE_NAME` (set from
    `spec.nodeName` through the downward API in most DaemonSets) is our addition so
    that a manifest without `--hostname-override` still finds its Node.
    """
    if hostname_override:
        return _valid_node_name(hostname_override, "--hostname-override")
    if NODE_NAME_ENV in environ:
        from_env = environ[NODE_NAME_ENV].strip()
        if not from_env:
            raise ConfigError(
                f"{NODE_NAME_ENV} is set but empty: set it from spec.nodeName "
                "(the downward API) or pass --hostname-override"
            )
        return _valid_node_name(from_env.lower(), NODE_NAME_ENV)
    try:
        return _valid_node_name(normalize_hostname(gethostname()), "the host name")
    except BadValueError:
        raise ConfigError(
            "cannot tell the node name: the host name is empty; "
            "pass --hostname-override or set NODE_NAME"
        ) from None


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _valid_node_name(name: str, source: str) -> str:
    """`name` if it can name a Node (an RFC 1123 subdomain), else a ConfigError naming it."""
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise ConfigError(
            f"node name {name!r} (from {source}) is not a valid Kubernetes node name "
            "(lower-case RFC 1123 subdomain); is NODE_NAME set from spec.nodeName?"
        )
    return name


# -- settings ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the proxy runs with, after defaults, the config file and flags."""

    kubeconfig: str | None = None
    """Path to a kubeconfig; None means in-cluster configuration."""
    master: str | None = None
    """API server URL overriding the kubeconfig's (`--master`)."""
    hostname_override: str | None = None
    """The Node name as given (trimmed, lower-cased); None when not given."""
    node_name: str = ""
    """The Node this proxy serves: `hostname_override`, else `$NODE_NAME`, else the host name."""
    proxy_mode: ProxyMode = DEFAULT_PROXY_MODE
    """Backend to program: "iptables" (also what an empty mode means), "nftables" or "ipvs"."""
    cluster_cidrs: tuple[str, ...] = ()
    """Pod CIDRs (one, or an IPv4 + IPv6 pair); traffic from outside them to a ClusterIP is
    masqueraded. Empty: no such masquerading (only `masquerade_all` or policy-driven)."""
    masquerade_all: bool = False
    """Masquerade all traffic sent to Service ClusterIPs."""
    nodeport_addresses: tuple[str, ...] = ()
    """CIDRs where NodePorts are open, or ("primary",); empty means every local address."""
    metrics_bind_address: str = DEFAULT_METRICS_BIND_ADDRESS
    """`IP:port` of the /metrics server; "" disables it."""
    healthz_bind_address: str = DEFAULT_HEALTHZ_BIND_ADDRESS
    """`IP:port` of the /healthz and /livez server; "" disables it."""
    sync_period: float = DEFAULT_SYNC_PERIOD
    """Seconds between periodic resyncs; health fails after a change waited twice this."""
    min_sync_period: float = DEFAULT_MIN_SYNC_PERIOD
    """Minimum seconds between two syncs (bursts of changes are coalesced)."""
    masquerade_bit: int = DEFAULT_MASQUERADE_BIT
    """Bit of the packet mark (0..31) that asks for masquerading."""
    verbosity: int = 0
    """klog-style log verbosity (`-v`); 4 and above means debug."""
    cleanup: bool = False
    """Remove every rule this proxy owns, then exit."""
    config_file: str | None = None
    """The `--config` file the settings were read from, if any."""
    unsupported_flags: tuple[str, ...] = ()
    """Flags (`--conntrack-min`) and config-file fields (`conntrack.min`) that kube-proxy has,
    were given here, and are accepted but not implemented: log them in one warning."""
    overridden_by_flags: tuple[str, ...] = ()
    """Flags that replaced a value from the config file (upstream kube-proxy ignores most
    flags when --config is given; we let explicit flags win): worth one warning."""


# -- the config file ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileConfig:
    """What one `KubeProxyConfiguration` file sets: None means "not in the file"."""

    path: str
    kubeconfig: str | None = None
    hostname_override: str | None = None
    proxy_mode: ProxyMode | None = None
    cluster_cidrs: tuple[str, ...] | None = None
    masquerade_all: bool | None = None
    nodeport_addresses: tuple[str, ...] | None = None
    metrics_bind_address: str | None = None
    healthz_bind_address: str | None = None
    sync_period: float | None = None
    min_sync_period: float | None = None
    masquerade_bit: int | None = None
    verbosity: int | None = None
    fields: Mapping[str, str] = field(default_factory=dict)
    """For each setting read from the file, the field path it came from (for messages)."""
    unknown_fields: tuple[str, ...] = ()
    """Field paths kube-proxy's v1alpha1 schema does not have (warned once)."""
    unsupported_fields: tuple[str, ...] = ()
    """Known fields holding a non-default value that this proxy does not implement."""


# Leaf kinds of the v1alpha1 schema; a nested dict is a sub-object.
_STR, _BOOL, _INT, _FLOAT, _DURATION, _STRLIST, _BOOLMAP, _ANY = (
    "a string",
    "a boolean",
    "an integer",
    "a number",
    "a duration",
    "a list of strings",
    "a map of booleans",
    "anything",
)

_SCHEMA: dict[str, Any] = {
    "apiVersion": _STR,
    "kind": _STR,
    "featureGates": _BOOLMAP,
    "clientConnection": {
        "kubeconfig": _STR,
        "acceptContentTypes": _STR,
        "contentType": _STR,
        "qps": _FLOAT,
        "burst": _INT,
    },
    "logging": {
        "format": _STR,
        "flushFrequency": _ANY,  # a duration string or integer nanoseconds
        "verbosity": _INT,
        "vmodule": _ANY,
        "options": _ANY,
    },
    "hostnameOverride": _STR,
    "bindAddress": _STR,
    "healthzBindAddress": _STR,
    "metricsBindAddress": _STR,
    "bindAddressHardFail": _BOOL,
    "enableProfiling": _BOOL,
    "showHiddenMetricsForVersion": _STR,
    "serviceProxyName": _STR,
    "mode": _STR,
    "syncPeriod": _DURATION,
    "minSyncPeriod": _DURATION,
    "iptables": {
        "masqueradeBit": _INT,
        "masqueradeAll": _BOOL,
        "localhostNodePorts": _BOOL,
        "syncPeriod": _DURATION,
        "minSyncPeriod": _DURATION,
    },
    "ipvs": {
        "syncPeriod": _DURATION,
        "minSyncPeriod": _DURATION,
        "scheduler": _STR,
        "excludeCIDRs": _STRLIST,
        "strictARP": _BOOL,
        "tcpTimeout": _DURATION,
        "tcpFinTimeout": _DURATION,
        "udpTimeout": _DURATION,
    },
    "nftables": {
        "masqueradeBit": _INT,
        "masqueradeAll": _BOOL,
        "syncPeriod": _DURATION,
        "minSyncPeriod": _DURATION,
        "tableName": _STR,
    },
    "winkernel": {
        "networkName": _STR,
        "sourceVip": _STR,
        "enableDSR": _BOOL,
        "rootHnsEndpointName": _STR,
        "forwardHealthCheckVip": _BOOL,
    },
    "windowsRunAsService": _BOOL,
    "detectLocalMode": _STR,
    "detectLocal": {"bridgeInterface": _STR, "interfaceNamePrefix": _STR},
    "clusterCIDR": _STR,
    "nodePortAddresses": _STRLIST,
    "oomScoreAdj": _INT,
    "conntrack": {
        "maxPerCore": _INT,
        "min": _INT,
        "tcpEstablishedTimeout": _DURATION,
        "tcpCloseWaitTimeout": _DURATION,
        "tcpBeLiberal": _BOOL,
        "udpTimeout": _DURATION,
        "udpStreamTimeout": _DURATION,
    },
    "configSyncPeriod": _DURATION,
    "portRange": _STR,
    "udpIdleTimeout": _DURATION,
}

# Known fields we do not implement, with the values that mean "as upstream's default"
# (durations in seconds). Any other value is reported as unsupported. Fields absent
# here and not read below (winkernel, portRange, logging.options, ...) never matter
# on a Linux node, or are a no-op for us (bindAddressHardFail: we always fail hard).
_HARMLESS_VALUES: dict[str, tuple[object, ...]] = {
    "featureGates": ({},),
    "clientConnection.acceptContentTypes": ("",),
    "clientConnection.contentType": ("", "application/vnd.kubernetes.protobuf", "application/json"),
    "clientConnection.qps": (0, 5),
    "clientConnection.burst": (0, 10),
    "logging.format": ("", "text"),
    "logging.vmodule": ([],),
    "bindAddress": ("", "0.0.0.0", "::"),
    "enableProfiling": (False,),
    "showHiddenMetricsForVersion": ("",),
    "serviceProxyName": ("",),
    "iptables.localhostNodePorts": (True,),
    "ipvs.scheduler": ("", "rr"),
    "ipvs.excludeCIDRs": ([],),
    "ipvs.strictARP": (False,),
    "ipvs.tcpTimeout": (0,),
    "ipvs.tcpFinTimeout": (0,),
    "ipvs.udpTimeout": (0,),
    "nftables.tableName": ("", "kube-proxy"),
    "detectLocalMode": ("", "ClusterCIDR"),
    "detectLocal.bridgeInterface": ("",),
    "detectLocal.interfaceNamePrefix": ("",),
    "oomScoreAdj": (-999,),
    "conntrack.maxPerCore": (32768,),
    "conntrack.min": (131072,),
    "conntrack.tcpEstablishedTimeout": (86400,),
    "conntrack.tcpCloseWaitTimeout": (3600,),
    "conntrack.tcpBeLiberal": (False,),
    "conntrack.udpTimeout": (0,),
    "conntrack.udpStreamTimeout": (0,),
    "configSyncPeriod": (0, 900),
}


def load_config_file(path: str | Path) -> FileConfig:
    """Read a `KubeProxyConfiguration` (YAML or JSON) and return what it sets.

    Raises `ConfigError` naming the file, the field path and the value for anything
    kube-proxy would refuse: unreadable or unparsable file, wrong apiVersion or kind,
    a wrong type, an invalid value. Unknown fields are logged in one warning.
    """
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML or JSON: {_one_line(err)}") from None
    config = parse_config_document(document, path=path)
    if config.unknown_fields:
        log.warning(
            "%s: ignoring fields unknown to %s %s: %s",
            path,
            API_VERSION,
            KIND,
            ", ".join(config.unknown_fields),
        )
    return config


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def parse_config_document(document: object, *, path: str = "<config>") -> FileConfig:
    """The checks and extraction of `load_config_file`, on an already-decoded document."""
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the config file must hold a {KIND} object")
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if api_version != API_VERSION:
        raise invalid(f"{path}: apiVersion", api_version, f"is not supported (want {API_VERSION})")
    if kind != KIND:
        raise invalid(f"{path}: kind", kind, f"is not supported (want {KIND})")
    unknown: list[str] = []
    _check_tree(document, _SCHEMA, "", path, unknown)
    return _extract(document, path, tuple(unknown))


def _check_tree(
    node: Mapping[Any, Any], schema: Mapping[str, Any], prefix: str, path: str, unknown: list[str]
) -> None:
    for key, value in node.items():
        where = f"{prefix}{key}"
        spec = schema.get(key) if isinstance(key, str) else None
        if spec is None:
            unknown.append(where)
        elif value is None:
            continue  # null: not set, as in Go
        elif isinstance(spec, dict):
            if not isinstance(value, dict):
                raise invalid(f"{path}: {where}", value, "must be an object")
            _check_tree(value, spec, f"{where}.", path, unknown)
        else:
            _check_leaf(value, spec, f"{path}: {where}")


def _check_leaf(value: object, kind: str, where: str) -> None:
    ok: bool
    if kind == _ANY:
        ok = True
    elif kind in (_STR, _DURATION):
        ok = isinstance(value, str)
    elif kind == _BOOL:
        ok = isinstance(value, bool)
    elif kind == _INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -(2**31) <= cast(int, value) < 2**31:
            raise invalid(where, value, "is out of range for a 32-bit integer")
    elif kind == _FLOAT:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind == _STRLIST:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:  # _BOOLMAP
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, bool) for k, v in value.items()
        )
    if not ok:
        problem = _DURATION_HINT if kind == _DURATION else f"is not {kind}"
        raise invalid(where, value, problem)
    if kind == _DURATION:
        try:
            parse_go_duration(cast(str, value))
        except ValueError:
            raise invalid(where, value, _DURATION_HINT) from None


def _lookup(document: Mapping[str, Any], dotted: str) -> Any:
    node: Any = document
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _extract(document: Mapping[str, Any], path: str, unknown: tuple[str, ...]) -> FileConfig:
    values: dict[str, Any] = {}
    fields: dict[str, str] = {}

    def take(setting: str, dotted: str, convert: Callable[[Any], Any] = lambda v: v) -> None:
        raw = _lookup(document, dotted)
        if raw is None:
            return
        try:
            value = convert(raw)
        except BadValueError as err:
            raise invalid(f"{path}: {dotted}", raw, str(err)) from None
        if value is not None:  # None: "as the default", like an absent field
            values[setting] = value
            fields[setting] = dotted

    def text_or_none(raw: str) -> str | None:
        return raw.strip() or None

    def hostname(raw: str) -> str | None:
        # Empty means "use the host name"; blank is refused, as upstream's GetHostname.
        return normalize_hostname(raw) if raw else None

    def bind(port: int) -> Callable[[str], str | None]:
        # In the file an empty address means "the default", as upstream's defaulting.
        return lambda raw: parse_bind_address(raw, port) if raw.strip() else None

    def period(raw: str) -> float | None:
        seconds = duration_value(raw)
        return None if seconds == 0 else seconds  # upstream's defaulting: 0 -> default

    take("kubeconfig", "clientConnection.kubeconfig", text_or_none)
    take("hostname_override", "hostnameOverride", hostname)
    take("proxy_mode", "mode", check_proxy_mode)
    mode = values.get("proxy_mode", DEFAULT_PROXY_MODE)
    take("cluster_cidrs", "clusterCIDR", lambda raw: parse_cluster_cidrs(raw.split(",")) or None)
    take("nodeport_addresses", "nodePortAddresses", parse_nodeport_addresses)
    take("metrics_bind_address", "metricsBindAddress", bind(METRICS_PORT))
    take("healthz_bind_address", "healthzBindAddress", bind(HEALTHZ_PORT))
    take("verbosity", "logging.verbosity", _non_negative)

    section = {"ipvs": "ipvs", "nftables": "nftables"}.get(mode, "iptables")
    take("sync_period", f"{section}.syncPeriod", period)
    take("min_sync_period", f"{section}.minSyncPeriod", period)
    take("sync_period", "syncPeriod", period)
    take("min_sync_period", "minSyncPeriod", period)
    masquerade_section = "nftables" if mode == "nftables" else "iptables"
    take("masquerade_all", f"{masquerade_section}.masqueradeAll")
    take("masquerade_bit", f"{masquerade_section}.masqueradeBit", check_masquerade_bit)

    return FileConfig(
        path=path,
        fields=fields,
        unknown_fields=unknown,
        unsupported_fields=_unsupported_fields(document),
        **values,
    )


def _non_negative(raw: int) -> int:
    if raw < 0:
        raise BadValueError("must be greater than or equal to 0")
    return raw


def _unsupported_fields(document: Mapping[str, Any]) -> tuple[str, ...]:
    found = []
    for dotted, harmless in _HARMLESS_VALUES.items():
        raw = _lookup(document, dotted)
        if raw is None:
            continue
        value = parse_go_duration(raw) if _leaf_kind(dotted) == _DURATION else raw
        if not any(_same(value, h) for h in harmless):
            found.append(dotted)
    return tuple(found)


def _leaf_kind(dotted: str) -> str:
    node: Any = _SCHEMA
    for part in dotted.split("."):
        node = node[part]
    return cast(str, node)


def _same(value: object, harmless: object) -> bool:
    if isinstance(value, bool) or isinstance(harmless, bool):
        return value is harmless
    if isinstance(value, int | float) and isinstance(harmless, int | float):
        return math.isclose(value, harmless)
    return value == harmless


# -- rules that span settings ------------------------------------------------------------


def check_sync_periods(
    sync_period: float, min_sync_period: float, *, sync_from: str, min_from: str
) -> None:
    """Upstream's validation: sync period > 0, 0 <= min sync period <= sync period."""
    if sync_period <= 0:
        raise invalid(sync_from, format_go_duration(sync_period), "must be greater than 0")
    if min_sync_period < 0:
        raise invalid(min_from, format_go_duration(min_sync_period), "must not be negative")
    if min_sync_period > sync_period:
        raise invalid(
            min_from,
            format_go_duration(min_sync_period),
            f"must not be greater than the sync period "
            f"({format_go_duration(sync_period)} from {sync_from})",
        )
