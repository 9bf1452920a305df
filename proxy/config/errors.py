"""How a bad setting is reported: `ConfigError` naming where the value came from, and the value.

Every rule in `proxy.config` that looks at one value raises `BadValueError` with only the
problem ("is not a duration"); the caller, who knows where the value came from (a flag
such as `--iptables-sync-period`, or a field path inside the config file), turns it into
a `ConfigError` with `invalid(where, value, problem)`:

    --iptables-sync-period: "3x" is not a duration (want e.g. "30s", ...)
    /etc/kube-proxy/config.conf: iptables.syncPeriod: "3x" is not a duration (...)

The value is quoted as Go's `%q` would quote it (JSON for other types), so an empty or
blank value stays visible. Pure; safe from any thread.
"""

from __future__ import annotations

import json


class ConfigError(ValueError):
    """A flag, config file or setting is wrong; the message names where and what."""


class BadValueError(ValueError):
    """A value rule failed; `str()` is the problem, the caller adds where and what."""


def invalid(where: str, value: object, problem: str) -> ConfigError:
    """`ConfigError` for one value: `where: "value" problem` (the value quoted as Go's %q)."""
    return ConfigError(f"{where}: {quote(value)} {problem}")


def quote(value: object) -> str:
    """`value` as it appears in messages: strings JSON-quoted, others as JSON."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, default=str)
