"""Go durations: exactly what Go's time.ParseDuration accepts, printed as Duration.String()."""

from __future__ import annotations

import pytest

from proxy.config.durations import format_go_duration, parse_go_duration, parse_go_duration_ns


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("30s", 30_000_000_000),
        ("1m0s", 60_000_000_000),
        ("500ms", 500_000_000),
        ("1h2m3.5s", 3_723_500_000_000),
        ("0", 0),
        ("-0", 0),
        ("0s", 0),
        (".5s", 500_000_000),
        ("5.s", 5_000_000_000),
        ("+2h", 7_200_000_000_000),
        ("-1.5h", -5_400_000_000_000),
        ("1us", 1_000),
        ("1\u00b5s", 1_000),
        ("1\u03bcs", 1_000),
        ("3ns", 3),
        ("1.000000001s", 1_000_000_001),
        ("2562047h47m16.854775807s", (1 << 63) - 1),
    ],
)
def test_go_durations_that_parse(text: str, nanos: int) -> None:
    assert parse_go_duration_ns(text) == nanos
    assert parse_go_duration(text) == pytest.approx(nanos / 1e9)


@pytest.mark.parametrize(
    "text",
    ["", "3x", "1", "30", ".s", "s", "-", "+", "1 s", " 1s", "1s ", "1d", "1S", "1.2.3s", "1e3s",
     "2562047h47m16.854775808s", "9223372036854775808ns"],
)  # fmt: skip
def test_go_durations_that_fail(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration_ns(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (30, "30s"),
        (60, "1m0s"),
        (0.5, "500ms"),
        (1.5, "1.5s"),
        (3723.5, "1h2m3.5s"),
        (86400, "24h0m0s"),
        (0.000001, "1\u00b5s"),
        (0.0000015, "1.5\u00b5s"),
        (-90, "-1m30s"),
    ],
)
def test_go_duration_strings(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text
    assert parse_go_duration(text) == pytest.approx(seconds)
