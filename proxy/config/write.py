"""`--write-config-to`: the effective `Settings` as a `KubeProxyConfiguration` file.

Upstream's `Options.Run` writes its merged configuration (defaults < file < flags) as a
`kubeproxy.config.k8s.io/v1alpha1` YAML document and exits; this is the same, built as
the exact inverse of the reader in `proxy.config.file`: every field the reader maps to a
setting is written, so `--config` of the written file gives the same settings back (the
tests check this round trip). Keys are sorted and durations spelled as Go prints them,
as upstream's encoder does.

What is deliberately not written:

- fields this proxy does not implement (`oomScoreAdj`, `featureGates`, ...): writing
  upstream's defaults there would claim a behaviour we do not have;
- settings that are not part of the file format: `--master` (a flag only, upstream
  too), the node name found through `$NODE_NAME` or the host name, `--cleanup`, and the
  other run-time switches (`RUN_ONLY`).

Some settings have no spelling in a v1alpha1 file, because there an empty or zero value
means "the default": a min sync period of 0 (read back as 1s) and a disabled metrics or
health server (an empty address is read back as the default address). Rather than write
a file that means something else, `config_document` raises `ConfigError` naming them.

Pure apart from `write_config_file`, which writes one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from proxy.config.durations import format_go_duration
from proxy.config.errors import ConfigError
from proxy.config.schema import API_VERSION, KIND
from proxy.config.settings import (
    DEFAULT_HEALTHZ_BIND_ADDRESS,
    DEFAULT_METRICS_BIND_ADDRESS,
    Settings,
)

RUN_ONLY: tuple[str, ...] = (
    "master",
    "node_name",
    "cleanup",
    "write_config_to",
    "init_only",
    "config_file",
    "unsupported_flags",
    "overridden_by_flags",
)
"""Settings a `KubeProxyConfiguration` does not carry; every other setting is written."""

WHERE = "--write-config-to"


def config_document(settings: Settings) -> dict[str, Any]:
    """`settings` as a v1alpha1 `KubeProxyConfiguration` object (see the module doc)."""
    _check_writable(settings)
    mode = settings.proxy_mode
    # As the reader: the mode's section holds the periods; iptables holds the masquerade
    # settings except in nftables mode.
    period_section = {"ipvs": "ipvs", "nftables": "nftables"}.get(mode, "iptables")
    masquerade_section = "nftables" if mode == "nftables" else "iptables"
    sections: dict[str, dict[str, Any]] = {period_section: {}, masquerade_section: {}}
    sections[period_section].update(
        syncPeriod=format_go_duration(settings.sync_period),
        minSyncPeriod=format_go_duration(settings.min_sync_period),
    )
    sections[masquerade_section].update(
        masqueradeAll=settings.masquerade_all,
        masqueradeBit=settings.masquerade_bit,
    )
    sections.setdefault("iptables", {})["localhostNodePorts"] = settings.localhost_nodeports
    ipvs = settings.ipvs
    sections.setdefault("ipvs", {}).update(
        scheduler=ipvs.scheduler,
        excludeCIDRs=list(ipvs.exclude_cidrs),
        strictARP=ipvs.strict_arp,
        tcpTimeout=format_go_duration(ipvs.tcp_timeout),
        tcpFinTimeout=format_go_duration(ipvs.tcp_fin_timeout),
        udpTimeout=format_go_duration(ipvs.udp_timeout),
    )
    conntrack = settings.conntrack
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "clientConnection": {"kubeconfig": settings.kubeconfig or ""},
        "hostnameOverride": settings.hostname_override or "",
        "mode": mode,
        "clusterCIDR": ",".join(settings.cluster_cidrs),
        "nodePortAddresses": list(settings.nodeport_addresses),
        "metricsBindAddress": settings.metrics_bind_address,
        "healthzBindAddress": settings.healthz_bind_address,
        "logging": {"verbosity": settings.verbosity},
        **sections,
        "conntrack": {
            "maxPerCore": conntrack.max_per_core,
            "min": conntrack.min,
            "tcpEstablishedTimeout": format_go_duration(conntrack.tcp_established_timeout),
            "tcpCloseWaitTimeout": format_go_duration(conntrack.tcp_close_wait_timeout),
            "tcpBeLiberal": conntrack.tcp_be_liberal,
            "udpTimeout": format_go_duration(conntrack.udp_timeout),
            "udpStreamTimeout": format_go_duration(conntrack.udp_stream_timeout),
        },
    }


def _check_writable(settings: Settings) -> None:
    if settings.min_sync_period == 0:
        raise ConfigError(
            f"{WHERE}: a min sync period of 0s cannot be written: a KubeProxyConfiguration "
            "reads 0 as the default (1s); give a small period such as 1ms instead"
        )
    servers = (
        ("metricsBindAddress", settings.metrics_bind_address, DEFAULT_METRICS_BIND_ADDRESS),
        ("healthzBindAddress", settings.healthz_bind_address, DEFAULT_HEALTHZ_BIND_ADDRESS),
    )
    for field, address, default in servers:
        if not address:
            raise ConfigError(
                f"{WHERE}: a disabled server cannot be written: a KubeProxyConfiguration "
                f"reads an empty {field} as the default ({default})"
            )


def render_config(settings: Settings) -> str:
    """The YAML text of `config_document(settings)`, keys sorted as upstream's encoder."""
    return yaml.safe_dump(
        config_document(settings), sort_keys=True, default_flow_style=False, allow_unicode=True
    )


def write_config_file(settings: Settings, path: str | Path) -> None:
    """Write `render_config(settings)` to `path`; `ConfigError` naming the path on failure."""
    text = render_config(settings)
    try:
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as err:
        raise ConfigError(f"{WHERE}: cannot write {path}: {err.strerror or err}") from None
