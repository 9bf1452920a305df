"""Run a function on a thread that has entered a named network namespace.

A socket belongs to the namespace it was created in, whatever thread uses it later.
The lab and the end-to-end tests use this to open the API server's listening socket
inside the lab's node namespace (where the real proxy process runs) while the API
server's own threads keep running in this process. `setns(2)` changes only the
calling thread, so the work happens on a throw-away thread and this process's other
threads never leave their namespace.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000


def run_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Call `fn` on a new thread inside network namespace `netns` and return its result."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
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
