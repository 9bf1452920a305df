"""Run a function on a thread that has entered a named network namespace.

A socket belongs to the namespace it was created in, whatever thread uses it later.
The proxy runs in the node's namespace and never needs this; a backend configured
with `BackendConfig.netns` (tests, the lab) does, so that what the core opens next to
it (the health-check node port sockets) lives in the same namespace. `setns(2)`
changes only the calling thread, so the work runs on a throw-away thread and this
process's other threads never leave their namespace.

Concurrency: callable from any thread; blocks until `fn` returns on its own thread.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """`fn()` inside network namespace `netns` (None: right here, in the caller's)."""
    if netns is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(os.path.join(NETNS_RUN_DIR, netns), os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as err:  # re-raised on the caller's thread
            error.append(err)

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
