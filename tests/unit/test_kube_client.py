"""RawApi and load_api_config against a tiny HTTP server speaking the API's wire format.

The server runs on 127.0.0.1 in a thread of the test; each test sets `server.respond`
to decide what a request gets (JSON, a chunked watch stream, an error, a stall).
Stalls wait on `server.release`, set at teardown, so no handler thread outlives a test
by more than a moment.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client as k8s_client

from proxy.kube.client import ENDPOINTSLICES, NODES, SERVICES, RawApi, load_api_config
from proxy.kube.listwatch import (
    ApiError,
    ConfigError,
    WatchDisconnected,
    WatchError,
    WatchEvent,
    WatchExpired,
    WatchTimeout,
    list_all,
)
from proxy.kube.reflector import Reflector

STALL = 10.0  # the longest a handler ever waits for `release`


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeApiServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        request = Request(url.path, query, {k.lower(): v for k, v in self.headers.items()})
        self.server.requests.append(request)
        self.server.respond(self, request)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- response helpers -------------------------------------------------------------

    def send_json(self, status: int, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_status(self, code: int, reason: str, message: str) -> None:
        status = {"kind": "Status", "status": "Failure", "code": code}
        self.send_json(code, status | {"reason": reason, "message": message})

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def event(self, event_type: str, obj: object) -> None:
        self.chunk(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class FakeApiServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[Request] = []
        self.release = threading.Event()
        self.respond: Callable[[Handler, Request], None] = lambda h, r: h.send_json(404, {})
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    yield fake
    fake.close()


def make_api(server: FakeApiServer, read_timeout: float = 5.0) -> RawApi:
    return RawApi(k8s_client.Configuration(host=server.url), read_timeout=read_timeout)


def obj(name: str, rv: str, namespace: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": rv}}


def names(items: list[dict[str, Any]]) -> list[str]:
    return [item["metadata"]["name"] for item in items]


# -- resources ------------------------------------------------------------------------


def test_resource_paths_and_names() -> None:
    assert SERVICES.path == "/api/v1/services"
    assert ENDPOINTSLICES.path == "/apis/discovery.k8s.io/v1/endpointslices"
    assert NODES.path == "/api/v1/nodes"
    assert str(ENDPOINTSLICES) == "endpointslices.discovery.k8s.io"
    assert str(SERVICES) == "services"
    assert not NODES.namespaced


# -- list -----------------------------------------------------------------------------


def test_list_pages_follow_continue_tokens(server: FakeApiServer) -> None:
    def respond(handler: Handler, request: Request) -> None:
        if "continue" not in request.query:
            meta = {"resourceVersion": "10", "continue": "page2"}
            handler.send_json(200, {"metadata": meta, "items": [obj("a", "1"), obj("b", "2")]})
        else:
            handler.send_json(
                200, {"metadata": {"resourceVersion": "10"}, "items": [obj("c", "3")]}
            )

    server.respond = respond
    api = make_api(server)
    first = api.list(SERVICES, label_selector="!x.io/a,!x.io/b", limit=2)
    assert names(first.items) == ["a", "b"]
    assert (first.resource_version, first.continue_) == ("10", "page2")
    second = api.list(SERVICES, continue_=first.continue_)
    assert names(second.items) == ["c"]
    assert second.continue_ is None

    assert server.requests[0].path == "/api/v1/services"
    assert server.requests[0].query == {"labelSelector": "!x.io/a,!x.io/b", "limit": "2"}
    assert server.requests[1].query == {"limit": "500", "continue": "page2"}
    assert server.requests[0].headers["accept"] == "application/json"
    assert server.requests[0].headers["user-agent"].startswith("kube-proxy-py/")

    joined = list_all(api, SERVICES, page_size=2)
    assert names(joined.items) == ["a", "b", "c"]
    assert joined.resource_version == "10"
    assert joined.continue_ is None


def test_expired_continue_token_restarts_the_list(server: FakeApiServer) -> None:
    tokens = iter(["stale", "fresh"])

    def respond(handler: Handler, request: Request) -> None:
        token = request.query.get("continue")
        if token is None:
            meta = {"resourceVersion": "20", "continue": next(tokens)}
            handler.send_json(200, {"metadata": meta, "items": [obj("a", "1")]})
        elif token == "stale":
            handler.send_status(410, "Expired", "The provided continue parameter is too old")
        else:
            handler.send_json(
                200, {"metadata": {"resourceVersion": "21"}, "items": [obj("b", "2")]}
            )

    server.respond = respond
    api = make_api(server)
    with pytest.raises(WatchExpired):
        api.list(SERVICES, continue_="stale")
    page = list_all(api, SERVICES)
    assert names(page.items) == ["a", "b"]  # never mixed with the stale snapshot
    assert page.resource_version == "21"


def test_http_errors_become_api_errors(server: FakeApiServer) -> None:
    def respond(handler: Handler, request: Request) -> None:
        if request.path.startswith("/api/"):
            handler.send_status(500, "InternalError", "etcd is unhappy")
        else:
            handler.send_status(403, "Forbidden", 'cannot list "endpointslices"')

    server.respond = respond
    api = make_api(server)
    with pytest.raises(ApiError) as failed:
        api.list(SERVICES)
    assert (failed.value.status, failed.value.reason) == (500, "InternalError")
    assert failed.value.message == "etcd is unhappy"
    assert "HTTP 500" in str(failed.value)
    with pytest.raises(ApiError) as forbidden:
        api.watch(ENDPOINTSLICES, resource_version="1", timeout_seconds=300)
    assert forbidden.value.status == 403
    assert "endpointslices" in forbidden.value.message


def test_non_json_error_body_is_kept_as_message(server: FakeApiServer) -> None:
    def respond(handler: Handler, _request: Request) -> None:
        body = b"upstream connect error"
        handler.send_response(502)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    server.respond = respond
    with pytest.raises(ApiError) as failed:
        make_api(server).list(SERVICES)
    assert failed.value.status == 502
    assert failed.value.message == "upstream connect error"


def test_connection_refused_is_an_api_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = RawApi(k8s_client.Configuration(host=f"http://127.0.0.1:{port}"), connect_timeout=2)
    with pytest.raises(ApiError) as failed:
        api.list(SERVICES)
    assert failed.value.status == 0
    assert "refused" in str(failed.value).lower()
    with pytest.raises(ApiError):
        api.watch(SERVICES, resource_version="1", timeout_seconds=300)


# -- watch ----------------------------------------------------------------------------


def test_watch_yields_events_before_the_stream_ends(server: FakeApiServer) -> None:
    first_read = threading.Event()

    def respond(handler: Handler, _request: Request) -> None:
        handler.start_stream()
        handler.event("ADDED", obj("a", "11"))
        # The rest only once the client has the first event: a client that buffers
        # the response would never get it.
        if not first_read.wait(STALL):
            return
        line = json.dumps({"type": "MODIFIED", "object": obj("a", "12")}).encode() + b"\n"
        handler.chunk(line[:10])  # one event split over two chunks
        handler.chunk(line[10:])
        handler.chunk(  # two events in one chunk
            json.dumps(
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "13"}}}
            ).encode()
            + b"\n\n"
            + json.dumps({"type": "DELETED", "object": obj("a", "14")}).encode()
            + b"\n"
        )
        handler.end_stream()

    server.respond = respond
    stream = make_api(server).watch(
        SERVICES,
        resource_version="10",
        label_selector="!x.io/a",
        field_selector="metadata.name=a",
        timeout_seconds=321,
    )
    try:
        first = next(stream)
        first_read.set()
        rest = list(stream)
    finally:
        stream.close()
    assert first == WatchEvent("ADDED", obj("a", "11"))
    assert [(e.type, e.resource_version) for e in rest] == [
        ("MODIFIED", "12"),
        ("BOOKMARK", "13"),
        ("DELETED", "14"),
    ]
    assert server.requests[0].query == {
        "labelSelector": "!x.io/a",
        "fieldSelector": "metadata.name=a",
        "watch": "true",
        "resourceVersion": "10",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "321",
    }


def test_watch_without_chunked_encoding_streams_too(server: FakeApiServer) -> None:
    first_read = threading.Event()

    def respond(handler: Handler, _request: Request) -> None:
        # HTTP/1.0 style: no length, no chunks, the end is the connection closing.
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        handler.wfile.write(json.dumps({"type": "ADDED", "object": obj("a", "1")}).encode() + b"\n")
        handler.wfile.flush()
        if first_read.wait(STALL):
            handler.wfile.write(json.dumps({"type": "ADDED", "object": obj("b", "2")}).encode())

    server.respond = respond
    stream = make_api(server).watch(SERVICES, resource_version="0", timeout_seconds=300)
    assert next(stream).object == obj("a", "1")
    first_read.set()
    assert [event.object for event in stream] == [obj("b", "2")]  # last line unterminated


def test_error_event_410_raises_watch_expired(server: FakeApiServer) -> None:
    def respond(handler: Handler, _request: Request) -> None:
        handler.start_stream()
        handler.event("ADDED", obj("a", "5"))
        status = {"kind": "Status", "code": 410, "reason": "Expired"}
        handler.event("ERROR", status | {"message": "too old resource version: 5 (90)"})
        handler.end_stream()

    server.respond = respond
    stream = make_api(server).watch(SERVICES, resource_version="5", timeout_seconds=300)
    assert next(stream).type == "ADDED"
    with pytest.raises(WatchExpired, match="too old resource version"):
        next(stream)
    stream.close()


def test_http_410_on_watch_raises_watch_expired(server: FakeApiServer) -> None:
    server.respond = lambda handler, _request: handler.send_status(410, "Gone", "too old")
    with pytest.raises(WatchExpired):
        make_api(server).watch(SERVICES, resource_version="1", timeout_seconds=300)


def test_other_error_events_raise_watch_error(server: FakeApiServer) -> None:
    def respond(handler: Handler, _request: Request) -> None:
        handler.start_stream()
        handler.event("ERROR", {"kind": "Status", "code": 500, "reason": "InternalError"})
        handler.end_stream()

    server.respond = respond
    stream = make_api(server).watch(SERVICES, resource_version="5", timeout_seconds=300)
    with pytest.raises(WatchError) as failed:
        next(stream)
    assert (failed.value.code, failed.value.reason) == (500, "InternalError")


def test_garbage_line_raises_watch_error(server: FakeApiServer) -> None:
    def respond(handler: Handler, _request: Request) -> None:
        handler.start_stream()
        handler.chunk(b"<html>proxy error</html>\n")
        handler.end_stream()

    server.respond = respond
    stream = make_api(server).watch(SERVICES, resource_version="5", timeout_seconds=300)
    with pytest.raises(WatchError, match="undecodable"):
        next(stream)


def test_read_timeout_fires_when_the_server_stalls(server: FakeApiServer) -> None:
    def respond(handler: Handler, _request: Request) -> None:
        handler.start_stream()
        handler.event("ADDED", obj("a", "5"))
        server.release.wait(STALL)  # then nothing: a silently dead connection

    server.respond = respond
    stream = make_api(server, read_timeout=0.5).watch(
        SERVICES, resource_version="1", timeout_seconds=300
    )
    assert next(stream).type == "ADDED"
    started = time.monotonic()
    with pytest.raises(WatchTimeout, match="no data"):
        next(stream)
    assert 0.4 < time.monotonic() - started < 3.0
    stream.close()


def test_per_watch_read_timeout_overrides_the_default(server: FakeApiServer) -> None:
    def respond(handler: Handler, _request: Request) -> None:
        handler.start_stream()
        server.release.wait(STALL)

    server.respond = respond
    stream = make_api(server, read_timeout=60).watch(
        SERVICES, resource_version="1", timeout_seconds=300, read_timeout=0.3
    )
    started = time.monotonic()
    with pytest.raises(WatchTimeout):
        next(stream)
    assert time.monotonic() - started < 3.0


def test_connection_lost_mid_stream_raises_watch_disconnected(server: FakeApiServer) -> None:
    def respond(handler: Handler, _request: Request) -> None:
        handler.start_stream()
        handler.event("ADDED", obj("a", "5"))
        handler.wfile.write(b'40\r\n{"type":')  # half a chunk, then the server dies
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_RDWR)

    server.respond = respond
    stream = make_api(server).watch(SERVICES, resource_version="1", timeout_seconds=300)
    assert next(stream).type == "ADDED"
    with pytest.raises(WatchDisconnected):
        next(stream)


def test_close_from_another_thread_ends_a_blocked_read(server: FakeApiServer) -> None:
    def respond(handler: Handler, _request: Request) -> None:
        handler.start_stream()
        handler.event("ADDED", obj("a", "5"))
        server.release.wait(STALL)

    server.respond = respond
    stream = make_api(server, read_timeout=30).watch(
        SERVICES, resource_version="1", timeout_seconds=300
    )
    seen: list[WatchEvent] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            seen.extend(stream)
        except BaseException as err:
            errors.append(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen, "the first event never arrived"
    started = time.monotonic()
    stream.close()
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert time.monotonic() - started < 2.0  # not the 30 s read timeout
    assert errors == []
    stream.close()  # idempotent


# -- configuration --------------------------------------------------------------------


def write_kubeconfig(path: Path, server_url: str, token: str = "t0ken") -> Path:
    path.write_text(
        f"""
apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: {server_url}
users:
- name: proxy
  user:
    token: {token}
contexts:
- name: lab
  context:
    cluster: lab
    user: proxy
current-context: lab
"""
    )
    return path


def serve_empty_list(server: FakeApiServer) -> None:
    server.respond = lambda handler, _request: handler.send_json(
        200, {"metadata": {"resourceVersion": "1"}, "items": []}
    )


def test_kubeconfig_file_gives_host_and_token(
    server: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    serve_empty_list(server)
    kubeconfig = write_kubeconfig(tmp_path / "config", server.url)
    config = load_api_config(str(kubeconfig), None)
    assert config.host == server.url
    page = RawApi(config).list(NODES, field_selector="metadata.name=n1")
    assert page.items == []
    assert page.resource_version == "1"
    assert server.requests[0].headers["authorization"] == "Bearer t0ken"
    assert server.requests[0].query["fieldSelector"] == "metadata.name=n1"


def test_kubeconfig_from_environment(
    server: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_empty_list(server)
    kubeconfig = write_kubeconfig(tmp_path / "config", server.url, token="from-env")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{kubeconfig}")
    RawApi(load_api_config(None, None)).list(SERVICES)
    assert server.requests[0].headers["authorization"] == "Bearer from-env"


def test_master_overrides_the_kubeconfig_server(
    server: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    serve_empty_list(server)
    kubeconfig = write_kubeconfig(tmp_path / "config", "http://127.0.0.1:1")
    config = load_api_config(str(kubeconfig), server.url + "/")
    assert config.host == server.url
    RawApi(config).list(SERVICES)
    assert server.requests[0].headers["authorization"] == "Bearer t0ken"


def test_master_alone_needs_no_kubeconfig(
    server: FakeApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    serve_empty_list(server)
    host_port = server.url.removeprefix("http://")
    config = load_api_config(None, host_port)  # no scheme, no TLS: plain http
    assert config.host == server.url
    RawApi(config).list(SERVICES)
    assert "authorization" not in server.requests[0].headers


def test_nothing_configured_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(ConfigError, match="--kubeconfig or --master"):
        load_api_config(None, None)


def test_unreadable_kubeconfig_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    broken = tmp_path / "broken"
    broken.write_text("clusters: [")
    with pytest.raises(ConfigError, match="cannot use kubeconfig"):
        load_api_config(str(broken), None)
    with pytest.raises(ConfigError, match="cannot use kubeconfig"):
        load_api_config(str(tmp_path / "missing"), None)


def test_raw_api_leaves_the_callers_configuration_alone(server: FakeApiServer) -> None:
    config = k8s_client.Configuration(host=server.url)
    RawApi(config)
    assert config.retries is None
    assert config.keep_alive is False


# -- the reflector over real HTTP ------------------------------------------------------


class Calls:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def on_add(self, obj: dict[str, Any]) -> None:
        self.seen.append(("add", obj["metadata"]["name"]))

    def on_update(self, _old: dict[str, Any], new: dict[str, Any]) -> None:
        self.seen.append(("update", new["metadata"]["name"]))

    def on_delete(self, obj: dict[str, Any]) -> None:
        self.seen.append(("delete", obj["metadata"]["name"]))

    def on_synced(self) -> None:
        self.seen.append(("synced", ""))


def test_reflector_over_raw_api_relists_after_410_and_stops_promptly(
    server: FakeApiServer,
) -> None:
    lists = iter(
        [
            {"metadata": {"resourceVersion": "5"}, "items": [obj("a", "1"), obj("b", "1")]},
            {"metadata": {"resourceVersion": "9"}, "items": [obj("a", "1")]},
        ]
    )
    watches = iter(["expire", "stall"])
    stalled = threading.Event()

    def respond(handler: Handler, request: Request) -> None:
        if request.query.get("watch") != "true":
            handler.send_json(200, next(lists))
            return
        handler.start_stream()
        if next(watches) == "expire":
            handler.event("ADDED", obj("c", "6"))
            handler.event("ERROR", {"kind": "Status", "code": 410, "reason": "Expired"})
            handler.end_stream()
        else:
            stalled.set()
            server.release.wait(STALL)

    server.respond = respond
    calls = Calls()
    reflector = Reflector(make_api(server, read_timeout=30), SERVICES, calls)
    thread = threading.Thread(target=reflector.run, args=(threading.Event(),), daemon=True)
    thread.start()
    assert stalled.wait(5), "the second watch never started"
    deadline = time.monotonic() + 5
    while reflector.stats().watches < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # until the reflector holds the live stream, which stop() closes
    started = time.monotonic()
    reflector.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2.0
    assert calls.seen == [
        ("add", "a"),
        ("add", "b"),
        ("synced", ""),
        ("add", "c"),
        ("delete", "b"),  # deleted while the watch was gone: swept by the relist
        ("delete", "c"),
    ]
    watch_versions = [r.query["resourceVersion"] for r in server.requests if "watch" in r.query]
    assert watch_versions == ["5", "9"]
