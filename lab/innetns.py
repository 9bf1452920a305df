"""Run a function on a thread that has entered a named network namespace.

The lab and the end-to-end tests use this to open sockets (the API server's listener,
probes) inside the lab's namespaces while their own threads stay in this process's.
It is the product's own helper, `proxy.kernel.netns.run_in_netns` (the health-check
node port servers use it the same way), re-exported under the lab's name.
"""

from __future__ import annotations

from proxy.kernel.netns import run_in_netns

__all__ = ["run_in_netns"]
