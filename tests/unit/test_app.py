"""What the app hands the backend from the settings."""

from __future__ import annotations

from proxy.app import backend_config
from proxy.backends.base import IpvsOptions, NullBackendMetrics
from proxy.config import Settings


def test_backends_get_the_ipvs_options_sync_period_and_mark_from_the_settings() -> None:
    ipvs = IpvsOptions(scheduler="wrr", strict_arp=True, tcp_timeout=900.0)
    settings = Settings(ipvs=ipvs, sync_period=45.0, masquerade_bit=10)
    asked: list[float] = []
    config = backend_config(settings, request_sync=asked.append)
    assert config.ipvs == ipvs
    assert (config.sync_period, config.masquerade_bit) == (45.0, 10)
    config.request_sync(2.5)
    assert asked == [2.5]
    assert isinstance(config.metrics, NullBackendMetrics)
