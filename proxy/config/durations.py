"""Go durations, as kube-proxy's flags and `metav1.Duration` fields spell them.

`parse_go_duration` accepts exactly what Go's `time.ParseDuration` accepts ("30s",
"1m0s", "1h2m3.5s", ".5s", "-1.5h", the bare "0") and `format_go_duration` prints what
Go's `Duration.String()` prints ("1m0s", "500ms"), so a value read and written back
looks the way kube-proxy would have written it. Values are seconds as `float`;
`parse_go_duration_ns` gives the exact integer nanoseconds Go works with.

Pure functions; safe from any thread.
"""

from __future__ import annotations

import re

from proxy.config.errors import BadValueError

_NANOS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek small letter mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_MAX_NANOS = (1 << 63) - 1
DURATION_HINT = 'is not a duration (want e.g. "30s", "1m0s", "500ms")'
"""The problem reported for a value that is not a Go duration."""

# One term: digits, an optional fraction, then a unit (anything up to the next digit or dot).
_DURATION_TERM = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]+)")


def parse_go_duration_ns(text: str) -> int:
    """Go's `time.ParseDuration`, to integer nanoseconds; `ValueError` when it would fail.

    Accepts exactly what Go accepts: an optional sign, then one or more
    `<decimal><unit>` terms with units ns, us (or µs), ms, s, m, h, e.g. "1h2m3.5s",
    ".5s", "-1.5h"; the bare "0" is the only unit-less value. Spaces, empty input,
    unknown units and out-of-range values (beyond about 292 years) are refused.
    """
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    while rest:
        match = _DURATION_TERM.match(rest)
        if match is None:
            raise ValueError(f"invalid duration {text!r}")
        whole, fraction, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not fraction:
            raise ValueError(f"invalid duration {text!r}")
        if unit not in _NANOS:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        scale = _NANOS[unit]
        value = int(whole or "0") * scale
        if fraction:
            # Go keeps the digits that fit in int64 and adds them through a float.
            digits = fraction[:18]
            value += int(int(digits) * (scale / 10 ** len(digits)))
        total += value
        if total > _MAX_NANOS + (1 if negative else 0):
            raise ValueError(f"invalid duration {text!r}")
        rest = rest[match.end() :]
    return -total if negative else total


def parse_go_duration(text: str) -> float:
    """Go's `time.ParseDuration` in seconds (see `parse_go_duration_ns`)."""
    return parse_go_duration_ns(text) / 1e9


def format_go_duration(seconds: float) -> str:
    """Go's `time.Duration.String()`: 30 -> "30s", 60 -> "1m0s", 0.5 -> "500ms", 0 -> "0s"."""
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    u = abs(nanos)
    if u < 1_000_000_000:
        for unit, scale in (("ns", 1), ("\u00b5s", 1_000), ("ms", 1_000_000)):
            if u < scale * 1000:
                return f"{sign}{_fraction(u, scale)}{unit}"
    secs = _fraction(u % 60_000_000_000, 1_000_000_000)
    minutes = u // 60_000_000_000
    if minutes == 0:
        return f"{sign}{secs}s"
    hours, minutes = divmod(minutes, 60)
    head = f"{hours}h" if hours else ""
    return f"{sign}{head}{minutes}m{secs}s"


def _fraction(value: int, scale: int) -> str:
    whole, part = divmod(value, scale)
    if part == 0:
        return str(whole)
    width = len(str(scale)) - 1
    return f"{whole}.{str(part).rjust(width, '0').rstrip('0')}"


def duration_value(text: str) -> float:
    """A Go duration in seconds, or `BadValueError` with a hint of the accepted form."""
    try:
        return parse_go_duration(text)
    except ValueError:
        raise BadValueError(DURATION_HINT) from None
