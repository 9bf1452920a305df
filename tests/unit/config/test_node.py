"""The node name: override, then $NODE_NAME, then the host name; always a valid Node name."""

from __future__ import annotations

import pytest

from proxy.config.errors import ConfigError
from proxy.config.node import resolve_node_name


def test_node_name_prefers_override_then_env_then_hostname() -> None:
    assert resolve_node_name("node-a", {"NODE_NAME": "node-b"}, lambda: "host") == "node-a"
    assert resolve_node_name(None, {"NODE_NAME": " Node-B "}, lambda: "host") == "node-b"
    assert resolve_node_name(None, {}, lambda: "Host.Example ") == "host.example"
    with pytest.raises(ConfigError, match="NODE_NAME is set but empty"):
        resolve_node_name(None, {"NODE_NAME": "  "}, lambda: "host")
    with pytest.raises(ConfigError, match=r"'\$\(node_name\)' \(from NODE_NAME\)"):
        resolve_node_name(None, {"NODE_NAME": "$(NODE_NAME)"}, lambda: "host")
    with pytest.raises(ConfigError, match="--hostname-override"):
        resolve_node_name(None, {}, lambda: "")
