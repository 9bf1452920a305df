"""Which Node this proxy serves: `--hostname-override`, else `$NODE_NAME`, else the host name.

Upstream uses the override or the host name; `NODE_NAME` (set from `spec.nodeName`
through the downward API in most DaemonSets) is our addition so that a manifest without
`--hostname-override` still finds its Node. Every source is trimmed and lower-cased, and
the result must be a valid Node name (an RFC 1123 subdomain): a manifest that passes the
literal `$(NODE_NAME)` fails at start with a message naming the source, not later with
a Node that never appears. Pure apart from the injectable `gethostname`.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping

from proxy.config.errors import BadValueError, ConfigError

NODE_NAME_ENV = "NODE_NAME"


def normalize_hostname(text: str) -> str:
    """Trimmed and lower-cased, as upstream's `GetHostname`; `BadValueError` when empty."""
    name = text.strip().lower()
    if not name:
        raise BadValueError("is empty")
    return name


def resolve_node_name(
    hostname_override: str | None,
    environ: Mapping[str, str],
    gethostname: Callable[[], str] = socket.gethostname,
) -> str:
    """This node's name: the override, else `$NODE_NAME`, else the host name; lower-cased."""
    if hostname_override:
        return _valid_node_name(hostname_override, "--hostname-override")
    if NODE_NAME_ENV in environ:
        from_env = environ[NODE_NAME_ENV].strip()
        if not from_env:
            raise ConfigError(
                f"{NODE_NAME_ENV} is set but empty: set it from spec.nodeName "
                "(the downward API) or pass --hostname-override"
            )
        return _valid_node_name(from_env.lower(), NODE_NAME_ENV)
    try:
        return _valid_node_name(normalize_hostname(gethostname()), "the host name")
    except BadValueError:
        raise ConfigError(
            "cannot tell the node name: the host name is empty; "
            "pass --hostname-override or set NODE_NAME"
        ) from None


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _valid_node_name(name: str, source: str) -> str:
    """`name` if it can name a Node (an RFC 1123 subdomain), else a ConfigError naming it."""
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise ConfigError(
            f"node name {name!r} (from {source}) is not a valid Kubernetes node name "
            "(lower-case RFC 1123 subdomain); is NODE_NAME set from spec.nodeName?"
        )
    return name
