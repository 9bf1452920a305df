"""Rules that span several settings, or depend on the proxy mode; run once the layers are merged.

A value from the file can meet a flag here (`--iptables-min-sync-period=20s` against the
file's `iptables.syncPeriod: 10s`), and the mode may come from either, so these checks
run on the merged result. The caller passes where each value came from (a flag, a file
field, "the default"), and the message names it:

    --iptables-min-sync-period: "20s" must not be greater than the sync period
    (10s from /etc/kp.yaml: iptables.syncPeriod)

Pure; safe from any thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from proxy.backends.base import IpvsOptions
from proxy.config.addresses import parse_cidr
from proxy.config.durations import format_go_duration
from proxy.config.errors import BadValueError, invalid


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


def check_ipvs(options: IpvsOptions, *, source: Callable[[str], str]) -> IpvsOptions:
    """Upstream's IPVS validation, for ipvs mode: timeouts >= 0, every excluded CIDR a CIDR.

    Returns `options` with the excluded CIDRs normalised. `source(name)` tells where the
    setting `name` ("ipvs.tcp_timeout") came from. Upstream checks `ipvs.*` only when the
    mode is ipvs (other modes never read it), so the caller does too. The scheduler is
    not checked here: as upstream, the IPVS backend asks the kernel for it at start.
    """
    for name in ("tcp_timeout", "tcp_fin_timeout", "udp_timeout"):
        seconds: float = getattr(options, name)
        if seconds < 0:
            raise invalid(
                source(f"ipvs.{name}"),
                format_go_duration(seconds),
                "must be greater than or equal to 0",
            )
    cidrs = []
    for text in options.exclude_cidrs:
        try:
            cidrs.append(parse_cidr(text))
        except BadValueError as err:
            raise invalid(source("ipvs.exclude_cidrs"), text, str(err)) from None
    return dataclasses.replace(options, exclude_cidrs=tuple(cidrs))
