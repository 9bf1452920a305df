"""`--proxy-mode nftables` and its sync-period flags."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from proxy.cli import parse_settings
from proxy.config.errors import ConfigError
from proxy.config.settings import Settings


def parse(argv: Sequence[str]) -> Settings:
    return parse_settings(argv, {"NODE_NAME": "node-1"})


@pytest.mark.parametrize(
    ("argv", "periods"),
    [
        (["--proxy-mode=nftables"], (30.0, 1.0)),
        (["--proxy-mode=nftables", "--iptables-sync-period=1m"], (60.0, 1.0)),
        (
            [
                "--proxy-mode=nftables",
                "--iptables-sync-period=1m",
                "--nftables-sync-period=2m",
                "--nftables-min-sync-period=5s",
            ],
            (120.0, 5.0),
        ),
        # Outside nftables mode the nftables-* flags do not set the periods.
        (["--proxy-mode=iptables", "--nftables-sync-period=2m"], (30.0, 1.0)),
    ],
)
def test_nftables_sync_period_flags(argv: list[str], periods: tuple[float, float]) -> None:
    settings = parse(argv)
    assert (settings.sync_period, settings.min_sync_period) == periods


def test_nftables_min_sync_period_above_the_period_is_refused() -> None:
    with pytest.raises(ConfigError, match="nftables-min-sync-period"):
        parse(["--proxy-mode=nftables", "--nftables-min-sync-period=1m"])
