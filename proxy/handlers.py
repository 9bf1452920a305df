"""Watch-event handlers: raw API objects in, parsed values into the change tracker.

One handler per watched resource, each called from its own reflector thread. They
parse (`proxy.parse`), report bad input through `BadInput` (one log line naming the
object and a counter per reason), and hand the result to the thread-safe
`ChangeTracker` or the `Proxier`. They never touch the kernel and never raise for
bad input: one malformed object must not stop the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from proxy.changes import ChangeTracker
from proxy.model import NodeInfo, ServiceKey
from proxy.parse import Skipped, parse_node, parse_service, parse_slice

log = logging.getLogger(__name__)

RawObject = Mapping[str, Any]


class BadInput:
    """Logs each dropped piece of input once per event and counts it by resource and reason."""

    def __init__(self, resource: str, count: Callable[[str, str], None]) -> None:
        self._resource = resource
        self._count = count

    def __call__(self, reason: str, message: str) -> None:
        log.warning("skipping bad input: %s", message)
        self._count(self._resource, reason)


def _meta(obj: RawObject) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


class _TrackerHandler:
    """What the Service and EndpointSlice handlers share: an update is a fresh add."""

    resource = ""

    def __init__(
        self,
        tracker: ChangeTracker,
        on_synced: Callable[[], None],
        count_bad: Callable[[str, str], None],
    ) -> None:
        self._tracker = tracker
        self._on_synced = on_synced
        self._problems = BadInput(self.resource, count_bad)

    def on_add(self, obj: RawObject) -> None:
        raise NotImplementedError

    def on_update(self, _old: RawObject, new: RawObject) -> None:
        self.on_add(new)

    def on_synced(self) -> None:
        self._on_synced()


class ServiceHandler(_TrackerHandler):
    """Services -> tracker."""

    resource = "service"

    def on_add(self, obj: RawObject) -> None:
        parsed = parse_service(obj, self._problems)
        if isinstance(parsed, Skipped):
            if parsed.error:
                log.warning("service %s not programmed: %s", parsed.key, parsed.reason)
            self._tracker.set_service(parsed.key, None)
        else:
            self._tracker.set_service(parsed.key, parsed)

    def on_delete(self, obj: RawObject) -> None:
        self._tracker.set_service(ServiceKey(*_meta(obj)), None)


class SliceHandler(_TrackerHandler):
    """EndpointSlices -> tracker."""

    resource = "endpointslice"

    def on_add(self, obj: RawObject) -> None:
        namespace, name = _meta(obj)
        self._tracker.set_slice(namespace, name, parse_slice(obj, self._problems))

    def on_delete(self, obj: RawObject) -> None:
        namespace, name = _meta(obj)
        self._tracker.set_slice(namespace, name, None)


class NodeHandler:
    """This node's Node object -> proxier (addresses, zone) and health (eligibility)."""

    def __init__(self, on_node: Callable[[NodeInfo], None]) -> None:
        self._on_node = on_node

    def on_add(self, obj: RawObject) -> None:
        self._on_node(parse_node(obj))

    def on_update(self, _old: RawObject, new: RawObject) -> None:
        self.on_add(new)

    def on_delete(self, obj: RawObject) -> None:
        info = parse_node(obj)
        # A deleted Node is as ineligible as one being deleted.
        self._on_node(NodeInfo(info.name, info.addresses, info.zone, info.labels, eligible=False))

    def on_synced(self) -> None:
        """The Node is not required for syncing: nothing to do."""
