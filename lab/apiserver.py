"""The lab's Kubernetes API server double: real HTTP, real watch semantics, fault switches.

The proxy, the lab and `kubectl` talk to it exactly as to a real API server (plain
HTTP on loopback, any bearer token accepted unless `token` is set). It serves
`v1` services, nodes, namespaces, events and pods (empty unless a test adds some:
the lab has none, kubectl reads them) and `discovery.k8s.io/v1` endpointslices, with
discovery, a minimal OpenAPI v3 (so `kubectl create -f`
validates server-side), and `Table` answers for `kubectl get`. The semantics live
in `apistore` (versions, history, selectors, pagination, finalizers) and
`apiservices` (ClusterIP/NodePort allocation); this module is the wire:

- list: one response assembled from the objects' cached JSON bytes (no per-request
  encode or copy), `limit`/`continue` pagination, selectors;
- watch (`?watch=true|1`): newline-delimited JSON events, one HTTP chunk per event,
  written as soon as it is queued; `timeoutSeconds` ends the stream cleanly;
  `allowWatchBookmarks=true` adds a BOOKMARK every `bookmark_interval` seconds; a
  resourceVersion older than the history window gets HTTP 200 and one ERROR event
  (Status 410 Expired), as the real watch cache answers;
- every other verb answers with the object, or a `Status` with the real reason/code;
- request bodies must be JSON: kubectl's generators (`kubectl create service ...`,
  `create namespace`) send protobuf and get 415; `create -f`, `apply`, `patch`,
  `replace`, `delete`, `get` (tables, `-o json/yaml`, `-w`) all work.

Fault injection, for tests: `compact()`, `expire_watches()` (410 ERROR to every
open watch, then close), `stall_watches()` (open watches get nothing more, their
TCP connections stay open: only a client read timeout can notice), `drop_watches()`
(reset the connections), `fail_requests(status, count, path_prefix, method)` and
`stop()`/`start()`/`restart()` on the same port (the store survives; every open
connection is reset, as a crashing API server would).

Usable in-process (`ApiServer(...).start()`, plus the store methods on plain
dicts) and as `python -m lab.apiserver --port N [--kubeconfig-out PATH]`,
which runs until SIGTERM/SIGINT.

Concurrency: `ThreadingHTTPServer`, one daemon thread per connection. A watch
holds its thread for its lifetime, blocked on its own queue (see `apistore.Watcher`),
waking at least every half second to notice a client that hung up, a fault, the
timeout or a due bookmark. Request threads only take the store lock for short
critical sections; socket writes happen outside it. `start`/`stop` and the fault
methods may be called from any thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

from lab import apidocs
from lab import apierrors as errs
from lab.apierrors import ApiStatusError
from lab.apipatch import MERGE_PATCH, PATCH_TYPES, PatchError, decode_patch
from lab.apistore import (
    DEFAULT_HISTORY_SIZE,
    DEFAULT_SERVICE_CIDR,
    QueuedEvent,
    Store,
    StoreChange,
    StoredObject,
    Watcher,
)
from lab.apitables import TABLE_CONTENT_TYPE, table
from lab.apitypes import RESOURCES, ResourceType

__all__ = [
    "DEFAULT_BOOKMARK_INTERVAL",
    "DEFAULT_SERVICE_CIDR",
    "ApiServer",
    "RequestRecord",
    "main",
    "write_kubeconfig",
]

log = logging.getLogger(__name__)

Obj = dict[str, Any]
ObjList = list[Obj]
Records = list["RequestRecord"]

DEFAULT_BOOKMARK_INTERVAL = 60.0
DEFAULT_WATCH_TIMEOUT = 1800.0
"""Seconds a watch without `timeoutSeconds` stays open (the real minRequestTimeout)."""
_POLL = 0.5
"""Longest a watch thread sleeps before looking for a hung-up client or a fault."""
_IDLE_CONNECTION_TIMEOUT = 300.0
_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the server saw it (for tests: which selectors did a client send?)."""

    method: str
    path: str
    query: Mapping[str, str]
    user_agent: str
    authorization: str


@dataclass
class _FailRule:
    status: int
    remaining: int
    path_prefix: str
    method: str | None


@dataclass(frozen=True, slots=True)
class _Route:
    rt: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


def _resource_route(parts: list[str]) -> _Route | None:
    """`/api/v1/...` or `/apis/g/v/...` split on "/", as a resource route (None: not one)."""
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    if len(rest) > 3:
        raise errs.ApiStatusError(
            errs.status_object(404, "NotFound", "the server could not find the requested resource")
        )
    rt = RESOURCES.get(rest[0])
    if rt is None or rt.group != group or rt.version != version:
        raise errs.ApiStatusError(
            errs.status_object(404, "NotFound", "the server could not find the requested resource")
        )
    if namespace is not None and not rt.namespaced:
        raise errs.ApiStatusError(
            errs.status_object(404, "NotFound", "the server could not find the requested resource")
        )
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    return _Route(rt, namespace, name, subresource)


def _flag(query: Mapping[str, str], key: str) -> bool:
    return query.get(key, "").lower() in ("true", "1")


def _wants_table(accept: str) -> bool:
    return any(
        "as=Table" in part and "g=meta.k8s.io" in part
        for part in accept.replace(" ", "").split(",")
    )


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], api: ApiServer) -> None:
        self.api = api
        self.connections: set[socket.socket] = set()
        self.threads: set[threading.Thread] = set()
        self.track_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        current = threading.current_thread()
        with self.track_lock:
            self.connections.add(request)
            self.threads.add(current)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.track_lock:
                self.connections.discard(request)
                self.threads.discard(current)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-request is routine here; log, do not print.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lab-apiserver/1.32"
    timeout = _IDLE_CONNECTION_TIMEOUT
    server: _HttpServer

    # -- plumbing ----------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(
        self,
        code: int,
        body: bytes,
        content_type: str = _JSON,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, private")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, code: int, doc: Any, content_type: str = _JSON) -> None:
        self._send(code, _dumps(doc), content_type)

    def _send_error(self, err: ApiStatusError) -> None:
        headers = {"Retry-After": "1"} if err.code == 429 else None
        self._send(err.code, err.body(), headers=headers)

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        api = self.server.api
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        api.record(
            RequestRecord(
                method,
                url.path,
                query,
                self.headers.get("User-Agent", ""),
                self.headers.get("Authorization", ""),
            )
        )
        try:
            api.check_request(method, url.path, self.headers.get("Authorization", ""))
            self._route(method, url.path, query, body)
        except ApiStatusError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:
            log.exception("API double failed on %s %s", method, self.path)
            self._send_error(errs.internal_error(f"lab API double bug: {err!r}"))

    # -- routing -----------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        parts = [part for part in path.split("/") if part]
        route = _resource_route(parts)
        if route is not None:
            self._resource(method, route, query, body)
            return
        if method != "GET":
            raise errs.method_not_allowed(f"{method} is not supported on {path}")
        doc = self._document(parts)
        if doc is None:
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
        elif isinstance(doc, bytes):
            self._send(200, doc, "text/plain; charset=utf-8")
        else:
            self._send_json(200, doc)

    def _document(self, parts: list[str]) -> Obj | bytes | None:
        if parts and parts[0] in ("healthz", "livez", "readyz"):
            return b"ok"
        if parts == ["version"]:
            return apidocs.version_info()
        if parts == ["api"]:
            host, port = self.server.server_address[:2]
            return apidocs.api_versions(f"{host!s}:{port}")
        if parts == ["apis"]:
            return apidocs.api_group_list()
        if len(parts) == 2 and parts[0] == "api":
            return apidocs.api_resource_list("", parts[1])
        if len(parts) == 2 and parts[0] == "apis":
            return apidocs.api_group(parts[1])
        if len(parts) == 3 and parts[0] == "apis":
            return apidocs.api_resource_list(parts[1], parts[2])
        if parts == ["openapi", "v3"]:
            return apidocs.openapi_root()
        if parts[:2] == ["openapi", "v3"]:
            return apidocs.openapi_group_version("/".join(parts[2:]))
        return None

    def _resource(self, method: str, route: _Route, query: dict[str, str], body: bytes) -> None:
        store = self.server.api.store
        rt = route.rt
        if query.get("dryRun"):
            raise errs.bad_request("dryRun is not supported by the lab API double")
        strict = query.get("fieldValidation", "").lower() == "strict"
        if route.subresource not in (None, "status") or (
            route.subresource and not rt.status_subresource
        ):
            raise errs.not_found(rt.plural, rt.group, f"{route.name}/{route.subresource}")
        if route.subresource and method not in ("GET", "PUT", "PATCH"):
            raise errs.method_not_allowed(f"{method} is not supported on {rt.plural}/status")
        if method == "GET" and route.name is None:
            if _flag(query, "watch"):
                self._watch(route, query)
            else:
                self._list(route, query)
        elif method == "GET":
            assert route.name is not None
            self._send_object(
                200, store.get_stored(rt.plural, route.name, namespace=route.namespace)
            )
        elif method == "POST" and route.name is None:
            created = store.create_stored(
                rt.plural, self._decode(body), namespace=route.namespace, strict=strict
            )
            self._send_object(201, created)
        elif method == "PUT" and route.name is not None:
            updated = store.update_stored(
                rt.plural,
                self._decode(body),
                namespace=route.namespace,
                name=route.name,
                subresource=route.subresource,
                strict=strict,
            )
            self._send_object(200, updated)
        elif method == "PATCH" and route.name is not None:
            self._patch(route, body, strict)
        elif method == "DELETE" and route.name is not None:
            self._delete(route, body)
        elif method == "DELETE":
            deleted = store.delete_collection(
                rt.plural,
                namespace=route.namespace,
                label_selector=query.get("labelSelector", ""),
                field_selector=query.get("fieldSelector", ""),
            )
            self._send_list(rt, deleted, store.resource_version, None, None)
        else:
            raise errs.method_not_allowed(f"{method} is not supported on this path")

    def _decode(self, body: bytes) -> Obj:
        content_type = self.headers.get("Content-Type", _JSON).split(";")[0].strip().lower()
        if body.strip() and content_type not in (_JSON, "*/*", ""):
            # Protobuf (kubectl's typed clients) and CBOR bodies: we only speak JSON.
            raise ApiStatusError(
                errs.status_object(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format ({content_type}) - "
                    f"accepted media types include: {_JSON}",
                )
            )
        try:
            doc = json.loads(body) if body.strip() else None
        except ValueError as err:
            raise errs.bad_request(f"couldn't decode the request body as JSON: {err}") from err
        if not isinstance(doc, dict):
            raise errs.bad_request("the request body must be a JSON object")
        return doc

    def _send_object(self, code: int, stored: StoredObject) -> None:
        if _wants_table(self.headers.get("Accept", "")):
            include = self._include_object()
            doc = table(str(stored.obj.get("kind")), [stored.obj], include_object=include)
            self._send_json(code, doc, TABLE_CONTENT_TYPE)
        else:
            self._send(code, stored.raw)

    def _include_object(self) -> str:
        query = dict(parse_qsl(urlsplit(self.path).query))
        include = query.get("includeObject", "PartialObjectMetadata")
        if include not in ("None", "Object", "PartialObjectMetadata"):
            raise errs.bad_request(f"invalid includeObject {include!r}")
        return include

    def _patch(self, route: _Route, body: bytes, strict: bool) -> None:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in PATCH_TYPES:
            raise ApiStatusError(
                errs.status_object(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media types "
                    f"include: {', '.join(PATCH_TYPES)}",
                )
            )
        try:
            patch = decode_patch(body, content_type)
        except PatchError as err:
            raise errs.bad_request(str(err)) from err
        assert route.name is not None
        patched = self.server.api.store.patch_stored(
            route.rt.plural,
            route.name,
            patch,
            namespace=route.namespace,
            patch_type=content_type,
            subresource=route.subresource,
            strict=strict,
        )
        self._send_object(200, patched)

    def _delete(self, route: _Route, body: bytes) -> None:
        rt = route.rt
        options = self._decode(body) if body.strip() else {}
        preconditions = options.get("preconditions") or {}
        assert route.name is not None
        stored, gone = self.server.api.store.delete_stored(
            rt.plural,
            route.name,
            namespace=route.namespace,
            uid=preconditions.get("uid"),
            resource_version=preconditions.get("resourceVersion"),
        )
        if not gone or rt.return_deleted_object:
            self._send_object(200, stored)
            return
        details: Obj = {"name": route.name}
        if rt.group:
            details["group"] = rt.group
        details["kind"] = rt.plural
        details["uid"] = stored.obj["metadata"].get("uid", "")
        self._send_json(
            200,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": details,
            },
        )

    # -- list --------------------------------------------------------------------------------

    def _list(self, route: _Route, query: dict[str, str]) -> None:
        try:
            limit = int(query.get("limit") or 0)
        except ValueError as err:
            raise errs.bad_request(f"invalid limit {query.get('limit')!r}") from err
        result = self.server.api.store.list_stored(
            route.rt.plural,
            namespace=route.namespace,
            label_selector=query.get("labelSelector", ""),
            field_selector=query.get("fieldSelector", ""),
            limit=max(limit, 0),
            continue_token=query.get("continue", ""),
        )
        self._send_list(
            route.rt, result.items, result.resource_version, result.continue_token, result.remaining
        )

    def _send_list(
        self,
        rt: ResourceType,
        items: list[StoredObject],
        rv: int,
        continue_token: str | None,
        remaining: int | None,
    ) -> None:
        if _wants_table(self.headers.get("Accept", "")):
            doc = table(
                rt.kind,
                [stored.obj for stored in items],
                resource_version=str(rv),
                continue_token=continue_token,
                include_object=self._include_object(),
            )
            self._send_json(200, doc, TABLE_CONTENT_TYPE)
            return
        meta: Obj = {"resourceVersion": str(rv)}
        if continue_token:
            meta["continue"] = continue_token
            meta["remainingItemCount"] = remaining
        head = f'{{"kind":"{rt.list_kind}","apiVersion":"{rt.api_version}","metadata":'
        body = b"".join(
            (
                head.encode(),
                _dumps(meta),
                b',"items":[',
                b",".join(stored.raw for stored in items),
                b"]}",
            )
        )
        self._send(200, body)

    # -- watch -------------------------------------------------------------------------------

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _abort(self) -> None:
        """Drop the connection without ending the response, like a dying server."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _watch(self, route: _Route, query: dict[str, str]) -> None:
        api = self.server.api
        rt = route.rt
        try:
            timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        except ValueError as err:
            raise errs.bad_request(f"invalid timeoutSeconds {query['timeoutSeconds']!r}") from err
        as_table = _wants_table(self.headers.get("Accept", ""))
        include = self._include_object() if as_table else "Object"
        content_type = TABLE_CONTENT_TYPE if as_table else _JSON
        try:
            watcher = api.store.watch(
                rt.plural,
                namespace=route.namespace,
                label_selector=query.get("labelSelector", ""),
                field_selector=query.get("fieldSelector", ""),
                resource_version=query.get("resourceVersion", ""),
                send_initial_events=_flag(query, "sendInitialEvents"),
            )
        except ApiStatusError as err:
            if err.code != 410:
                raise
            # The real watch cache accepts the watch and then reports the expiry.
            self._start_stream(_JSON)
            self._chunk(b'{"type":"ERROR","object":' + err.body() + b"}\n")
            self._end_stream()
            return
        try:
            self._start_stream(content_type)
            self._stream(watcher, rt, timeout, _flag(query, "allowWatchBookmarks"), include)
        except OSError:
            self.close_connection = True  # the client went away mid-write
        finally:
            watcher.close()

    def _stream(
        self, watcher: Watcher, rt: ResourceType, timeout: float, bookmarks: bool, include: str
    ) -> None:
        api = self.server.api
        deadline = time.monotonic() + timeout
        next_bookmark = time.monotonic() + api.bookmark_interval if bookmarks else float("inf")
        headers_sent = False
        while True:
            now = time.monotonic()
            fault = watcher.fault
            if fault == "stall":
                fault = watcher.wait_fault(min(_POLL, max(deadline - now, 0)))
                if fault == "stall":
                    if now >= deadline or self._client_gone():
                        self._abort()
                        return
                    continue
            if fault == "expire":
                status = errs.expired("the watch was expired by the lab API double (injected)")
                self._chunk(b'{"type":"ERROR","object":' + status.body() + b"}\n")
                self._end_stream()
                return
            if fault is not None:  # drop, stop
                self._abort()
                return
            if now >= deadline:
                self._end_stream()
                return
            events = watcher.next_events(max(min(_POLL, deadline - now, next_bookmark - now), 0))
            for event in events:
                if include == "Object" or event.type == "BOOKMARK":
                    self._chunk(self._event_line(rt, event))
                else:
                    self._chunk(self._table_event_line(event, include, not headers_sent))
                    headers_sent = True
            if time.monotonic() >= next_bookmark:
                api.store.bookmark(watcher)
                next_bookmark = time.monotonic() + api.bookmark_interval
            if not events and self._client_gone():
                self._abort()
                return

    @staticmethod
    def _event_line(rt: ResourceType, event: QueuedEvent) -> bytes:
        if event.stored is not None:
            raw = event.stored.raw
        else:
            meta: Obj = {"resourceVersion": str(event.rv)}
            if event.initial_events_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            raw = _dumps({"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta})
        return b'{"type":"' + event.type.encode() + b'","object":' + raw + b"}\n"

    @staticmethod
    def _table_event_line(event: QueuedEvent, include: str, headers: bool) -> bytes:
        assert event.stored is not None
        obj = event.stored.obj
        doc = table(
            str(obj.get("kind")),
            [obj],
            resource_version=str(event.rv),
            include_object=include,
            headers=headers,
        )
        return b'{"type":"' + event.type.encode() + b'","object":' + _dumps(doc) + b"}\n"


class ApiServer:
    """The API double: a `Store` plus an HTTP server you can stop, restart and break."""

    def __init__(
        self,
        *,
        service_cidr: str = DEFAULT_SERVICE_CIDR,
        bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL,
        history_size: int = DEFAULT_HISTORY_SIZE,
        node_port_range: tuple[int, int] = (30000, 32767),
        token: str | None = None,
    ) -> None:
        """`service_cidr` may name two CIDRs ("v4,v6") for dual-stack; `token`, if set,
        is the only bearer token accepted (401 otherwise)."""
        self.store = Store(
            service_cidr=service_cidr, node_port_range=node_port_range, history_size=history_size
        )
        self.bookmark_interval = bookmark_interval
        self.token = token
        self._lock = threading.Lock()
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._fail_rules: list[_FailRule] = []
        self._requests: deque[RequestRecord] = deque(maxlen=5000)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on `host:port` (0: any free port) and serve; returns the base URL.

        The listening socket is created on the calling thread, so calling this from a
        thread inside another network namespace serves in that namespace.
        """
        with self._lock:
            if self._httpd is not None:
                raise RuntimeError(f"the API server is already running at {self.url}")
            httpd = _HttpServer((host, port), self)
            self._httpd = httpd
            self._host, self._port = host, int(httpd.server_address[1])
            self._thread = threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"apiserver-{self._port}",
                daemon=True,
            )
            self._thread.start()
        log.info("lab API server listening on %s", self.url)
        return self.url

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and reset every open connection; the store is kept. Idempotent."""
        with self._lock:
            httpd, thread = self._httpd, self._thread
            self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        for watcher in self.store.watchers():
            watcher.set_fault("stop")
        with httpd.track_lock:
            connections = list(httpd.connections)
            threads = list(httpd.threads)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for worker in [*threads, *([thread] if thread else [])]:
            worker.join(max(deadline - time.monotonic(), 0))
        log.info("lab API server on port %d stopped", self._port)

    def restart(self) -> str:
        """`stop()` if running, then `start()` on the same host and port."""
        self.stop()
        return self.start(self._host, self._port)

    @property
    def running(self) -> bool:
        with self._lock:
            return self._httpd is not None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The port of the last `start()` (kept while stopped, for a restart)."""
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- the store, in-process -----------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        """The global counter, as a list response would report it."""
        return str(self.store.resource_version)

    def create(
        self, resource: str, obj: Obj, *, namespace: str | None = None, validate: bool = True
    ) -> Obj:
        """See `Store.create`; raises `ApiStatusError` as the HTTP API would answer."""
        return self.store.create(resource, obj, namespace=namespace, validate=validate)

    def update(
        self,
        resource: str,
        obj: Obj,
        *,
        namespace: str | None = None,
        subresource: str | None = None,
        validate: bool = True,
    ) -> Obj:
        """See `Store.update` (stale resourceVersion -> 409; `validate=False`: as given)."""
        return self.store.update(
            resource, obj, namespace=namespace, subresource=subresource, validate=validate
        )

    def patch(
        self,
        resource: str,
        name: str,
        patch: Any,
        *,
        namespace: str | None = None,
        patch_type: str = MERGE_PATCH,
        subresource: str | None = None,
    ) -> Obj:
        return self.store.patch(
            resource,
            name,
            patch,
            namespace=namespace,
            patch_type=patch_type,
            subresource=subresource,
        )

    def delete(self, resource: str, name: str, *, namespace: str | None = None) -> Obj:
        """Delete (finalizers: mark); returns the last version of the object."""
        return self.store.delete(resource, name, namespace=namespace)

    def get(self, resource: str, name: str, *, namespace: str | None = None) -> Obj:
        return self.store.get(resource, name, namespace=namespace)

    def list(
        self,
        resource: str,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> ObjList:
        return self.store.list(
            resource,
            namespace=namespace,
            label_selector=label_selector,
            field_selector=field_selector,
        )

    def subscribe(self, listener: Callable[[StoreChange], None]) -> Callable[[], None]:
        """See `Store.subscribe`."""
        return self.store.subscribe(listener)

    # -- faults ------------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget history: every watch resume and every continue token gets 410."""
        self.store.compact()

    def _fault_watches(self, fault: str, resource: str | None) -> int:
        watchers = self.store.watchers(resource)
        for watcher in watchers:
            watcher.set_fault(fault)
        return len(watchers)

    def expire_watches(self, resource: str | None = None) -> int:
        """Send a 410 ERROR event to every open watch and end it; returns how many."""
        return self._fault_watches("expire", resource)

    def stall_watches(self, resource: str | None = None) -> int:
        """Stop writing to the open watches, keeping their connections open."""
        return self._fault_watches("stall", resource)

    def drop_watches(self, resource: str | None = None) -> int:
        """Reset the open watches' connections (no final chunk, no ERROR)."""
        return self._fault_watches("drop", resource)

    def fail_requests(
        self,
        status: int = 500,
        count: int = 1,
        path_prefix: str = "",
        method: str | None = None,
    ) -> None:
        """Answer the next `count` requests whose path starts with `path_prefix` (and of
        `method`, if given) with a `Status` of `status` (403, 429, 500, 503...)."""
        if status not in errs.REASONS:
            raise ValueError(f"no Status reason known for HTTP {status}")
        with self._lock:
            self._fail_rules.append(_FailRule(status, count, path_prefix, method))

    def clear_faults(self) -> None:
        """Forget pending `fail_requests` (stalled watches stay stalled)."""
        with self._lock:
            self._fail_rules.clear()

    def watch_count(self, resource: str | None = None) -> int:
        return len(self.store.watchers(resource))

    def wait_for_watches(
        self, resource: str | None = None, count: int = 1, timeout: float = 5.0
    ) -> None:
        """Block until at least `count` watches are open; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while self.watch_count(resource) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.watch_count(resource)} of {count} watches on {resource or 'any'} "
                    f"open after {timeout:g}s"
                )
            time.sleep(0.01)

    def wait_for_watches_closed(self, resource: str | None = None, timeout: float = 5.0) -> None:
        """Block until no watch is open (the server noticed every client leave)."""
        deadline = time.monotonic() + timeout
        while self.watch_count(resource):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.watch_count(resource)} watches on {resource or 'any'} still open "
                    f"after {timeout:g}s"
                )
            time.sleep(0.01)

    @property
    def requests(self) -> Records:
        """Requests received so far (the last few thousand), oldest first."""
        with self._lock:
            return list(self._requests)

    # -- called by the handler ---------------------------------------------------------------

    def record(self, request: RequestRecord) -> None:
        with self._lock:
            self._requests.append(request)

    def check_request(self, method: str, path: str, authorization: str) -> None:
        """Raise the injected failure or the 401 this request must get, if any."""
        if self.token is not None and authorization != f"Bearer {self.token}":
            raise ApiStatusError(errs.status_object(401, "Unauthorized", "Unauthorized"))
        with self._lock:
            for rule in self._fail_rules:
                if rule.remaining > 0 and path.startswith(rule.path_prefix):
                    if rule.method is not None and rule.method.upper() != method:
                        continue
                    rule.remaining -= 1
                    status = rule.status
                    break
            else:
                return
            self._fail_rules = [r for r in self._fail_rules if r.remaining > 0]
        reason = errs.REASONS[status]
        raise ApiStatusError(
            errs.status_object(
                status,
                reason,
                f"{method} {path}: {reason} (injected by the lab API double)",
                {"retryAfterSeconds": 1} if status in (429, 503) else None,
            )
        )


def write_kubeconfig(
    path: str | os.PathLike[str],
    base_url: str,
    *,
    token: str = "lab-token",
    namespace: str = "default",
) -> Path:
    """A kubeconfig whose current context points at `base_url` with a bearer token."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": base_url}}],
        "users": [{"name": "lab", "user": {"token": token}}],
        "contexts": [
            {"name": "lab", "context": {"cluster": "lab", "user": "lab", "namespace": namespace}}
        ],
        "current-context": "lab",
        "preferences": {},
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    target.chmod(0o600)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.apiserver",
        description="The lab's Kubernetes API double (plain HTTP, no auth).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--kubeconfig-out", type=Path, help="write a kubeconfig for this server")
    parser.add_argument("--service-cidr", default=DEFAULT_SERVICE_CIDR)
    parser.add_argument("--bookmark-interval", type=float, default=DEFAULT_BOOKMARK_INTERVAL)
    parser.add_argument("--history-size", type=int, default=DEFAULT_HISTORY_SIZE)
    parser.add_argument("--node", action="append", default=[], help="register a Node NAME")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    api = ApiServer(
        service_cidr=args.service_cidr,
        bookmark_interval=args.bookmark_interval,
        history_size=args.history_size,
    )
    for node in args.node:
        api.create(
            "nodes", {"metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}}}
        )
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    url = api.start(args.host, args.port)
    if args.kubeconfig_out:
        write_kubeconfig(args.kubeconfig_out, url)
    print(url, flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
