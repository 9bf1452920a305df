"""Keeping a large, long-lived heap cheap: the cyclic GC and freed pages.

At 10k services the proxy holds a few million small objects (parsed Services and
EndpointSlices, the desired state) that live until their object changes and hold no
reference cycles. Python's cyclic garbage collector would walk all of them at every
full collection, hundreds of milliseconds each time, on the latency path of a sync.
`freeze_long_lived` moves everything alive into the GC's permanent generation before
a full sync; reference counting still frees those objects when they are replaced,
only the (pointless) cycle search over them stops. Before that, while the initial
lists fill the heap, `defer_collection` makes collections rare: measured at 10k
services, the collector otherwise took about a third of the list phase, each full
collection walking a heap that grows by a quarter between two of them.

A full sync at 10k services (and the initial list before it) allocates and frees
tens of MiB of short-lived objects. CPython returns its small-object arenas when they
empty, but glibc's malloc keeps freed pages of the heap unless they sit at its top,
so the process's RSS would stay near its peak for ever. `malloc_trim(0)` gives every
free page back (measured in-process at 10k x 10: RSS 144 -> 114 MiB). Called by the
proxier after a full sync; costs a few milliseconds; a no-op where the C library has
no `malloc_trim` (musl).

Safe from any thread: glibc locks its arenas itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_free_memory() -> bool:
    """Give free heap pages back to the system; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_START_THRESHOLDS = (100_000, 50, 100)
"""Collections while the heap is being filled: rare, yet not off (a long API outage at
start must not leak reference cycles for ever)."""


_USUAL_THRESHOLDS = gc.get_threshold()


def defer_collection() -> None:
    """Make the cyclic GC rare until `freeze_long_lived` (at start-up)."""
    gc.set_threshold(*_START_THRESHOLDS)


def freeze_long_lived() -> None:
    """Exempt every object alive now from the cyclic GC's scans (see the module doc),
    and end `defer_collection`."""
    gc.freeze()
    if gc.get_threshold() == _START_THRESHOLDS:
        gc.set_threshold(*_USUAL_THRESHOLDS)
