"""Rules across settings: the sync periods, and upstream's IPVS checks (ipvs mode only)."""

from __future__ import annotations

import pytest

from proxy.backends.base import IpvsOptions
from proxy.config.errors import ConfigError
from proxy.config.rules import check_ipvs, check_sync_periods


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


def source(name: str) -> str:
    return f"<{name}>"


def test_ipvs_check_normalises_the_excluded_cidrs() -> None:
    options = IpvsOptions(exclude_cidrs=("198.18.0.1/15", "fd00::0001/64"), tcp_timeout=0)
    checked = check_ipvs(options, source=source)
    assert checked == IpvsOptions(exclude_cidrs=("198.18.0.0/15", "fd00::/64"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (IpvsOptions(tcp_timeout=-1),
         '<ipvs.tcp_timeout>: "-1s" must be greater than or equal to 0'),
        (IpvsOptions(tcp_fin_timeout=-0.5),
         '<ipvs.tcp_fin_timeout>: "-500ms" must be greater than or equal to 0'),
        (IpvsOptions(udp_timeout=-60), '<ipvs.udp_timeout>: "-1m0s" must be greater than or equal'),
        (IpvsOptions(exclude_cidrs=("198.18.0.0/15", "198.18.0.0/33")),
         '<ipvs.exclude_cidrs>: "198.18.0.0/33" is not a valid CIDR'),
        (IpvsOptions(exclude_cidrs=("198.18.0.1",)),
         '<ipvs.exclude_cidrs>: "198.18.0.1" is not a valid CIDR'),
    ],
)  # fmt: skip
def test_ipvs_check_names_the_setting_and_the_value(options: IpvsOptions, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_ipvs(options, source=source)
    assert str(err.value).startswith(message)


def test_the_scheduler_is_left_to_the_kernel_as_upstream() -> None:
    assert check_ipvs(IpvsOptions(scheduler="mh"), source=source).scheduler == "mh"
