"""Settings defaults and the rules that span several settings."""

from __future__ import annotations

import pytest

from proxy.config.errors import ConfigError
from proxy.config.settings import Settings, check_sync_periods


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
