"""`Settings`: everything the proxy runs with, kube-proxy's defaults, rules across settings.

`Settings()` is kube-proxy's built-in configuration; `proxy.cli` lays the config file
and then the command line over it (defaults < file < flags) and builds the final value.
Each attribute's docstring says what it means and which flag sets it. A `Settings` is a
frozen value: safe to share between threads, never changed after start-up.

Rules that involve more than one setting live here too (`check_sync_periods`); the caller
passes where each value came from, so the message names the flag or file field.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config.durations import format_go_duration
from proxy.config.errors import invalid
from proxy.config.values import DEFAULT_PROXY_MODE, ProxyMode

METRICS_PORT = 10249
HEALTHZ_PORT = 10256
DEFAULT_METRICS_BIND_ADDRESS = f"127.0.0.1:{METRICS_PORT}"
DEFAULT_HEALTHZ_BIND_ADDRESS = f"0.0.0.0:{HEALTHZ_PORT}"
DEFAULT_SYNC_PERIOD = 30.0
DEFAULT_MIN_SYNC_PERIOD = 1.0
DEFAULT_MASQUERADE_BIT = 14


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
