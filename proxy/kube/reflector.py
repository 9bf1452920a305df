"""A list/watch reflector: keeps a local copy of one resource and reports every change.

One `Reflector` per resource, each running `run()` on its own thread:

1. List every page and replace the local store (key `namespace/name` -> raw object).
   Keys new to the store are reported with `on_add`, keys whose resourceVersion
   changed with `on_update(old, new)`, and every key that vanished with
   `on_delete(old)`: this sweep is what makes a relist after a 410 correct (kopf
   re-lists but never reports the objects deleted while its watch was down). After the
   first successful list, and only then, `on_synced()` is called, exactly once in the
   reflector's life: the proxy writes nothing before every resource it needs synced.
2. Watch from the list's resourceVersion with bookmarks. ADDED/MODIFIED/DELETED update
   the store and call the handler; BOOKMARK only advances the resourceVersion.
3. When the watch ends:
   - the server closed it (its `timeoutSeconds`, random in [300, 600] s as client-go
     picks it), or it broke, or nothing arrived within the read timeout (a silently
     dead connection): watch again from the last resourceVersion, no relist;
   - 410 Gone (`WatchExpired`): relist at once (the sweep above applies);
   - any other error (403, 500, connection refused, an ERROR event, a bug): one
     loud log line naming the resource and the error, exponential backoff with
     jitter (0.8 s doubling to 30 s, forgotten after 2 healthy minutes), relist.
   A watch that ends within a second without a single event is treated as an error
   too (client-go's rule), so a server that keeps refusing cannot make us spin.

Nothing the API does stops the thread; only `stop` does. An exception raised by the
handler is logged with the object's key and counted, and the reflector carries on
with the next object (the store is updated regardless): one bad object never stops
the others.

Concurrency: the handler is called only from the reflector's thread, one call at a
time, but different reflectors call their handlers from different threads, so a
handler shared with other code must be thread-safe. `stop()`, `has_synced()`,
`snapshot()` and `stats()` may be called from any thread. `run()` returns promptly
after `stop()` (which also closes the live watch); after only `stop.set()` on the
event given to `run()` it returns once the current read ends, within the read timeout
at worst (backoff waits notice the event at once).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.kube.backoff import Backoff, BackoffPolicy
from proxy.kube.listwatch import (
    DEFAULT_PAGE_SIZE,
    ListWatchClient,
    RawObject,
    ResourceRef,
    WatchDisconnected,
    WatchEvent,
    WatchExpired,
    WatchStream,
    WatchTimeout,
    list_all,
    object_key,
    resource_version,
)

__all__ = [
    "DEFAULT_READ_TIMEOUT",
    "EventHandler",
    "ListWatchClient",
    "Reflector",
    "ReflectorStats",
]

DEFAULT_READ_TIMEOUT = 90.0
"""Seconds of silence after which a watch is considered dead (bookmarks come ~60 s)."""

WATCH_TIMEOUT_RANGE = (300, 600)
"""Server-side watch timeout bounds in seconds; each watch picks one at random."""

MIN_HEALTHY_WATCH = 1.0
"""A watch that ends sooner than this with no event at all counts as a failure."""

# Slice of a backoff wait between looks at the `run()` event (which we cannot be
# woken by: it belongs to the caller and may be shared by several reflectors).
_STOP_POLL = 0.2


class EventHandler(Protocol):
    """Receives one resource's changes, from the reflector's thread (see module doc)."""

    def on_add(self, obj: RawObject) -> None: ...

    def on_update(self, old: RawObject, new: RawObject) -> None: ...

    def on_delete(self, obj: RawObject) -> None: ...

    def on_synced(self) -> None:
        """The first full list has been delivered; called once per reflector."""
        ...


@dataclass(frozen=True, slots=True)
class ReflectorStats:
    """Counters since the reflector was created (for metrics and tests)."""

    lists: int
    """Successful full lists (the first one included)."""
    watches: int
    """Watches started."""
    failures: int
    """Errors that caused a backoff."""
    handler_errors: int
    """Handler calls that raised."""
    skipped_objects: int
    """Objects without a name, ignored."""


class Reflector:
    """Lists then watches one resource and feeds a handler; see the module docstring."""

    def __init__(
        self,
        client: ListWatchClient,
        resource: ResourceRef,
        handler: EventHandler,
        *,
        label_selector: str = "",
        field_selector: str = "",
        name: str | None = None,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        watch_timeout_range: tuple[int, int] = WATCH_TIMEOUT_RANGE,
        page_size: int = DEFAULT_PAGE_SIZE,
        backoff: BackoffPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        rand: Callable[[], float] = random.random,
        store_transform: Callable[[RawObject], RawObject] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        """`sleep` waits between retries (default: a wait that `stop` interrupts);
        `clock` is monotonic seconds; `rand` returns [0, 1) for jitter and watch
        timeouts: all three exist for tests.

        `store_transform` decides what the store keeps of each object (default: all
        of it), e.g. `listwatch.metadata_only` to save memory. What it keeps is what
        `on_update` gets as `old` and `on_delete` gets for an object swept by a relist
        (a DELETED event hands over the object it carries); `on_add` and `new` are
        always the full object."""
        self.client = client
        self.resource = resource
        self.handler = handler
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.name = name or str(resource)
        self.read_timeout = read_timeout
        self.watch_timeout_range = watch_timeout_range
        self.page_size = page_size
        self.log = logger or logging.getLogger(__name__)
        self._clock = clock
        self._sleep = sleep or self._wait
        self._rand = rand
        self._keep = store_transform or _keep_whole
        self._backoff = Backoff(backoff or BackoffPolicy(), rand)

        self._lock = threading.Lock()  # guards the fields below shared with other threads
        self._store: dict[str, RawObject] = {}
        self._synced = False
        self._stream: WatchStream | None = None
        self._stopped = threading.Event()  # set by stop()
        self._run_stop: threading.Event | None = None  # the event given to run()
        self._lists = self._watches = self._failures = 0
        self._handler_errors = self._skipped = 0

        # Owned by the reflector thread.
        self._resource_version = ""
        self._version_from_list = False  # no event seen since the last list

    # -- any thread ------------------------------------------------------------------

    def has_synced(self) -> bool:
        """True once the first full list has been delivered to the handler."""
        with self._lock:
            return self._synced

    def stop(self) -> None:
        """Make `run()` return promptly: set the stop flag and close the live watch."""
        self._stopped.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()

    def snapshot(self) -> dict[str, RawObject]:
        """A copy of the store: key -> what it keeps of each object (shared, not copied)."""
        with self._lock:
            return dict(self._store)

    def stats(self) -> ReflectorStats:
        with self._lock:
            return ReflectorStats(
                self._lists, self._watches, self._failures, self._handler_errors, self._skipped
            )

    @property
    def resource_version(self) -> str:
        """The last resourceVersion seen (from a list, an event or a bookmark)."""
        return self._resource_version

    # -- the reflector thread ----------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """List and watch until `stop` is set or `stop()` is called. Never raises."""
        self._run_stop = stop
        self.log.info("%s: reflector starting", self.name)
        need_list = True
        while not self._stopping():
            try:
                if need_list:
                    if not self._list_and_replace():
                        continue
                    need_list = False
                need_list = self._watch_once()
            except Exception as err:
                # A bug of ours: the API's failures are handled where they happen, in
                # _list_and_replace and _watch_once. Whatever it is, never die.
                self.log.exception("%s: unexpected error in reflector", self.name)
                self._back_off("reflector", err)
                need_list = True
        self.log.info("%s: reflector stopped", self.name)

    def _stopping(self) -> bool:
        run_stop = self._run_stop
        return self._stopped.is_set() or (run_stop is not None and run_stop.is_set())

    def _wait(self, seconds: float) -> None:
        """The default sleep: returns early once stopping."""
        deadline = time.monotonic() + seconds
        while not self._stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._stopped.wait(min(remaining, _STOP_POLL))

    def _back_off(self, action: str, error: BaseException | str) -> None:
        delay = self._backoff.failure(self._clock())
        with self._lock:
            self._failures += 1
        self.log.error(
            "%s: %s failed: %s; retrying in %.1fs (the last known state is kept)",
            self.name,
            action,
            error,
            delay,
        )
        if not self._stopping():
            self._sleep(delay)

    def _list_and_replace(self) -> bool:
        """List everything and replace the store; False (after backing off) on failure.

        Objects reach the handler page by page as they arrive (only one page of
        decoded JSON is alive at a time); deletions are only reported once the whole
        list is in, since only then is it known what vanished.
        """
        with self._lock:
            previous = dict(self._store)
        relist = _Relist(self, previous)
        try:
            page = list_all(
                self.client,
                self.resource,
                label_selector=self.label_selector,
                field_selector=self.field_selector,
                page_size=self.page_size,
                should_stop=self._stopping,
                on_page=relist.page,
                on_restart=relist.restart,
            )
        except Exception as err:  # ApiError, WatchExpired twice, or a client bug
            self._back_off("list", err)
            return False
        if page.continue_ is not None:  # stopped between pages: not a full list
            return False
        relist.finish(page.resource_version)
        return True

    def _watch_once(self) -> bool:
        """One watch until it ends; returns whether a relist is needed."""
        low, high = self.watch_timeout_range
        timeout_seconds = low + int(self._rand() * (high - low + 1))
        started = self._clock()
        events = 0
        try:
            stream = self.client.watch(
                self.resource,
                resource_version=self._resource_version,
                label_selector=self.label_selector,
                field_selector=self.field_selector,
                timeout_seconds=min(timeout_seconds, high),
                allow_bookmarks=True,
                read_timeout=self.read_timeout,
            )
        except WatchExpired as err:
            return self._expired(err)
        except Exception as err:
            self._back_off("watch", err)
            return True
        with self._lock:
            self._stream = stream
            self._watches += 1
        try:
            if self._stopping():
                return False
            for event in stream:
                events += 1
                self._apply(event)
                if self._stopping():
                    return False
        except WatchExpired as err:
            return self._expired(err)
        except (WatchTimeout, WatchDisconnected) as err:
            if self._stopping():
                return False
            # No event at all for the read timeout is no proof of failure (a quiet
            # cluster, bookmarks disabled): watch again, the server will tell us
            # with a 410 if the resourceVersion is gone.
            self.log.info(
                "%s: %s; watching again from resourceVersion %s",
                self.name,
                err,
                self._resource_version,
            )
            return False
        except Exception as err:  # ApiError, WatchError, a client bug
            self._back_off("watch", err)
            return True
        finally:
            with self._lock:
                self._stream = None
            stream.close()
        if self._stopping():
            return False
        if events == 0 and self._clock() - started < MIN_HEALTHY_WATCH:
            self._back_off("watch", "the server closed it at once with no event")
            return True
        self.log.debug(
            "%s: watch closed by the server; watching again from resourceVersion %s",
            self.name,
            self._resource_version,
        )
        return False

    def _expired(self, err: WatchExpired) -> bool:
        if self._version_from_list:
            # 410 on a version fresh from a list: something is off; do not hammer
            # the server with relists.
            self._back_off("watch", err)
        else:
            self.log.info("%s: %s; listing again", self.name, err)
        return True

    def _apply(self, event: WatchEvent) -> None:
        version = event.resource_version
        if event.type == "BOOKMARK":
            if version:
                self._resource_version = version
                self._version_from_list = False
            return
        obj = event.object
        key = self._key(obj)
        if key is None:
            return
        if event.type in ("ADDED", "MODIFIED"):
            with self._lock:
                old = self._store.get(key)
                self._store[key] = self._keep(obj)
            if old is None:
                self._call("on_add", key, self.handler.on_add, obj)
            else:
                self._call("on_update", key, self.handler.on_update, old, obj)
        elif event.type == "DELETED":
            with self._lock:
                self._store.pop(key, None)
            # The event carries the object's last state: report that one.
            self._call("on_delete", key, self.handler.on_delete, obj)
        else:
            self.log.warning("%s: ignoring watch event of type %r", self.name, event.type)
        if version:
            self._resource_version = version
            self._version_from_list = False

    def _key(self, obj: RawObject) -> str | None:
        try:
            return object_key(obj)
        except ValueError as err:
            with self._lock:
                self._skipped += 1
            self.log.warning("%s: skipping an object: %s", self.name, err)
            return None

    def _call(self, what: str, key: str, method: Callable[..., None], *args: RawObject) -> None:
        try:
            method(*args)
        except Exception:
            with self._lock:
                self._handler_errors += 1
            self.log.exception(
                "%s: handler %s failed for %s; carrying on with the others",
                self.name,
                what,
                key or "(sync)",
            )


def _keep_whole(obj: RawObject) -> RawObject:
    return obj


class _Relist:
    """One list replacing a reflector's store, fed page by page (reflector thread only)."""

    def __init__(self, reflector: Reflector, previous: dict[str, RawObject]) -> None:
        self._reflector = reflector
        self._previous = previous
        self._fresh: dict[str, RawObject] = {}
        """What the store keeps of every object of this list."""
        self._told: dict[str, RawObject] = {}
        """Objects the handler was given during this relist that the old store lacked."""
        self.added = self.updated = 0

    def page(self, items: list[RawObject]) -> None:
        reflector = self._reflector
        handler = reflector.handler
        for obj in items:
            key = reflector._key(obj)
            if key is None:
                continue
            kept = reflector._keep(obj)
            told = self._told.get(key)
            old = self._previous.get(key) if told is None else told
            self._fresh[key] = kept
            if old is None:
                self.added += 1
                self._told[key] = kept
                reflector._call("on_add", key, handler.on_add, obj)
            elif resource_version(old) != resource_version(obj):
                self.updated += 1
                if told is not None or key not in self._previous:
                    self._told[key] = kept
                reflector._call("on_update", key, handler.on_update, old, obj)

    def restart(self) -> None:
        """The list starts over: what it gave so far may be gone from the new snapshot."""
        self._fresh.clear()

    def finish(self, version: str) -> None:
        reflector = self._reflector
        with reflector._lock:
            reflector._store = self._fresh
            reflector._lists += 1
        reflector._resource_version = version
        reflector._version_from_list = True
        gone = {
            key: obj
            for known in (self._previous, self._told)
            for key, obj in known.items()
            if key not in self._fresh
        }
        for key, obj in gone.items():
            reflector._call("on_delete", key, reflector.handler.on_delete, obj)
        reflector.log.info(
            "%s: listed %d objects at resourceVersion %s (%d new, %d changed, %d gone)",
            reflector.name,
            len(self._fresh),
            version,
            self.added,
            self.updated,
            len(gone),
        )
        with reflector._lock:
            first_sync, reflector._synced = not reflector._synced, True
        if first_sync:
            reflector._call("on_synced", "", reflector.handler.on_synced)
