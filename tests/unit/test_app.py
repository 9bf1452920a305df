"""What the app hands the backend from the settings."""

from __future__ import annotations

import logging

import pytest

from proxy import app
from proxy.app import backend_config
from proxy.backends.base import (
    BackendConfig,
    Feature,
    IpvsOptions,
    NullBackendMetrics,
    UnknownBackendError,
)
from proxy.config import Settings
from proxy.model import IPFamily


def test_backends_get_the_ipvs_options_sync_period_and_mark_from_the_settings() -> None:
    ipvs = IpvsOptions(scheduler="wrr", strict_arp=True, tcp_timeout=900.0)
    settings = Settings(ipvs=ipvs, sync_period=45.0, masquerade_bit=10, localhost_nodeports=False)
    asked: list[float] = []
    config = backend_config(settings, request_sync=asked.append)
    assert config.ipvs == ipvs
    assert config.localhost_nodeports is False
    assert (config.sync_period, config.masquerade_bit) == (45.0, 10)
    config.request_sync(2.5)
    assert asked == [2.5]
    assert isinstance(config.metrics, NullBackendMetrics)


class _Probed:
    """A backend that says whether its family works here."""

    name = "probed"

    def __init__(self, reason: str | None) -> None:
        self.reason = reason

    def sync(self, state: object, hint: object) -> None:
        pass

    def cleanup(self) -> bool:
        return False

    def drifted(self) -> bool:
        return False

    def unusable_reason(self) -> str | None:
        return self.reason


def test_dual_stack_wherever_both_families_work_else_single_stack_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reasons = {IPFamily.V4: None, IPFamily.V6: "ip6tables-nft-save -t nat failed: no table"}
    monkeypatch.setattr(app, "create", lambda _mode, config: _Probed(reasons[config.family]))
    configs: list[IPFamily] = []

    def config_for(family: IPFamily, sink: object) -> BackendConfig:
        configs.append(family)
        return BackendConfig(family=family)

    with caplog.at_level(logging.INFO, logger="proxy"):
        chosen = app.family_backends("iptables", config_for, NullBackendMetrics())
    assert [family for family, _ in chosen] == [IPFamily.V4]
    assert configs == [IPFamily.V4, IPFamily.V6]
    assert "single-stack IPv4: IPv6 cannot be served here (ip6tables-nft-save" in caplog.text

    reasons[IPFamily.V6] = None
    chosen = app.family_backends("iptables", config_for, NullBackendMetrics())
    assert [family for family, _ in chosen] == [IPFamily.V4, IPFamily.V6]

    reasons[IPFamily.V4] = reasons[IPFamily.V6] = "nothing works"
    with pytest.raises(UnknownBackendError, match="neither IPv4 nor IPv6"):
        app.family_backends("iptables", config_for, NullBackendMetrics())


def test_a_single_stack_node_does_not_claim_ipv6() -> None:
    every = frozenset(Feature)
    assert app.served_features(every, [IPFamily.V4]) == every - {Feature.IPV6}
    assert app.served_features(every, [IPFamily.V4, IPFamily.V6]) == every
    assert Feature.IPV4 not in app.served_features(every, [IPFamily.V6])
