"""The lab API double's storage: objects, one resourceVersion counter, history, watchers.

What it promises, because clients of the real API depend on it:

- One global counter; every write (create, update, patch, delete, a finalizer-held
  delete) bumps it by one and stamps the object's `metadata.resourceVersion` (a
  string of the integer). Lists carry the counter as the collection's version.
- Optimistic concurrency: an update whose `metadata.resourceVersion` is not the
  stored one is 409 Conflict; a no-op update writes nothing and bumps nothing.
- A bounded history per resource (`history_size` events at least): a watch from a
  resourceVersion replays every later event, so list-then-watch loses nothing; a
  version older than the window is 410 Expired. `compact()` forgets all history and
  every pagination snapshot, so every resume and every `continue` is 410.
- Watch events are filtered per watcher like the real watch cache does: an object
  that stops matching the selectors is sent as DELETED (its previous content with
  the new resourceVersion), one that starts matching as ADDED.
- Paginated lists are consistent: the first page takes a snapshot of the matching
  objects; `continue` tokens page through it (a bounded number of snapshots is kept;
  an evicted one is 410 Expired, as etcd compaction makes it on a real server).
- Fields the real decoder does not know are dropped (`strict`: 400, as with
  `fieldValidation=Strict`); `validate=False` writes store the object as given, for
  tests that need what the real API would refuse or keep to itself.
- Deleting an object with `metadata.finalizers` only sets `deletionTimestamp`; the
  update that removes the last finalizer deletes it. Deleting a namespace deletes
  everything in it.

Performance: every stored object is kept with its JSON encoding (`StoredObject.raw`),
made once per write, so a list or a watch event is a join of cached bytes, never a
copy or an encode per request; in-process readers get fresh decoded dicts.

Concurrency: one re-entrant lock guards everything. Writers take it, commit, and
hand each event to every open watcher's queue before releasing it, so a watcher sees
events in resourceVersion order and a bookmark queued under the lock is never ahead
of an event. Nothing under the lock blocks on I/O: watchers' queues are unbounded
deques drained by the HTTP threads. Change listeners (`subscribe`) are called after
the lock is released, on the writing thread, in that thread's commit order; two
threads' notifications may interleave, so a listener must re-read the state it
needs (level-triggered), which also makes it safe for a listener to write.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from lab import apierrors as errs
from lab.apierrors import ApiStatusError, FieldError
from lab.apipatch import APPLY_PATCH, MERGE_PATCH, PatchError, apply_patch
from lab.apiservices import ServiceAdmission
from lab.apitypes import (
    RESOURCES,
    Admission,
    EndpointSliceAdmission,
    NamespaceAdmission,
    NoAdmission,
    NodeAdmission,
    ResourceType,
    selectable_fields,
    unknown_fields,
    validate_metadata,
)
from lab.selectors import (
    FieldSelector,
    LabelSelector,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)

__all__ = [
    "DEFAULT_HISTORY_SIZE",
    "DEFAULT_SERVICE_CIDR",
    "Change",
    "ListResult",
    "QueuedEvent",
    "Store",
    "StoreChange",
    "StoredObject",
    "Watcher",
    "rfc3339_now",
]

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]
"""(namespace, name); namespace "" for cluster-scoped objects."""

DEFAULT_SERVICE_CIDR = "198.19.0.0/16"
DEFAULT_HISTORY_SIZE = 10_000
MAX_SNAPSHOTS = 64
"""Paginated lists whose continue tokens stay valid at the same time."""
SEED_NAMESPACES = ("default", "kube-node-lease", "kube-public", "kube-system")
UNDELETABLE_NAMESPACES = frozenset(("default", "kube-public", "kube-system"))
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the real apiserver's


def rfc3339_now(clock: Callable[[], float] = time.time) -> str:
    """`2024-05-01T12:00:00Z`: how the API writes creation and deletion timestamps."""
    return datetime.fromtimestamp(clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _encode(obj: Obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _copy(obj: Any) -> Any:
    """A private deep copy that also proves the value is plain JSON."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as err:
        raise errs.bad_request(f"the object is not valid JSON: {err}") from err


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object version as stored. `obj` is shared and must never be modified."""

    key: Key
    rv: int
    obj: Obj
    raw: bytes
    labels: Mapping[str, str]
    fields: Mapping[str, str]

    def decoded(self) -> Obj:
        """A fresh copy the caller may modify."""
        result: Obj = json.loads(self.raw)
        return result


@dataclass(frozen=True, slots=True)
class Change:
    """One committed write, as kept in the history."""

    rv: int
    type: str
    """ADDED, MODIFIED or DELETED."""
    current: StoredObject
    """The new version; for DELETED the last version restamped with the deletion's rv."""
    previous: StoredObject | None


@dataclass(frozen=True, slots=True)
class StoreChange:
    """What a change listener receives (see `Store.subscribe`)."""

    type: str
    resource: str
    namespace: str
    name: str
    object: Obj
    """A copy of the new version (for DELETED, the last one)."""


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    """One event waiting in a watcher's queue."""

    type: str
    """ADDED, MODIFIED, DELETED or BOOKMARK."""
    stored: StoredObject | None
    """None for a BOOKMARK."""
    rv: int
    initial_events_end: bool = False
    """A BOOKMARK closing `sendInitialEvents`: carries the `k8s.io/initial-events-end`."""


ChangeLog = list[Change]
"""The changes one call committed, to notify listeners about once the lock is released."""
StoredList = list[StoredObject]
ObjList = list[Obj]
Listeners = list[Callable[[StoreChange], None]]
FieldErrors = list[FieldError]
WatcherList = list["Watcher"]


@dataclass(frozen=True, slots=True)
class ListResult:
    items: list[StoredObject]
    resource_version: int
    continue_token: str | None
    remaining: int | None


@dataclass
class _Collection:
    rt: ResourceType
    admission: Admission
    objects: dict[Key, StoredObject] = field(default_factory=dict)
    history: list[Change] = field(default_factory=list)
    floor: int = 0
    """Every event with rv > floor is in `history`; older resumes are 410."""
    watchers: set[Watcher] = field(default_factory=set)
    _sorted: list[Key] | None = None

    def sorted_keys(self) -> list[Key]:
        if self._sorted is None:
            self._sorted = sorted(self.objects)
        return self._sorted

    def keys_changed(self) -> None:
        self._sorted = None


class Watcher:
    """One open watch: a filtered, ordered queue of events plus the fault switches.

    The store appends under its lock (`offer`); exactly one HTTP thread drains it
    (`next_events`). Faults (`expire`, `stall`, `drop`, `stop`) are set from any thread.
    """

    def __init__(
        self,
        store: Store,
        rt: ResourceType,
        namespace: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
    ) -> None:
        self.store = store
        self.rt = rt
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[QueuedEvent] = deque()
        self._fault: str | None = None

    def matches(self, stored: StoredObject) -> bool:
        if self.namespace is not None and stored.key[0] != self.namespace:
            return False
        return self.labels.matches(stored.labels) and self.fields.matches(stored.fields)

    def enqueue(self, event: QueuedEvent) -> None:
        with self._cond:
            self._queue.append(event)
            self._cond.notify()

    def offer(self, change: Change) -> None:
        """Filter one change the way the real watch cache does (store lock held)."""
        now_matches = change.type != "DELETED" and self.matches(change.current)
        was_matching = change.previous is not None and self.matches(change.previous)
        if change.type == "DELETED":
            if was_matching:
                self.enqueue(QueuedEvent("DELETED", change.current, change.rv))
        elif now_matches and was_matching:
            self.enqueue(QueuedEvent("MODIFIED", change.current, change.rv))
        elif now_matches:
            self.enqueue(QueuedEvent("ADDED", change.current, change.rv))
        elif was_matching:
            assert change.previous is not None
            gone = self.store.restamp(change.previous, change.rv)
            self.enqueue(QueuedEvent("DELETED", gone, change.rv))

    def set_fault(self, fault: str) -> None:
        """`expire` (send 410 and end), `stall` (write nothing more), `drop` (reset the
        connection), `stop` (server shutting down: reset)."""
        with self._cond:
            if self._fault in (None, "stall") or fault == "stop":
                self._fault = fault
            self._cond.notify_all()

    @property
    def fault(self) -> str | None:
        with self._cond:
            return self._fault

    def next_events(self, timeout: float) -> list[QueuedEvent]:
        """Queued events, waiting up to `timeout` for one; [] on timeout or a fault."""
        with self._cond:
            if not self._queue and self._fault is None:
                self._cond.wait(timeout)
            if self._fault is not None:
                return []
            events = list(self._queue)
            self._queue.clear()
            return events

    def wait_fault(self, timeout: float) -> str | None:
        """Block until a fault other than `stall` is set, or `timeout` passes."""
        with self._cond:
            if self._fault in (None, "stall"):
                self._cond.wait(timeout)
            return self._fault

    def close(self) -> None:
        self.store.unregister(self)


def _token(snapshot_id: int, offset: int, rv: int) -> str:
    doc = {"v": "meta.k8s.io/v1", "rv": rv, "snap": snapshot_id, "off": offset}
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()


def _untoken(token: str) -> tuple[int, int]:
    try:
        doc = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(doc["snap"]), int(doc["off"])
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        raise errs.bad_request(f"invalid continue token: {err}") from err


_EXPIRED_CONTINUE = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter, or use the continue token "
    "in this response to retrieve the remainder of the results. Continuing with the "
    "provided token results in an inconsistent list - objects that were created, "
    "modified, or deleted between the time the first chunk was returned and now may "
    "show up in the list."
)


class Store:
    """Thread-safe in-memory API storage; see the module docstring."""

    def __init__(
        self,
        *,
        service_cidr: str = DEFAULT_SERVICE_CIDR,
        node_port_range: tuple[int, int] = (30000, 32767),
        history_size: int = DEFAULT_HISTORY_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        self._lock = threading.RLock()
        self._rv = 0
        self._clock = clock
        self.history_size = history_size
        self.services = ServiceAdmission(service_cidr.split(","), node_port_range)
        admissions: dict[str, Admission] = {
            "services": self.services,
            "namespaces": NamespaceAdmission(),
            "nodes": NodeAdmission(),
            "endpointslices": EndpointSliceAdmission(),
        }
        self._collections = {
            plural: _Collection(rt, admissions.get(plural, NoAdmission()))
            for plural, rt in RESOURCES.items()
        }
        self._snapshots: OrderedDict[int, tuple[StoredList, int]] = OrderedDict()
        self._next_snapshot = 1
        self._listeners: Listeners = []
        for name in SEED_NAMESPACES:
            self.create("namespaces", {"metadata": {"name": name}})

    # -- small helpers ---------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def resource_type(self, resource: str) -> ResourceType:
        return self._collection(resource).rt

    def _collection(self, resource: str) -> _Collection:
        coll = self._collections.get(resource)
        if coll is None:
            raise errs.ApiStatusError(
                errs.status_object(
                    404,
                    "NotFound",
                    f"the server could not find the requested resource ({resource})",
                )
            )
        return coll

    def _key(self, rt: ResourceType, namespace: str | None, name: str) -> Key:
        return ((namespace or "default") if rt.namespaced else "", name)

    def now(self) -> str:
        return rfc3339_now(self._clock)

    def _freeze(self, rt: ResourceType, key: Key, obj: Obj, rv: int) -> StoredObject:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
        return StoredObject(key, rv, obj, _encode(obj), labels or {}, selectable_fields(rt, obj))

    def restamp(self, stored: StoredObject, rv: int) -> StoredObject:
        """`stored` with another resourceVersion (a new object; the original is shared)."""
        obj = dict(stored.obj)
        obj["metadata"] = {**stored.obj["metadata"], "resourceVersion": str(rv)}
        coll = self._collection(self._plural_of(stored.obj))
        return self._freeze(coll.rt, stored.key, obj, rv)

    def _plural_of(self, obj: Obj) -> str:
        kind = obj.get("kind")
        return next(rt.plural for rt in RESOURCES.values() if rt.kind == kind)

    def subscribe(self, listener: Callable[[StoreChange], None]) -> Callable[[], None]:
        """Call `listener` after every committed write (see module doc); returns unsubscribe."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def _notify(self, changes: ChangeLog) -> None:
        with self._lock:
            listeners = list(self._listeners)
        if not listeners or not changes:
            return
        for change in changes:
            notice = StoreChange(
                change.type,
                self._plural_of(change.current.obj),
                change.current.key[0],
                change.current.key[1],
                change.current.decoded(),
            )
            for listener in listeners:
                try:
                    listener(notice)
                except Exception:
                    log.exception("store change listener failed on %s", notice.name)

    def _commit(
        self,
        coll: _Collection,
        kind: str,
        *,
        key: Key,
        obj: Obj | None,
        previous: StoredObject | None,
        changes: ChangeLog,
    ) -> StoredObject:
        """Bump the counter, stamp, store, record history, feed the watchers."""
        self._rv += 1
        rv = self._rv
        if kind == "DELETED":
            assert previous is not None
            if obj is None:
                stored = self.restamp(previous, rv)
            else:
                obj["metadata"]["resourceVersion"] = str(rv)
                stored = self._freeze(coll.rt, key, obj, rv)
            del coll.objects[key]
            coll.keys_changed()
        else:
            assert obj is not None
            obj["metadata"]["resourceVersion"] = str(rv)
            stored = self._freeze(coll.rt, key, obj, rv)
            if key not in coll.objects:
                coll.keys_changed()
            coll.objects[key] = stored
        change = Change(rv, kind, stored, previous)
        coll.history.append(change)
        if len(coll.history) > 2 * self.history_size:
            dropped = len(coll.history) - self.history_size
            coll.floor = coll.history[dropped - 1].rv
            del coll.history[:dropped]
        for watcher in coll.watchers:
            watcher.offer(change)
        changes.append(change)
        return stored

    # -- reads -----------------------------------------------------------------------------

    def get(self, resource: str, name: str, *, namespace: str | None = None) -> Obj:
        return self.get_stored(resource, name, namespace=namespace).decoded()

    def get_stored(self, resource: str, name: str, *, namespace: str | None = None) -> StoredObject:
        with self._lock:
            coll = self._collection(resource)
            stored = coll.objects.get(self._key(coll.rt, namespace, name))
            if stored is None:
                raise errs.not_found(coll.rt.plural, coll.rt.group, name)
            return stored

    def list(
        self,
        resource: str,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> ObjList:
        """Every matching object (fresh copies), sorted by namespace and name."""
        result = self.list_stored(
            resource,
            namespace=namespace,
            label_selector=label_selector,
            field_selector=field_selector,
        )
        return [stored.decoded() for stored in result.items]

    def parse_selectors(
        self, rt: ResourceType, label_selector: str, field_selector: str
    ) -> tuple[LabelSelector, FieldSelector]:
        try:
            return (
                parse_label_selector(label_selector),
                parse_field_selector(field_selector, rt.supported_fields),
            )
        except SelectorError as err:
            raise errs.bad_request(str(err)) from err

    def _matching(
        self, coll: _Collection, namespace: str | None, labels: LabelSelector, fields: FieldSelector
    ) -> StoredList:
        name = fields.exact("metadata.name")
        if name is not None and (namespace is not None or not coll.rt.namespaced):
            stored = coll.objects.get(self._key(coll.rt, namespace, name))
            candidates: Iterable[StoredObject] = [stored] if stored is not None else []
        else:
            candidates = (coll.objects[key] for key in coll.sorted_keys())
        return [
            stored
            for stored in candidates
            if (namespace is None or stored.key[0] == namespace)
            and labels.matches(stored.labels)
            and fields.matches(stored.fields)
        ]

    def list_stored(
        self,
        resource: str,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
        limit: int = 0,
        continue_token: str = "",
    ) -> ListResult:
        """One page (all of it when `limit` is 0) of a consistent snapshot."""
        with self._lock:
            coll = self._collection(resource)
            if not coll.rt.namespaced:
                namespace = None
            if continue_token:
                snapshot_id, offset = _untoken(continue_token)
                found = self._snapshots.get(snapshot_id)
                if found is None:
                    raise errs.expired(_EXPIRED_CONTINUE)
                items, rv = found
            else:
                labels, fields = self.parse_selectors(coll.rt, label_selector, field_selector)
                items, rv, offset = self._matching(coll, namespace, labels, fields), self._rv, 0
                snapshot_id = 0
            end = offset + limit if limit > 0 else len(items)
            page = items[offset:end]
            if end >= len(items):
                return ListResult(page, rv, None, None)
            if not snapshot_id:
                snapshot_id = self._next_snapshot
                self._next_snapshot += 1
                self._snapshots[snapshot_id] = (items, rv)
                while len(self._snapshots) > MAX_SNAPSHOTS:
                    self._snapshots.popitem(last=False)
            return ListResult(page, rv, _token(snapshot_id, end, rv), len(items) - end)

    # -- writes ----------------------------------------------------------------------------

    def _check_kind(self, rt: ResourceType, obj: Obj) -> Obj:
        """`obj` with the right apiVersion and kind, put first as the real API does."""
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if api_version not in (None, "", rt.api_version):
            raise errs.bad_request(
                f"the API version in the data ({api_version}) does not match the expected "
                f"API version ({rt.api_version})"
            )
        if kind not in (None, "", rt.kind):
            raise errs.bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        rest = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        return {"apiVersion": rt.api_version, "kind": rt.kind, **rest}

    def _check_strict(self, rt: ResourceType, obj: Obj) -> None:
        unknown = unknown_fields(rt, obj)
        if unknown:
            listed = ", ".join(f'unknown field "{path}"' for path in unknown)
            raise errs.bad_request(
                f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                f"strict decoding error: {listed}"
            )

    def _invalid(self, rt: ResourceType, name: str, errors: FieldErrors) -> ApiStatusError:
        return errs.invalid(rt.kind, rt.group, name, errors)

    def _require_namespace(self, rt: ResourceType, namespace: str) -> None:
        if not rt.namespaced:
            return
        ns = self._collections["namespaces"].objects.get(("", namespace))
        if ns is None:
            raise errs.not_found("namespaces", "", namespace)
        if ns.obj["metadata"].get("deletionTimestamp"):
            raise errs.forbidden(
                f"unable to create new content in namespace {namespace} "
                "because it is being terminated"
            )

    def create(
        self,
        resource: str,
        obj: Obj,
        *,
        namespace: str | None = None,
        validate: bool = True,
        strict: bool = False,
    ) -> Obj:
        """Create `obj` (copied); returns what was stored.

        `validate=False` skips defaulting, validation and allocation checks (only the
        metadata is stamped): for objects the real API would have refused or that
        "slipped past validation". `strict` is `fieldValidation=Strict`.
        """
        changes: ChangeLog = []
        with self._lock:
            stored = self._create(
                resource,
                obj,
                namespace=namespace,
                validate=validate,
                strict=strict,
                changes=changes,
            )
        self._notify(changes)
        return stored.decoded()

    def create_stored(
        self,
        resource: str,
        obj: Obj,
        *,
        namespace: str | None = None,
        validate: bool = True,
        strict: bool = False,
    ) -> StoredObject:
        changes: ChangeLog = []
        with self._lock:
            stored = self._create(
                resource,
                obj,
                namespace=namespace,
                validate=validate,
                strict=strict,
                changes=changes,
            )
        self._notify(changes)
        return stored

    def _checked_body(
        self, rt: ResourceType, obj: object, *, validate: bool, strict: bool
    ) -> tuple[Obj, Obj]:
        """A private copy of a request body, kind-checked and field-validated, and its metadata."""
        if not isinstance(obj, dict):
            raise errs.bad_request("the body of the request was not a JSON object")
        body = self._check_kind(rt, _copy(obj))
        if strict:
            self._check_strict(rt, body)
        elif validate:
            unknown_fields(rt, body, remove=True)
        meta = body.get("metadata")
        if not isinstance(meta, dict):
            meta = body["metadata"] = {}
        return body, meta

    def _create(
        self,
        resource: str,
        obj: Obj,
        *,
        namespace: str | None,
        validate: bool,
        strict: bool,
        changes: ChangeLog,
    ) -> StoredObject:
        coll = self._collection(resource)
        rt = coll.rt
        obj, meta = self._checked_body(rt, obj, validate=validate, strict=strict)
        if rt.namespaced:
            body_ns = meta.get("namespace")
            if namespace and body_ns and body_ns != namespace:
                raise errs.bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = namespace or body_ns or "default"
        else:
            meta.pop("namespace", None)
        ns = meta.get("namespace") or ""
        self._require_namespace(rt, ns)
        if validate and meta.get("resourceVersion"):
            raise errs.bad_request("resourceVersion should not be set on objects to be created")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = self._generate_name(coll, ns, str(meta["generateName"]))
        name = str(meta.get("name") or "")
        if validate:
            errors = validate_metadata(rt, obj)
            if errors:
                raise self._invalid(rt, name, errors)
        elif not name:
            raise self._invalid(rt, name, [FieldError("metadata.name", "Required")])
        key = (ns, name)
        if key in coll.objects:
            raise errs.already_exists(rt.plural, rt.group, name)
        meta["uid"] = str(uuid.uuid4()) if validate or not meta.get("uid") else meta["uid"]
        if validate or not meta.get("creationTimestamp"):
            meta["creationTimestamp"] = self.now()
        meta.pop("resourceVersion", None)
        if validate:
            for system in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
                meta.pop(system, None)
            if rt.kind == "Service":
                obj["status"] = {"loadBalancer": {}}
            errors = coll.admission.create(obj)
            if errors:
                raise self._invalid(rt, name, errors)
        else:
            coll.admission.observe(obj)
        return self._commit(coll, "ADDED", key=key, obj=obj, previous=None, changes=changes)

    def _generate_name(self, coll: _Collection, namespace: str, prefix: str) -> str:
        prefix = prefix[:58]
        for _ in range(16):
            name = prefix + "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
            if (namespace, name) not in coll.objects:
                return name
        raise errs.already_exists(coll.rt.plural, coll.rt.group, prefix)

    def update(
        self,
        resource: str,
        obj: Obj,
        *,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
        validate: bool = True,
        strict: bool = False,
    ) -> Obj:
        """PUT semantics: replace the object (stale `resourceVersion` -> 409 Conflict).

        `subresource="status"` changes only the status. `validate=False` stores the
        object as given (keeping uid and creationTimestamp), e.g. a Node with
        `deletionTimestamp` set, which the real API only lets itself write.
        """
        return self.update_stored(
            resource,
            obj,
            namespace=namespace,
            name=name,
            subresource=subresource,
            validate=validate,
            strict=strict,
        ).decoded()

    def update_stored(
        self,
        resource: str,
        obj: Obj,
        *,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
        validate: bool = True,
        strict: bool = False,
    ) -> StoredObject:
        changes: ChangeLog = []
        with self._lock:
            stored = self._update(
                resource,
                obj,
                namespace=namespace,
                name=name,
                subresource=subresource,
                validate=validate,
                strict=strict,
                changes=changes,
            )
        self._notify(changes)
        return stored

    def _update(
        self,
        resource: str,
        obj: Obj,
        *,
        namespace: str | None,
        name: str | None,
        subresource: str | None,
        validate: bool,
        strict: bool,
        changes: ChangeLog,
    ) -> StoredObject:
        coll = self._collection(resource)
        rt = coll.rt
        new, meta = self._checked_body(rt, obj, validate=validate, strict=strict)
        body_name = str(meta.get("name") or "")
        if name is None:
            name = body_name
        elif body_name and body_name != name:
            raise errs.bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        if rt.namespaced:
            body_ns = meta.get("namespace")
            namespace = namespace or body_ns or "default"
            if body_ns and body_ns != namespace:
                raise errs.bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
        key = self._key(rt, namespace, name)
        current = coll.objects.get(key)
        if current is None:
            raise errs.not_found(rt.plural, rt.group, name)
        old = current.obj
        wanted_rv = str(meta.get("resourceVersion") or "")
        if wanted_rv and wanted_rv != str(current.rv):
            raise errs.conflict(rt.plural, rt.group, name, errs.STALE_OBJECT)
        if subresource == "status":
            status = new.get("status")
            new = _copy(old)
            if status is not None:
                new["status"] = status
            else:
                new.pop("status", None)
            meta = new["metadata"]
        elif subresource is not None:
            raise errs.not_found(rt.plural, rt.group, f"{name}/{subresource}")
        elif validate and rt.status_subresource:
            if "status" in old:
                new["status"] = _copy(old["status"])
            else:
                new.pop("status", None)
        meta["name"] = name
        if rt.namespaced:
            meta["namespace"] = key[0]
        else:
            meta.pop("namespace", None)
        old_meta = old["metadata"]
        keep: tuple[str, ...] = ("uid", "creationTimestamp")
        if validate:
            keep += ("deletionTimestamp", "deletionGracePeriodSeconds")
        for system in keep:
            if system in old_meta and (validate or not meta.get(system)):
                meta[system] = old_meta[system]
            elif validate:
                meta.pop(system, None)
        if validate:
            errors = validate_metadata(rt, new)
            if not errors and subresource is None:
                errors = coll.admission.update(new, old)
            if errors:
                raise self._invalid(rt, name, errors)
        else:
            coll.admission.release(old)
            coll.admission.observe(new)
        if (
            validate
            and meta.get("deletionTimestamp")
            and old_meta.get("finalizers")
            and not meta.get("finalizers")
        ):
            # The last finalizer is gone: the pending deletion completes.
            coll.admission.release(new)
            return self._commit(
                coll, "DELETED", key=key, obj=new, previous=current, changes=changes
            )
        meta["resourceVersion"] = str(current.rv)
        if new == old:
            return current  # a no-op write: no new version, no event
        return self._commit(coll, "MODIFIED", key=key, obj=new, previous=current, changes=changes)

    def patch(
        self,
        resource: str,
        name: str,
        patch: Any,
        *,
        namespace: str | None = None,
        patch_type: str = MERGE_PATCH,
        subresource: str | None = None,
        strict: bool = False,
    ) -> Obj:
        """Apply a merge / strategic / JSON / apply patch (see `apipatch`)."""
        return self.patch_stored(
            resource,
            name,
            patch,
            namespace=namespace,
            patch_type=patch_type,
            subresource=subresource,
            strict=strict,
        ).decoded()

    def patch_stored(
        self,
        resource: str,
        name: str,
        patch: Any,
        *,
        namespace: str | None = None,
        patch_type: str = MERGE_PATCH,
        subresource: str | None = None,
        strict: bool = False,
    ) -> StoredObject:
        changes: ChangeLog = []
        with self._lock:
            coll = self._collection(resource)
            current = coll.objects.get(self._key(coll.rt, namespace, name))
            if current is None and patch_type == APPLY_PATCH and subresource is None:
                if not isinstance(patch, dict):
                    raise errs.bad_request("an apply patch must be an object")
                body = dict(patch)
                body["metadata"] = {**(patch.get("metadata") or {}), "name": name}
                stored = self._create(
                    resource,
                    body,
                    namespace=namespace,
                    validate=True,
                    strict=strict,
                    changes=changes,
                )
            else:
                if current is None:
                    raise errs.not_found(coll.rt.plural, coll.rt.group, name)
                try:
                    patched = apply_patch(current.decoded(), patch, patch_type)
                except PatchError as err:
                    if err.decode:
                        raise errs.bad_request(str(err)) from err
                    raise self._invalid(
                        coll.rt, name, [FieldError("patch", "Invalid", None, str(err))]
                    ) from err
                meta = patched.get("metadata")
                if isinstance(meta, dict):
                    # A resourceVersion in the patch is a precondition; an absent one
                    # means "whatever is current" (the patch was applied to it).
                    meta.setdefault("resourceVersion", str(current.rv))
                stored = self._update(
                    resource,
                    patched,
                    namespace=namespace,
                    name=name,
                    subresource=subresource,
                    validate=True,
                    strict=strict,
                    changes=changes,
                )
        self._notify(changes)
        return stored

    def delete(
        self,
        resource: str,
        name: str,
        *,
        namespace: str | None = None,
        uid: str | None = None,
        resource_version: str | None = None,
    ) -> Obj:
        """Delete (or, with finalizers, mark for deletion); returns the last version."""
        return self.delete_stored(
            resource, name, namespace=namespace, uid=uid, resource_version=resource_version
        )[0].decoded()

    def delete_stored(
        self,
        resource: str,
        name: str,
        *,
        namespace: str | None = None,
        uid: str | None = None,
        resource_version: str | None = None,
    ) -> tuple[StoredObject, bool]:
        """(last version, whether it is gone) — False when finalizers hold it."""
        changes: ChangeLog = []
        with self._lock:
            result = self._delete(
                resource,
                name,
                namespace=namespace,
                uid=uid,
                resource_version=resource_version,
                changes=changes,
            )
        self._notify(changes)
        return result

    def _delete(
        self,
        resource: str,
        name: str,
        *,
        namespace: str | None,
        uid: str | None,
        resource_version: str | None,
        changes: ChangeLog,
    ) -> tuple[StoredObject, bool]:
        coll = self._collection(resource)
        rt = coll.rt
        key = self._key(rt, namespace, name)
        current = coll.objects.get(key)
        if current is None:
            raise errs.not_found(rt.plural, rt.group, name)
        meta = current.obj["metadata"]
        if uid and uid != meta.get("uid"):
            raise errs.conflict(
                rt.plural,
                rt.group,
                name,
                f"Precondition failed: UID in precondition: {uid}, "
                f"UID in object meta: {meta.get('uid')}",
            )
        if resource_version and resource_version != str(current.rv):
            raise errs.conflict(
                rt.plural,
                rt.group,
                name,
                f"Precondition failed: ResourceVersion in precondition: {resource_version}, "
                f"ResourceVersion in object meta: {current.rv}",
            )
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return current, False
            marked = current.decoded()
            marked["metadata"]["deletionTimestamp"] = self.now()
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            return self._commit(
                coll, "MODIFIED", key=key, obj=marked, previous=current, changes=changes
            ), False
        if rt.plural == "namespaces":
            if name in UNDELETABLE_NAMESPACES:
                raise ApiStatusError(
                    errs.status_object(
                        403,
                        "Forbidden",
                        f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                        {"name": name, "kind": "namespaces"},
                    )
                )
            for other in self._collections.values():
                if other.rt.namespaced:
                    for inner in [k for k in other.sorted_keys() if k[0] == name]:
                        other.admission.release(other.objects[inner].obj)
                        self._commit(
                            other,
                            "DELETED",
                            key=inner,
                            obj=None,
                            previous=other.objects[inner],
                            changes=changes,
                        )
        coll.admission.release(current.obj)
        return self._commit(
            coll, "DELETED", key=key, obj=None, previous=current, changes=changes
        ), True

    def delete_collection(
        self,
        resource: str,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> StoredList:
        changes: ChangeLog = []
        with self._lock:
            coll = self._collection(resource)
            labels, fields = self.parse_selectors(coll.rt, label_selector, field_selector)
            targets = self._matching(
                coll, namespace if coll.rt.namespaced else None, labels, fields
            )
            deleted = [
                self._delete(
                    resource,
                    s.key[1],
                    namespace=s.key[0] or None,
                    uid=None,
                    resource_version=None,
                    changes=changes,
                )[0]
                for s in targets
            ]
        self._notify(changes)
        return deleted

    # -- watches and history --------------------------------------------------------------

    def watch(
        self,
        resource: str,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
        resource_version: str = "",
        send_initial_events: bool = False,
    ) -> Watcher:
        """Open a watch; raises 410 `ApiStatusError` when `resource_version` is too old.

        "" or "0" (or `send_initial_events`) starts with a synthetic ADDED per current
        object; any other version replays the history after it.
        """
        with self._lock:
            coll = self._collection(resource)
            rt = coll.rt
            labels, fields = self.parse_selectors(rt, label_selector, field_selector)
            watcher = Watcher(self, rt, namespace if rt.namespaced else None, labels, fields)
            if send_initial_events or resource_version in ("", "0"):
                for stored in self._matching(coll, watcher.namespace, labels, fields):
                    watcher.enqueue(QueuedEvent("ADDED", stored, stored.rv))
                if send_initial_events:
                    watcher.enqueue(
                        QueuedEvent("BOOKMARK", None, self._rv, initial_events_end=True)
                    )
            else:
                try:
                    since = int(resource_version)
                except ValueError as err:
                    raise errs.bad_request(f"invalid resource version: {resource_version}") from err
                if since < coll.floor:
                    raise errs.expired(f"too old resource version: {since} ({coll.floor + 1})")
                start = bisect.bisect_right(coll.history, since, key=lambda change: change.rv)
                for change in coll.history[start:]:
                    watcher.offer(change)
            coll.watchers.add(watcher)
            return watcher

    def unregister(self, watcher: Watcher) -> None:
        with self._lock:
            self._collection(watcher.rt.plural).watchers.discard(watcher)

    def bookmark(self, watcher: Watcher) -> None:
        """Queue a BOOKMARK at the current version, behind every event already queued."""
        with self._lock:
            watcher.enqueue(QueuedEvent("BOOKMARK", None, self._rv))

    def watchers(self, resource: str | None = None) -> WatcherList:
        with self._lock:
            colls = [self._collection(resource)] if resource else self._collections.values()
            return [w for coll in colls for w in coll.watchers]

    def compact(self) -> None:
        """Forget all history and pagination snapshots: resumes and continues get 410."""
        with self._lock:
            for coll in self._collections.values():
                coll.history.clear()
                coll.floor = self._rv
            self._snapshots.clear()
