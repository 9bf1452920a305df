"""`Settings`: everything the proxy runs with, and kube-proxy's defaults for each of it.

`Settings()` is kube-proxy's built-in configuration; `proxy.cli` lays the config file
and then the command line over it (defaults < file < flags) and builds the final value.
Each attribute's docstring says what it means and which flag sets it. Two groups are
values of their own: `ipvs` (`IpvsOptions`, owned by the backend seam, which hands it to
the IPVS backend) and `conntrack` (`ConntrackSettings`, used by `--init-only`).

While the layers are merged, a setting is named by its attribute path: "sync_period",
"ipvs.scheduler", "conntrack.min". `settings_from` builds a `Settings` from such names
and `default_value` gives a name's default. A `Settings` is a frozen value: safe to share
between threads, never changed after start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from proxy.backends.base import IpvsOptions
from proxy.config.values import DEFAULT_PROXY_MODE, ProxyMode

METRICS_PORT = 10249
HEALTHZ_PORT = 10256
DEFAULT_METRICS_BIND_ADDRESS = f"127.0.0.1:{METRICS_PORT}"
DEFAULT_HEALTHZ_BIND_ADDRESS = f"0.0.0.0:{HEALTHZ_PORT}"
DEFAULT_SYNC_PERIOD = 30.0
DEFAULT_MIN_SYNC_PERIOD = 1.0
DEFAULT_MASQUERADE_BIT = 14
DEFAULT_IPVS_SCHEDULER = "rr"
"""What an empty `ipvs.scheduler` / `--ipvs-scheduler` means (upstream: round robin)."""


@dataclass(frozen=True, slots=True)
class ConntrackSettings:
    """KubeProxyConfiguration `conntrack.*` and the `--conntrack-*` flags (durations in seconds).

    Applied by `--init-only` (see `proxy.init`): the table size as kube-proxy computes
    it, and each timeout only when it is above 0 (0 leaves the kernel's value).
    """

    max_per_core: int = 32768
    """Conntrack entries per CPU (`--conntrack-max-per-core`); 0 leaves the table size alone
    (and ignores `min`)."""
    min: int = 131072
    """Lower bound of the table size, whatever the CPU count (`--conntrack-min`)."""
    tcp_established_timeout: float = 86400.0
    """Idle timeout of established TCP entries (`--conntrack-tcp-timeout-established`)."""
    tcp_close_wait_timeout: float = 3600.0
    """Timeout of TCP entries in CLOSE_WAIT (`--conntrack-tcp-timeout-close-wait`)."""
    tcp_be_liberal: bool = False
    """Set nf_conntrack_tcp_be_liberal=1: out-of-window packets are not INVALID
    (`--conntrack-tcp-be-liberal`)."""
    udp_timeout: float = 0.0
    """Idle timeout of UNREPLIED UDP entries (`--conntrack-udp-timeout`)."""
    udp_stream_timeout: float = 0.0
    """Idle timeout of ASSURED UDP entries (`--conntrack-udp-timeout-stream`)."""


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
    localhost_nodeports: bool = True
    """NodePorts also answer on 127.0.0.1 (iptables mode, IPv4; needs route_localnet):
    `--iptables-localhost-nodeports` / `iptables.localhostNodePorts`."""
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
    ipvs: IpvsOptions = field(default_factory=IpvsOptions)
    """`ipvs.*` / `--ipvs-*`. Checked only in ipvs mode, as upstream's validation does
    (`ipvs.excludeCIDRs` normalised then); in other modes carried as given, unused."""
    conntrack: ConntrackSettings = field(default_factory=ConntrackSettings)
    """`conntrack.*` / `--conntrack-*`: what `--init-only` sets in the kernel."""
    verbosity: int = 0
    """klog-style log verbosity (`-v`); 4 and above means debug."""
    cleanup: bool = False
    """Remove every rule this proxy owns, then exit."""
    write_config_to: str | None = None
    """`--write-config-to`: write these settings as a KubeProxyConfiguration file, then exit."""
    init_only: bool = False
    """`--init-only`: set what needs full root privileges (sysctls, see `proxy.init`), then exit."""
    config_file: str | None = None
    """The `--config` file the settings were read from, if any."""
    unsupported_flags: tuple[str, ...] = ()
    """Flags (`--oom-score-adj`) and config-file fields (`oomScoreAdj`) that kube-proxy has,
    were given here, and are accepted but not implemented: log them in one warning."""
    overridden_by_flags: tuple[str, ...] = ()
    """Flags that replaced a value from the config file (upstream kube-proxy ignores most
    flags when --config is given; we let explicit flags win): worth one warning."""


_GROUPS: dict[str, type[IpvsOptions] | type[ConntrackSettings]] = {
    "ipvs": IpvsOptions,
    "conntrack": ConntrackSettings,
}
"""Settings attributes that are values of their own, named "<group>.<field>" while merging."""

SETTING_NAMES: tuple[str, ...] = tuple(
    f"{f.name}.{inner.name}" if f.name in _GROUPS else f.name
    for f in fields(Settings)
    for inner in (fields(_GROUPS[f.name]) if f.name in _GROUPS else (f,))
)
"""Every setting by name, groups spelled out: "kubeconfig", ..., "ipvs.scheduler", ..."""


def settings_from(values: Mapping[str, Any]) -> Settings:
    """A `Settings` from setting names to values ("sync_period", "conntrack.min", ...).

    Names not given keep their default; an unknown name is a `KeyError` (a programming
    error, never user input).
    """
    flat: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {group: {} for group in _GROUPS}
    for name, value in values.items():
        if name not in SETTING_NAMES:
            raise KeyError(f"no setting named {name!r}")
        group, dot, inner = name.partition(".")
        if dot:
            grouped[group][inner] = value
        else:
            flat[name] = value
    for group, kind in _GROUPS.items():
        if grouped[group]:
            flat[group] = kind(**grouped[group])
    return Settings(**flat)


def setting_value(settings: Settings, name: str) -> Any:
    """The value of one setting by name: `setting_value(s, "ipvs.scheduler")`."""
    value: Any = settings
    for part in name.split("."):
        value = getattr(value, part)
    return value


def default_value(name: str) -> Any:
    """kube-proxy's default for one setting by name."""
    return setting_value(_DEFAULTS, name)


_DEFAULTS = Settings()
