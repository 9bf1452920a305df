"""API server access: configuration loading and `RawApi`, a raw-JSON list/watch client.

The official `kubernetes` client does what is hard to get right (kubeconfig parsing,
exec and OIDC credentials, in-cluster token rotation, client certificates, TLS, proxy
variables); we use only its transport: `ApiClient.param_serialize` builds the URL and
applies the bearer token, `ApiClient.call_api` sends the request through its urllib3
pool and hands back the unread response. We decode the JSON ourselves, as plain dicts:
model classes cost seconds of CPU at 10k objects, and the client's own `watch` module
mishandles a 410 ERROR event in raw mode (`KeyError: 'raw_object'` in v37).

Watches are read as they arrive: chunk by chunk from the socket, split into lines
here, one event per line, never the whole response at once. Every request carries a
client-side read timeout (`read_timeout`, default 90 s, above the roughly one-minute
bookmark interval the server keeps for watchers that ask for bookmarks), so a
connection that died silently is noticed instead of blinding the proxy forever
(kubernetes-client/python #1402, kopf #585). TCP keepalive is on as well.

Concurrency: a `RawApi` is shared by every reflector thread (urllib3's pool is
thread-safe); each call blocks its caller. A watch stream is iterated by one thread,
and its `close()` may come from any other thread: it shuts the socket down, which
wakes the reader at once, so a stopping reflector does not wait for the read timeout.

Retries: the client retries a failed connection or a lost response once (a pooled
keep-alive connection the server had closed); everything else is the reflector's
business (backoff, relist), so errors surface as `ApiError` without delay.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config, kube_config
from kubernetes.config.config_exception import ConfigException

from proxy import __version__
from proxy.kube.listwatch import (
    DEFAULT_PAGE_SIZE,
    ENDPOINTSLICES,
    NODES,
    SERVICES,
    ApiError,
    ConfigError,
    ListPage,
    ResourceRef,
    WatchDisconnected,
    WatchError,
    WatchEvent,
    WatchExpired,
    WatchTimeout,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_READ_TIMEOUT",
    "ENDPOINTSLICES",
    "NODES",
    "SERVICES",
    "RawApi",
    "load_api_config",
]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds to establish a connection (TCP and TLS)."""

DEFAULT_READ_TIMEOUT = 90.0
"""Seconds without a single byte after which a request is given up. Above the ~60 s
bookmark interval, so a healthy idle watch never trips it."""

USER_AGENT = f"kube-proxy-py/{__version__}"

# Bytes asked for per read on a response that is not chunked (HTTP/1.0 style); a
# read returns as soon as anything arrived, so this bounds memory, not latency.
_READ_SIZE = 64 * 1024

Query = list[tuple[str, str]]
"""URL query parameters, in order."""

# How much of an error response body to keep for the message.
_ERROR_BODY_LIMIT = 64 * 1024


def load_api_config(kubeconfig: str | None, master: str | None) -> k8s_client.Configuration:
    """Where the API server is and how to authenticate, kube-proxy's way.

    - `kubeconfig` (or else the `KUBECONFIG` variable, `:`-separated files merged as
      kubectl does): its current context; `master`, if given, replaces its server.
    - `master` alone: that URL, without credentials (kube-proxy's `--master`).
    - neither: the in-cluster service account (token rotation included).

    Raises `ConfigError` naming what was tried when none of these works.
    """
    config = k8s_client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG") or None
    if path:
        try:
            kube_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path, client_configuration=config, persist_config=False
            )
        except Exception as err:
            # Missing file, bad YAML, no current context, failing exec plugin...: all
            # mean the same to the operator.
            raise ConfigError(f"cannot use kubeconfig {path}: {err}") from err
    elif not master:
        try:
            incluster_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=config
            )
        except ConfigException as err:
            raise ConfigError(
                "no API server configured: pass --kubeconfig or --master, set KUBECONFIG, "
                f"or run in a pod with a service account (in-cluster config: {err})"
            ) from err
    if master:
        _override_host(config, _server_url(master, tls_configured=bool(path)))
    return config


def _override_host(config: k8s_client.Configuration, host: str) -> None:
    config.host = host
    # The kubeconfig loader installs a hook that re-applies the whole kubeconfig,
    # server included, before every request (to refresh tokens): keep ours on top.
    # (The client declares the attribute as always None, hence getattr.)
    refresh: Callable[[k8s_client.Configuration], None] | None = getattr(
        config, "refresh_api_key_hook", None
    )
    if refresh is None:
        return

    def refresh_keeping_host(target: k8s_client.Configuration) -> None:
        refresh(target)
        target.host = host

    setattr(config, "refresh_api_key_hook", refresh_keeping_host)  # noqa: B010 (see above)


def _server_url(master: str, *, tls_configured: bool) -> str:
    # client-go's rule for a server without a scheme: https when TLS is configured.
    master = master.rstrip("/")
    if "://" in master:
        return master
    return f"{'https' if tls_configured else 'http'}://{master}"


class RawApi:
    """`ListWatchClient` over the official client's transport, returning raw JSON."""

    def __init__(
        self,
        configuration: k8s_client.Configuration,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> None:
        # Our own copy: we change retry and keepalive settings, not the caller's.
        config = copy.deepcopy(configuration)
        config.retries = urllib3.Retry(
            total=1, connect=1, read=1, redirect=0, status=0, other=0, raise_on_status=False
        )
        if config.socket_options is None:
            config.keep_alive = True
        self.host: str = str(config.host)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._api = k8s_client.ApiClient(configuration=config)
        self._api.user_agent = USER_AGENT

    def close(self) -> None:
        """Drop pooled connections (streams still open keep theirs until closed)."""
        self._api.close()  # type: ignore[no-untyped-call]

    def list(
        self,
        resource: ResourceRef,
        *,
        label_selector: str = "",
        field_selector: str = "",
        limit: int = DEFAULT_PAGE_SIZE,
        continue_: str | None = None,
    ) -> ListPage:
        """One page of `resource` in all namespaces, read from the current state."""
        query = _selectors(label_selector, field_selector)
        query.append(("limit", str(limit)))
        if continue_:
            query.append(("continue", continue_))
        response = self._get(resource, query, self.read_timeout)
        try:
            body = response.data
        except urllib3.exceptions.HTTPError as err:
            raise _transport_error(err) from err
        finally:
            response.release_conn()
        try:
            doc = json.loads(body)
        except ValueError as err:
            raise ApiError(response.status, "BadResponse", f"list is not JSON: {err}") from err
        if not isinstance(doc, dict) or not isinstance(doc.get("items") or [], list):
            raise ApiError(response.status, "BadResponse", "list has no items array")
        meta = doc.get("metadata") or {}
        items = [item for item in doc.get("items") or [] if isinstance(item, dict)]
        return ListPage(
            items=items,
            resource_version=str(meta.get("resourceVersion") or ""),
            continue_=str(meta["continue"]) if meta.get("continue") else None,
        )

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
    ) -> RawWatchStream:
        """Start watching `resource` from `resource_version`; see `RawWatchStream`."""
        query = _selectors(label_selector, field_selector)
        query.append(("watch", "true"))
        if resource_version:
            query.append(("resourceVersion", resource_version))
        if allow_bookmarks:
            query.append(("allowWatchBookmarks", "true"))
        query.append(("timeoutSeconds", str(timeout_seconds)))
        timeout = self.read_timeout if read_timeout is None else read_timeout
        return RawWatchStream(self._get(resource, query, timeout), resource, timeout)

    def _get(
        self, resource: ResourceRef, query: Query, read_timeout: float
    ) -> urllib3.BaseHTTPResponse:
        method, url, headers, body, post_params = self._api.param_serialize(
            method="GET",
            resource_path=resource.path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            wrapped = self._api.call_api(
                method,
                url,
                header_params=headers,
                body=body,
                post_params=post_params,
                _request_timeout=(self.connect_timeout, read_timeout),
            )
        except ApiException as err:
            # The client turns TLS failures into an ApiException with status 0.
            raise ApiError(int(err.status or 0), "TLSError", str(err.reason)) from err
        except urllib3.exceptions.HTTPError as err:
            raise _transport_error(err) from err
        response: urllib3.BaseHTTPResponse = wrapped.response
        if 200 <= response.status <= 299:
            return response
        try:
            body_bytes = response.read(_ERROR_BODY_LIMIT)
        except urllib3.exceptions.HTTPError:
            body_bytes = b""
        finally:
            response.release_conn()
        raise _status_error(resource, response.status, response.reason or "", body_bytes)


class RawWatchStream:
    """Watch events parsed from newline-delimited JSON as they arrive.

    Iterate from one thread; `close()` from any thread. Iterating raises
    `WatchExpired` (ERROR 410), `WatchError` (any other ERROR event, or a line that is
    not an event), `WatchTimeout` (nothing for `read_timeout` seconds) or
    `WatchDisconnected` (the connection broke); after `close()` iteration just ends.
    """

    def __init__(
        self, response: urllib3.BaseHTTPResponse, resource: ResourceRef, read_timeout: float
    ) -> None:
        self._response = response
        self._resource = resource
        self._read_timeout = read_timeout
        self._chunks = self._read_chunks()
        self._partial = bytearray()
        self._lines: deque[bytes] = deque()
        self._ended = False
        self._closed = False
        self._close_lock = threading.Lock()

    def __iter__(self) -> RawWatchStream:
        return self

    def __next__(self) -> WatchEvent:
        while True:
            while not self._lines:
                if self._ended:
                    raise StopIteration
                self._fill()
            line = self._lines.popleft()
            if line.strip():
                return self._decode(line)

    def close(self) -> None:
        """End the watch and release its connection; idempotent, any thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        # shutdown() first: it wakes a thread blocked reading this socket; close()
        # alone could wait for that read (the reader holds the buffer's lock).
        with contextlib.suppress(Exception):
            self._response.shutdown()
        with contextlib.suppress(Exception):
            self._response.close()

    def _fill(self) -> None:
        """Read one more chunk into `_lines`; at the end, flush the last partial line."""
        try:
            chunk = next(self._chunks, None)
        except Exception as err:
            if self._closed:
                chunk = None  # close() from another thread interrupted the read
            elif isinstance(err, urllib3.exceptions.ReadTimeoutError | TimeoutError):
                raise WatchTimeout(
                    f"{self._resource}: no data from the API server for {self._read_timeout:g}s"
                ) from err
            elif isinstance(err, urllib3.exceptions.HTTPError | OSError):
                raise WatchDisconnected(f"{self._resource}: watch connection lost: {err}") from err
            else:
                raise
        if chunk is None or self._closed:
            self._ended = True
            if self._partial.strip() and not self._closed:
                self._lines.append(bytes(self._partial))
            self._partial.clear()
            return
        if b"\n" not in chunk:
            self._partial += chunk
            return
        lines = (bytes(self._partial) + chunk).split(b"\n")
        self._partial = bytearray(lines.pop())
        self._lines.extend(lines)

    def _read_chunks(self) -> Iterator[bytes]:
        response = self._response
        if response.chunked:
            # One HTTP chunk per server flush, i.e. per event.
            yield from response.read_chunked(decode_content=True)
            return
        while data := response.read1(_READ_SIZE):
            yield data

    def _decode(self, line: bytes) -> WatchEvent:
        try:
            doc = json.loads(line)
        except ValueError as err:
            raise WatchError(0, "BadEvent", f"undecodable watch event {line[:200]!r}") from err
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("type"), str)
            or not isinstance(doc.get("object"), dict)
        ):
            raise WatchError(0, "BadEvent", f"not a watch event: {line[:200]!r}")
        event_type: str = doc["type"]
        obj: dict[str, Any] = doc["object"]
        if event_type != "ERROR":
            return WatchEvent(event_type, obj)
        code = _int(obj.get("code"))
        reason = str(obj.get("reason") or "")
        message = str(obj.get("message") or "")
        if code == 410 or reason in ("Expired", "Gone"):
            raise WatchExpired(
                f"{self._resource}: {message or reason or 'resource version expired'}"
            )
        raise WatchError(code, reason, message)


def _selectors(label_selector: str, field_selector: str) -> Query:
    query: Query = []
    if label_selector:
        query.append(("labelSelector", label_selector))
    if field_selector:
        query.append(("fieldSelector", field_selector))
    return query


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def _transport_error(err: urllib3.exceptions.HTTPError) -> ApiError:
    """No usable response: connection refused, DNS, timeout, reset."""
    cause: Exception = err
    if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason is not None:
        cause = err.reason
    return ApiError(0, type(cause).__name__, str(cause))


def _status_error(
    resource: ResourceRef, status: int, http_reason: str, body: bytes
) -> ApiError | WatchExpired:
    """An error status, with the message of the `Status` object the server sends."""
    reason, message = http_reason, body[:500].decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError):
        doc = json.loads(body)
        if isinstance(doc, dict):
            reason = str(doc.get("reason") or http_reason)
            message = str(doc.get("message") or "")
    if status == 410:
        return WatchExpired(f"{resource}: {message or 'resource version expired'}")
    return ApiError(status, reason, message)
