"""Rules for one scalar value: Go booleans, bounded integers, the masquerade bit, the proxy mode.

Each function takes the value as given (flag text, or an already-typed file value) and
returns it converted, or raises `BadValueError` naming only the problem; the caller adds
where the value came from (see `proxy.config.errors`). Pure; safe from any thread.
"""

from __future__ import annotations

import re
from typing import Literal, TypeVar

from proxy.config.errors import BadValueError

ProxyMode = Literal["iptables", "nftables", "ipvs"]
PROXY_MODES: tuple[ProxyMode, ...] = ("iptables", "nftables", "ipvs")
DEFAULT_PROXY_MODE: ProxyMode = "iptables"
"""What an empty mode means on Linux (upstream: "the best-available proxy, currently iptables")."""


def parse_bool(text: str) -> bool:
    """Go's `strconv.ParseBool`: 1, t, T, TRUE, true, True and their false spellings."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise BadValueError("is not a boolean (want true or false)")


def parse_int(text: str, *, low: int, high: int) -> int:
    """A decimal integer within [low, high]."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise BadValueError("is not an integer")
    value = int(text)
    if not low <= value <= high:
        raise BadValueError(f"must be within the range [{low}, {high}]")
    return value


_Number = TypeVar("_Number", int, float)


def non_negative(value: _Number) -> _Number:
    """`value` if it is 0 or more (upstream: "must be greater than or equal to 0")."""
    if value < 0:
        raise BadValueError("must be greater than or equal to 0")
    return value


def check_masquerade_bit(value: int) -> int:
    """The fwmark bit for masquerading: 0..31 (upstream validation)."""
    if not 0 <= value <= 31:
        raise BadValueError("must be within the range [0, 31]")
    return value


def check_proxy_mode(value: str) -> ProxyMode:
    """`""` means iptables on Linux; otherwise one of iptables, nftables, ipvs (case-sensitive)."""
    if value == "":
        return DEFAULT_PROXY_MODE
    if value in PROXY_MODES:
        return value
    raise BadValueError(
        f"is not a proxy mode (want one of {', '.join(PROXY_MODES)}, or empty for iptables)"
    )
