"""The seam between the reflector and the API server: values, errors and one Protocol.

`ListWatchClient` is all a `Reflector` needs from the API: one page of a list, and a
stream of watch events. `proxy.kube.client.RawApi` implements it over HTTP with the
official client doing the authentication; tests implement it with a scripted fake.

Objects travel as the raw JSON dicts the server sent (`RawObject`), never as the
`kubernetes` client's model classes: decoding 10k objects into models costs seconds of
CPU, and the handlers read a handful of fields anyway.

Errors are ours, not urllib3's or the client's, so the reflector can decide per kind:

- `WatchExpired`: 410 Gone (a watch's resourceVersion or a list's continue token was
  compacted away): relist.
- `WatchTimeout`: no byte arrived within the read timeout (a silently dead
  connection, or a server that stopped sending bookmarks): watch again.
- `WatchDisconnected`: the connection broke in the middle of a watch: watch again.
- `ApiError`: the request failed (HTTP 403 / 500, connection refused, TLS): back off,
  relist.
- `WatchError`: the server ended a watch with an ERROR event other than 410: back
  off, relist.

Nothing here blocks or holds state; `list_all` blocks on the client it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

RawObject = dict[str, Any]
"""One API object as decoded JSON (`{"metadata": {...}, "spec": {...}, ...}`)."""

DEFAULT_PAGE_SIZE = 500
"""Objects per list page, as client-go's reflector asks for."""

MAX_LIST_RESTARTS = 3
"""How often `list_all` starts over after an expired continue token before giving up."""


@dataclass(frozen=True, slots=True)
class ResourceRef:
    """Which collection to list and watch: `/api/v1/services`, `/apis/G/V/plural`."""

    group: str
    """API group; "" for the core group."""
    version: str
    plural: str
    namespaced: bool
    """Namespaced objects are keyed `namespace/name`, cluster-scoped ones `name`."""

    @property
    def path(self) -> str:
        """The cluster-wide collection path (all namespaces)."""
        if self.group:
            return f"/apis/{self.group}/{self.version}/{self.plural}"
        return f"/api/{self.version}/{self.plural}"

    def __str__(self) -> str:
        # kubectl's spelling: "services", "endpointslices.discovery.k8s.io".
        return f"{self.plural}.{self.group}" if self.group else self.plural


SERVICES = ResourceRef("", "v1", "services", namespaced=True)
ENDPOINTSLICES = ResourceRef("discovery.k8s.io", "v1", "endpointslices", namespaced=True)
NODES = ResourceRef("", "v1", "nodes", namespaced=False)


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of a list response."""

    items: list[RawObject]
    resource_version: str
    """The collection's resourceVersion: watch from here to miss nothing."""
    continue_: str | None
    """Token for the next page; None on the last page."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One watch event: ADDED, MODIFIED, DELETED or BOOKMARK (ERROR becomes an exception)."""

    type: str
    object: RawObject

    @property
    def resource_version(self) -> str:
        return resource_version(self.object)


class KubeError(Exception):
    """Base of every error this package raises."""


class ConfigError(KubeError):
    """No usable API server configuration (kubeconfig, in-cluster or --master)."""


class ApiError(KubeError):
    """A request failed: an HTTP error status, or no response at all (`status` 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        where = f"HTTP {status}" if status else "no response"
        super().__init__(f"{where} {reason}: {message}" if message else f"{where} {reason}")


class WatchExpired(KubeError):  # noqa: N818 (reads as a condition)
    """410 Gone: the resourceVersion or continue token is too old; relist."""


class WatchError(KubeError):
    """The server ended a watch with an ERROR event (other than 410) or sent garbage."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        self.code = code
        self.reason = reason
        self.message = message
        super().__init__(f"watch error {code} {reason}: {message}")


class WatchTimeout(KubeError):  # noqa: N818 (reads as a condition)
    """Nothing arrived within the read timeout: the connection may be dead."""


class WatchDisconnected(KubeError):  # noqa: N818 (reads as a condition)
    """The connection broke in the middle of a watch."""


class WatchStream(Iterator[WatchEvent], Protocol):
    """Events as they arrive; iteration ends when the server closes the watch.

    `close()` may be called from any thread, also while another thread is blocked
    waiting for the next event: it then ends that iteration promptly (no exception).
    """

    def close(self) -> None: ...


class ListWatchClient(Protocol):
    """What a reflector needs from the API server. Safe to share between threads."""

    def list(
        self,
        resource: ResourceRef,
        *,
        label_selector: str = "",
        field_selector: str = "",
        limit: int = DEFAULT_PAGE_SIZE,
        continue_: str | None = None,
    ) -> ListPage:
        """One page, always read from the current state (no resourceVersion).

        Raises `WatchExpired` when `continue_` expired, `ApiError` otherwise.
        """
        ...

    def watch(
        self,
        resource: ResourceRef,
        *,
        resource_version: str,
        label_selector: str = "",
        field_selector: str = "",
        timeout_seconds: int,
        allow_bookmarks: bool = True,
        read_timeout: float | None = None,
    ) -> WatchStream:
        """Start a watch; raises `ApiError`/`WatchExpired` if it cannot start.

        Iterating the stream raises `WatchExpired`, `WatchError`, `WatchTimeout` or
        `WatchDisconnected`; `read_timeout` None means the client's default.
        """
        ...


def resource_version(obj: RawObject) -> str:
    """`metadata.resourceVersion`, or "" when missing."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return ""
    return str(meta.get("resourceVersion") or "")


def metadata_only(obj: RawObject) -> RawObject:
    """What a store needs to key, compare and report a deletion: identity and version.

    For `Reflector(store_transform=...)`: 10k EndpointSlices as full decoded JSON take
    about 70 MiB; this keeps a few hundred bytes each (labels included, managedFields
    and the spec not).
    """
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return {"metadata": {}}
    kept = ("name", "namespace", "uid", "resourceVersion", "labels")
    return {"metadata": {field: meta[field] for field in kept if field in meta}}


def object_key(obj: RawObject) -> str:
    """`namespace/name` (or `name` for cluster-scoped objects); ValueError without a name."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        raise ValueError("object has no metadata.name")
    namespace = meta.get("namespace")
    return f"{namespace}/{meta['name']}" if namespace else str(meta["name"])


def list_all(
    client: ListWatchClient,
    resource: ResourceRef,
    *,
    label_selector: str = "",
    field_selector: str = "",
    page_size: int = DEFAULT_PAGE_SIZE,
    should_stop: Callable[[], bool] = lambda: False,
    on_page: Callable[[list[RawObject]], None] | None = None,
    on_restart: Callable[[], None] = lambda: None,
) -> ListPage:
    """Every page of a list, joined: one consistent snapshot and its resourceVersion.

    An expired continue token (the server compacted the snapshot between pages)
    restarts the list from the first page, up to `MAX_LIST_RESTARTS` times; pages of
    different snapshots must never be mixed. Returns early (a partial, unusable page
    with `continue_` set) when `should_stop()` turns true between pages.

    With `on_page`, each page's items are handed over as they arrive and not kept
    (the returned page has no items): at 10k EndpointSlices the decoded JSON of a
    whole list is about 70 MiB, of one page 4 MiB. `on_restart` is called before the
    list starts again from the first page, so the caller can forget what it was given.
    """
    restarts = 0
    while True:
        items: list[RawObject] = []
        continue_: str | None = None
        try:
            while True:
                page = client.list(
                    resource,
                    label_selector=label_selector,
                    field_selector=field_selector,
                    limit=page_size,
                    continue_=continue_,
                )
                if on_page is None:
                    items.extend(page.items)
                else:
                    on_page(page.items)
                continue_ = page.continue_
                if not continue_:
                    return ListPage(items, page.resource_version, None)
                if should_stop():
                    return ListPage(items, page.resource_version, continue_)
        except WatchExpired:
            if continue_ is None or restarts >= MAX_LIST_RESTARTS:
                raise
            restarts += 1
            log.info("%s: list continue token expired; listing again from the start", resource)
            on_restart()
