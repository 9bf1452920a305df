"""Settings defaults, and building Settings from setting names while the layers merge."""

from __future__ import annotations

import pytest

from proxy.backends.base import IpvsOptions
from proxy.config.settings import (
    SETTING_NAMES,
    ConntrackSettings,
    Settings,
    default_value,
    setting_value,
    settings_from,
)


def test_settings_defaults_are_kube_proxys() -> None:
    settings = Settings()
    assert settings.proxy_mode == "iptables"
    assert settings.metrics_bind_address == "127.0.0.1:10249"
    assert settings.healthz_bind_address == "0.0.0.0:10256"
    assert (settings.sync_period, settings.min_sync_period) == (30.0, 1.0)
    assert settings.masquerade_bit == 14
    assert settings.unsupported_flags == ()


def test_ipvs_and_conntrack_defaults_are_kube_proxys() -> None:
    # pkg/proxy/apis/config/v1alpha1/defaults.go, and "empty scheduler means rr".
    assert Settings().ipvs == IpvsOptions(
        scheduler="rr",
        exclude_cidrs=(),
        strict_arp=False,
        tcp_timeout=0,
        tcp_fin_timeout=0,
        udp_timeout=0,
    )
    assert Settings().conntrack == ConntrackSettings(
        max_per_core=32768,
        min=131072,
        tcp_established_timeout=86400,
        tcp_close_wait_timeout=3600,
        tcp_be_liberal=False,
        udp_timeout=0,
        udp_stream_timeout=0,
    )


def test_settings_from_names_fills_the_groups_and_keeps_other_defaults() -> None:
    settings = settings_from(
        {"sync_period": 60.0, "ipvs.scheduler": "wrr", "conntrack.min": 0, "cleanup": True}
    )
    assert settings.sync_period == 60.0
    assert settings.ipvs == IpvsOptions(scheduler="wrr")
    assert settings.conntrack == ConntrackSettings(min=0)
    assert settings.cleanup is True
    assert settings_from({}) == Settings()
    with pytest.raises(KeyError, match=r"ipvs\.colour"):
        settings_from({"ipvs.colour": "red"})


def test_every_setting_name_reads_back_what_it_set() -> None:
    assert "ipvs.exclude_cidrs" in SETTING_NAMES
    assert "conntrack.udp_stream_timeout" in SETTING_NAMES
    assert "ipvs" not in SETTING_NAMES
    assert default_value("conntrack.tcp_close_wait_timeout") == 3600
    settings = settings_from({"conntrack.tcp_be_liberal": True, "verbosity": 3})
    assert setting_value(settings, "conntrack.tcp_be_liberal") is True
    assert setting_value(settings, "verbosity") == 3
