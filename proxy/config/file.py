"""Reading a `KubeProxyConfiguration` file (`--config`): what it sets, checked value by value.

The file is read the way kube-proxy reads `kubeproxy.config.k8s.io/v1alpha1`: YAML or
JSON, case-sensitive field names, `null` meaning "not set", a wrong type or value is an
error naming the file, the field path and the value, e.g.
`/etc/kp.yaml: iptables.syncPeriod: "3x" is not a duration`. Unknown fields are not
fatal (upstream falls back to lenient decoding for v1alpha1 and logs it): they are
named in one warning. Known fields this proxy does not implement are reported in
`FileConfig.unsupported_fields` when they hold something other than upstream's default,
so the caller can warn once. The schema itself is data, in `proxy.config.schema`.

As in upstream's v1alpha1 conversion, the proxy mode picks which section supplies the
sync periods and masquerade settings: `ipvs.*` for ipvs, `nftables.*` for nftables,
`iptables.*` otherwise (the masquerade bit comes from `iptables.*` except in nftables
mode). Top-level `syncPeriod` / `minSyncPeriod` (the newer internal layout) win over the
section when present. A zero period means "the default", as upstream's defaulting.

Nothing here touches the network or keeps state: pure functions and frozen values, safe
from any thread. The only side effect is the single unknown-fields warning logged by
`load_config_file`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from proxy.config.addresses import (
    parse_bind_address,
    parse_cluster_cidrs,
    parse_nodeport_addresses,
    split_list,
)
from proxy.config.durations import DURATION_HINT, duration_value, parse_go_duration
from proxy.config.errors import BadValueError, ConfigError, invalid
from proxy.config.node import normalize_hostname
from proxy.config.schema import (
    ANY,
    API_VERSION,
    BOOL,
    DURATION,
    FLOAT,
    HARMLESS_VALUES,
    INT,
    KIND,
    SCHEMA,
    STR,
    STRLIST,
    leaf_kind,
)
from proxy.config.settings import DEFAULT_IPVS_SCHEDULER, HEALTHZ_PORT, METRICS_PORT
from proxy.config.values import (
    DEFAULT_PROXY_MODE,
    check_masquerade_bit,
    check_proxy_mode,
    non_negative,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FileConfig:
    """What one `KubeProxyConfiguration` file sets, by setting name (see `proxy.config.settings`).

    A setting the file leaves out, sets to `null`, or sets to a value meaning "the
    default" (an empty address, a zero period) is absent from `values`.
    """

    path: str
    values: Mapping[str, Any] = field(default_factory=dict)
    """Setting name -> value: {"proxy_mode": "nftables", "conntrack.min": 0, ...}."""
    fields: Mapping[str, str] = field(default_factory=dict)
    """For each setting in `values`, the field path it came from (for messages)."""
    unknown_fields: tuple[str, ...] = ()
    """Field paths kube-proxy's v1alpha1 schema does not have (warned once)."""
    unsupported_fields: tuple[str, ...] = ()
    """Known fields holding a non-default value that this proxy does not implement."""

    def get(self, setting: str) -> Any:
        """The value the file sets for `setting`, or None."""
        return self.values.get(setting)


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
    _check_tree(document, SCHEMA, "", path, unknown)
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
    if kind == ANY:
        ok = True
    elif kind in (STR, DURATION):
        ok = isinstance(value, str)
    elif kind == BOOL:
        ok = isinstance(value, bool)
    elif kind == INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -(2**31) <= cast(int, value) < 2**31:
            raise invalid(where, value, "is out of range for a 32-bit integer")
    elif kind == FLOAT:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind == STRLIST:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:  # BOOLMAP
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, bool) for k, v in value.items()
        )
    if not ok:
        problem = DURATION_HINT if kind == DURATION else f"is not {kind}"
        raise invalid(where, value, problem)
    if kind == DURATION:
        try:
            parse_go_duration(cast(str, value))
        except ValueError:
            raise invalid(where, value, DURATION_HINT) from None


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

    def timeout(raw: str) -> float:
        return non_negative(duration_value(raw))  # an explicit 0 stays: "leave as is"

    take("kubeconfig", "clientConnection.kubeconfig", text_or_none)
    take("hostname_override", "hostnameOverride", hostname)
    take("proxy_mode", "mode", check_proxy_mode)
    mode = values.get("proxy_mode", DEFAULT_PROXY_MODE)
    take("cluster_cidrs", "clusterCIDR", lambda raw: parse_cluster_cidrs(raw.split(",")) or None)
    take("nodeport_addresses", "nodePortAddresses", parse_nodeport_addresses)
    take("metrics_bind_address", "metricsBindAddress", bind(METRICS_PORT))
    take("healthz_bind_address", "healthzBindAddress", bind(HEALTHZ_PORT))
    take("verbosity", "logging.verbosity", non_negative)

    section = {"ipvs": "ipvs", "nftables": "nftables"}.get(mode, "iptables")
    take("sync_period", f"{section}.syncPeriod", period)
    take("min_sync_period", f"{section}.minSyncPeriod", period)
    take("sync_period", "syncPeriod", period)
    take("min_sync_period", "minSyncPeriod", period)
    masquerade_section = "nftables" if mode == "nftables" else "iptables"
    take("masquerade_all", f"{masquerade_section}.masqueradeAll")
    take("localhost_nodeports", "iptables.localhostNodePorts")
    take("masquerade_bit", f"{masquerade_section}.masqueradeBit", check_masquerade_bit)

    # ipvs.*: read in every mode, checked (proxy.config.rules) only in ipvs mode, as upstream.
    take("ipvs.scheduler", "ipvs.scheduler", lambda raw: raw or DEFAULT_IPVS_SCHEDULER)
    take("ipvs.exclude_cidrs", "ipvs.excludeCIDRs", split_list)
    take("ipvs.strict_arp", "ipvs.strictARP")
    take("ipvs.tcp_timeout", "ipvs.tcpTimeout", duration_value)
    take("ipvs.tcp_fin_timeout", "ipvs.tcpFinTimeout", duration_value)
    take("ipvs.udp_timeout", "ipvs.udpTimeout", duration_value)
    # conntrack.*: checked in every mode, as upstream's Linux section.
    take("conntrack.max_per_core", "conntrack.maxPerCore", non_negative)
    take("conntrack.min", "conntrack.min", non_negative)
    take("conntrack.tcp_established_timeout", "conntrack.tcpEstablishedTimeout", timeout)
    take("conntrack.tcp_close_wait_timeout", "conntrack.tcpCloseWaitTimeout", timeout)
    take("conntrack.tcp_be_liberal", "conntrack.tcpBeLiberal")
    take("conntrack.udp_timeout", "conntrack.udpTimeout", timeout)
    take("conntrack.udp_stream_timeout", "conntrack.udpStreamTimeout", timeout)

    return FileConfig(
        path=path,
        values=values,
        fields=fields,
        unknown_fields=unknown,
        unsupported_fields=_unsupported_fields(document),
    )


def _unsupported_fields(document: Mapping[str, Any]) -> tuple[str, ...]:
    found = []
    for dotted, harmless in HARMLESS_VALUES.items():
        raw = _lookup(document, dotted)
        if raw is None:
            continue
        value = parse_go_duration(raw) if leaf_kind(dotted) == DURATION else raw
        if not any(_same(value, h) for h in harmless):
            found.append(dotted)
    return tuple(found)


def _same(value: object, harmless: object) -> bool:
    if isinstance(value, bool) or isinstance(harmless, bool):
        return value is harmless
    if isinstance(value, int | float) and isinstance(harmless, int | float):
        return math.isclose(value, harmless)
    return value == harmless
