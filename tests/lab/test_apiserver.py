"""The lab API double, exercised through real HTTP as a client of the real API would.

Every test starts its own `ApiServer` on 127.0.0.1 (a free port) and talks to it with
`http.client` (so the wire format is what is tested: status codes, `Status` bodies,
chunked newline-delimited watch streams), plus a few tests through the proxy's own
`RawApi` and `Reflector`, the clients the double exists for. Watches are read with a
socket timeout, so a test that expects an event which never comes fails within
seconds instead of hanging.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from lab.apierrors import ApiStatusError
from lab.apiserver import ApiServer, write_kubeconfig
from lab.apitables import human_duration
from proxy.kube.client import ENDPOINTSLICES, NODES, SERVICES, RawApi, load_api_config
from proxy.kube.listwatch import ApiError, RawObject, WatchExpired, WatchTimeout, list_all
from proxy.kube.reflector import Reflector

KUBE_PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
REPO = Path(__file__).resolve().parents[2]


# -- helpers ---------------------------------------------------------------------------------


class Client:
    """One request per connection; JSON in and out."""

    def __init__(self, base_url: str) -> None:
        url = urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", int(url.port or 80)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            all_headers = {"Content-Type": content_type, "Accept": "application/json"}
            all_headers.update(headers or {})
            conn.request(method, path, body=data, headers=all_headers)
            resp = conn.getresponse()
            raw = resp.read()
            if "json" in (resp.getheader("Content-Type") or ""):
                return resp.status, json.loads(raw)
            return resp.status, raw.decode()
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        status, doc = self.call("GET", path)
        assert status == 200, doc
        return doc

    def watch(self, path: str, timeout: float = 5.0) -> Watch:
        return Watch(self, path, timeout)


class StreamBrokenError(Exception):
    """The watch connection ended without the final chunk."""


class Watch:
    """A watch stream, chunk by chunk, each read bounded by `timeout` (TimeoutError).

    The chunked encoding is parsed here rather than by `http.client`, which reports a
    stream cut short exactly like a clean end; the difference is what some tests check.
    """

    def __init__(self, client: Client, path: str, timeout: float) -> None:
        self.conn = http.client.HTTPConnection(client.host, client.port, timeout=timeout)
        self.conn.request("GET", path, headers={"Accept": "application/json"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        assert self.resp.getheader("Transfer-Encoding") == "chunked"
        self.fp = self.resp.fp
        self.buffer = b""

    def next(self) -> dict[str, Any] | None:
        """The next event, or None when the server ended the stream cleanly."""
        while b"\n" not in self.buffer:
            size_line = self.fp.readline()
            if not size_line.endswith(b"\n"):
                raise StreamBrokenError(f"connection ended mid-stream ({size_line!r})")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                self.fp.readline()  # the CRLF after the last chunk
                return None
            chunk = self.fp.read(size + 2)
            if len(chunk) < size + 2:
                raise StreamBrokenError("connection ended inside a chunk")
            self.buffer += chunk[:-2]
        line, self.buffer = self.buffer.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        return event

    def take(self, count: int, skip_bookmarks: bool = True) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while len(events) < count:
            event = self.next()
            assert event is not None, f"stream ended after {events}"
            if skip_bookmarks and event["type"] == "BOOKMARK":
                continue
            events.append(event)
        return events

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def service(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("ports", [{"name": "http", "port": 80}])
    labels = spec.pop("labels", None)
    meta: dict[str, Any] = {"name": name}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def svc_path(name: str = "", namespace: str = "default") -> str:
    base = f"/api/v1/namespaces/{namespace}/services"
    return f"{base}/{name}" if name else base


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"].get("name", "")) for e in events]


@pytest.fixture
def api() -> Iterator[ApiServer]:
    server = ApiServer(bookmark_interval=0.2, history_size=1000)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(api: ApiServer) -> Client:
    return Client(api.url)


# -- discovery -------------------------------------------------------------------------------


def test_discovery_documents(client: Client) -> None:
    assert client.get("/version")["major"] == "1"
    assert client.get("/api")["versions"] == ["v1"]
    core = {r["name"]: r for r in client.get("/api/v1")["resources"]}
    assert core["services"]["namespaced"] is True
    assert core["services"]["shortNames"] == ["svc"]
    assert "watch" in core["services"]["verbs"]
    assert core["nodes"]["namespaced"] is False
    assert "services/status" in core and "namespaces" in core
    groups = {g["name"]: g for g in client.get("/apis")["groups"]}
    assert groups["discovery.k8s.io"]["preferredVersion"]["groupVersion"] == "discovery.k8s.io/v1"
    assert client.get("/apis/discovery.k8s.io")["versions"][0]["version"] == "v1"
    slices = client.get("/apis/discovery.k8s.io/v1")["resources"]
    assert [r["kind"] for r in slices] == ["EndpointSlice"]
    root = client.get("/openapi/v3")["paths"]
    doc = client.get(root["api/v1"]["serverRelativeURL"])
    patch_ops = [item["patch"] for item in doc["paths"].values()]
    assert {"group": "", "version": "v1", "kind": "Service"} in [
        op["x-kubernetes-group-version-kind"] for op in patch_ops
    ]
    assert client.call("GET", "/nonsense")[0] == 404
    status, body = client.call("GET", "/api/v1/configmaps")
    assert (status, body["reason"]) == (404, "NotFound")


# -- create, defaults, allocation, errors ----------------------------------------------------


def test_create_defaults_and_stamps_a_service(client: Client) -> None:
    status, svc = client.call("POST", svc_path(), service("web", selector={"app": "web"}))
    assert status == 201
    meta, spec = svc["metadata"], svc["spec"]
    assert meta["namespace"] == "default" and meta["uid"] and meta["creationTimestamp"]
    assert meta["resourceVersion"].isdigit()
    assert spec["type"] == "ClusterIP"
    assert spec["ports"] == [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]
    assert spec["clusterIP"].startswith("198.19.")
    assert spec["clusterIPs"] == [spec["clusterIP"]]
    assert spec["ipFamilies"] == ["IPv4"] and spec["ipFamilyPolicy"] == "SingleStack"
    assert spec["sessionAffinity"] == "None"
    assert client.get(svc_path("web")) == svc


def test_generate_name(client: Client) -> None:
    body = service("")
    body["metadata"] = {"generateName": "web-"}
    status, svc = client.call("POST", svc_path(), body)
    assert status == 201
    assert svc["metadata"]["name"].startswith("web-") and len(svc["metadata"]["name"]) == 9


def test_node_ports_are_allocated_and_collisions_rejected(client: Client) -> None:
    _, node_port = client.call("POST", svc_path(), service("np", type="NodePort"))
    _, lb = client.call(
        "POST",
        svc_path(),
        service("lb", type="LoadBalancer", externalTrafficPolicy="Local"),
    )
    ports = [node_port["spec"]["ports"][0]["nodePort"], lb["spec"]["ports"][0]["nodePort"]]
    assert all(30000 <= p <= 32767 for p in ports) and ports[0] != ports[1]
    assert 30000 <= lb["spec"]["healthCheckNodePort"] <= 32767
    assert lb["spec"]["externalTrafficPolicy"] == "Local"

    taken = service("dup", type="NodePort", ports=[{"port": 80, "nodePort": ports[0]}])
    status, err = client.call("POST", svc_path(), taken)
    assert (status, err["reason"]) == (422, "Invalid")
    assert "provided port is already allocated" in err["message"]
    assert err["details"]["causes"][0]["field"] == "spec.ports[0].nodePort"

    same_ip = service("dup-ip", clusterIP=node_port["spec"]["clusterIP"])
    status, err = client.call("POST", svc_path(), same_ip)
    assert status == 422 and "already allocated" in err["message"]

    outside = service("outside", clusterIP="198.18.5.5")
    status, err = client.call("POST", svc_path(), outside)
    assert status == 422 and "not in the valid range" in err["message"]

    # A deleted service gives its IP and ports back.
    assert client.call("DELETE", svc_path("np"))[0] == 200
    status, again = client.call("POST", svc_path(), taken)
    assert status == 201 and again["spec"]["ports"][0]["nodePort"] == ports[0]


def test_headless_and_external_name_services_get_no_cluster_ip(client: Client) -> None:
    _, headless = client.call("POST", svc_path(), service("db", clusterIP="None"))
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["clusterIPs"] == ["None"]
    _, external = client.call(
        "POST", svc_path(), service("ext", type="ExternalName", externalName="example.com")
    )
    assert "clusterIP" not in external["spec"]
    assert external["spec"]["externalName"] == "example.com"


def test_requested_cluster_ip_in_range_is_honoured(client: Client) -> None:
    status, svc = client.call("POST", svc_path(), service("fixed", clusterIP="198.19.7.7"))
    assert status == 201 and svc["spec"]["clusterIPs"] == ["198.19.7.7"]


def test_dual_stack_allocation_and_legacy_ip_spelling() -> None:
    api = ApiServer(service_cidr="198.19.0.0/16,2001:2::/112")
    dual = api.create("services", service("dual", ipFamilyPolicy="PreferDualStack"))
    assert dual["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    assert [ip.split(".")[0] if "." in ip else ip[:7] for ip in dual["spec"]["clusterIPs"]] == [
        "198",
        "2001:2:",
    ]
    v6 = api.create("services", service("v6", ipFamilies=["IPv6"]))
    assert v6["spec"]["ipFamilies"] == ["IPv6"] and ":" in v6["spec"]["clusterIP"]
    v6["spec"]["ipFamilyPolicy"] = "PreferDualStack"
    upgraded = api.update("services", v6)
    assert upgraded["spec"]["clusterIPs"][0] == v6["spec"]["clusterIP"]
    assert upgraded["spec"]["ipFamilies"] == ["IPv6", "IPv4"]
    assert len(upgraded["spec"]["clusterIPs"]) == 2
    # Leading zeros are decimal, as Go's legacy parser reads them: stored as given,
    # and the same address as its plain spelling.
    odd = api.create("services", service("odd", clusterIP="198.19.0.041"))
    assert odd["spec"]["clusterIP"] == "198.19.0.041"
    with pytest.raises(ApiStatusError, match="already allocated"):
        api.create("services", service("plain", clusterIP="198.19.0.41"))
    with pytest.raises(ApiStatusError, match="not configured for dual-stack"):
        ApiServer().create("services", service("x", ipFamilyPolicy="RequireDualStack"))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"ports": [{"port": 0}]}, "spec.ports[0].port"),
        ({"ports": [{"port": 70000}]}, "spec.ports[0].port"),
        ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol"),
        ({"ports": []}, "spec.ports"),
        ({"type": "Bogus"}, "spec.type"),
        ({"ports": [{"port": 80}, {"port": 81}]}, "spec.ports[0].name"),
        ({"ports": [{"port": 80, "nodePort": 30100}]}, "spec.ports[0].nodePort"),
    ],
)
def test_invalid_services_get_422_with_causes(
    client: Client, spec: dict[str, Any], field: str
) -> None:
    body = service("bad")
    body["spec"].update(spec)
    status, err = client.call("POST", svc_path(), body)
    assert status == 422
    assert err["kind"] == "Status" and err["reason"] == "Invalid" and err["code"] == 422
    assert err["message"].startswith('Service "bad" is invalid: ')
    assert field in [cause["field"] for cause in err["details"]["causes"]]


def test_status_objects_for_not_found_and_already_exists(client: Client) -> None:
    status, err = client.call("GET", svc_path("missing"))
    assert status == 404
    assert err == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'services "missing" not found',
        "reason": "NotFound",
        "details": {"name": "missing", "kind": "services"},
        "code": 404,
    }
    client.call("POST", svc_path(), service("web"))
    status, err = client.call("POST", svc_path(), service("web"))
    assert (status, err["reason"], err["message"]) == (
        409,
        "AlreadyExists",
        'services "web" already exists',
    )
    status, err = client.call(
        "GET", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/x"
    )
    assert err["message"] == 'endpointslices.discovery.k8s.io "x" not found'
    assert err["details"]["group"] == "discovery.k8s.io"


def test_bad_names_namespaces_and_bodies(client: Client) -> None:
    status, err = client.call("POST", svc_path(), service("Bad_Name"))
    assert status == 422 and "DNS-1035" in err["message"]
    status, err = client.call("POST", svc_path(namespace="nowhere"), service("web"))
    assert (status, err["message"]) == (404, 'namespaces "nowhere" not found')
    status, err = client.call("POST", svc_path(), b"{not json")
    assert status == 400
    other = service("web")
    other["metadata"]["namespace"] = "kube-system"
    status, err = client.call("POST", svc_path(), other)
    assert status == 400 and "does not match the namespace" in err["message"]
    strict = service("web")
    strict["spec"]["bogus"] = True
    status, err = client.call("POST", svc_path() + "?fieldValidation=Strict", strict)
    assert status == 400 and 'unknown field "spec.bogus"' in err["message"]
    status, lenient = client.call("POST", svc_path(), strict)  # not strict: dropped
    assert status == 201 and "bogus" not in lenient["spec"]


def test_token_is_enforced_when_configured() -> None:
    with ApiServer(token="s3cret") as server:
        client = Client(server.start())
        assert client.call("GET", "/api/v1/services")[0] == 401
        headers = {"Authorization": "Bearer s3cret"}
        assert client.call("GET", "/api/v1/services", headers=headers)[0] == 200


# -- resourceVersion, update, patch, delete -----------------------------------------------------


def test_resource_versions_are_one_global_increasing_counter(client: Client) -> None:
    seen = []
    for name in ("a", "b", "c"):
        _, svc = client.call("POST", svc_path(), service(name))
        seen.append(rv(svc))
    _, node = client.call("POST", "/api/v1/nodes", {"metadata": {"name": "n1"}})
    seen.append(rv(node))
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen == list(range(seen[0], seen[0] + 4))
    listed = client.get("/api/v1/services")
    assert int(listed["metadata"]["resourceVersion"]) == seen[-1]
    assert listed["kind"] == "ServiceList" and listed["apiVersion"] == "v1"


def test_update_with_a_stale_resource_version_is_a_conflict(client: Client) -> None:
    _, svc = client.call("POST", svc_path(), service("web", selector={"app": "web"}))
    svc["spec"]["selector"] = {"app": "v2"}
    status, updated = client.call("PUT", svc_path("web"), svc)
    assert status == 200 and rv(updated) == rv(svc) + 1
    assert updated["spec"]["clusterIP"] == svc["spec"]["clusterIP"]
    status, err = client.call("PUT", svc_path("web"), svc)  # svc still has the old version
    assert (status, err["reason"]) == (409, "Conflict")
    assert "the object has been modified" in err["message"]
    # A write that changes nothing creates no version.
    status, same = client.call("PUT", svc_path("web"), updated)
    assert status == 200 and rv(same) == rv(updated)


def test_update_keeps_allocations_and_rejects_changing_the_cluster_ip(client: Client) -> None:
    _, svc = client.call("POST", svc_path(), service("web", type="NodePort"))
    body = service("web", type="NodePort")  # no clusterIP, no nodePort, no rv
    status, updated = client.call("PUT", svc_path("web"), body)
    assert status == 200
    assert updated["spec"]["clusterIP"] == svc["spec"]["clusterIP"]
    assert updated["spec"]["ports"][0]["nodePort"] == svc["spec"]["ports"][0]["nodePort"]
    body["spec"]["clusterIP"] = "198.19.9.9"
    status, err = client.call("PUT", svc_path("web"), body)
    assert status == 422 and "may not change once set" in err["message"]
    # Switching to ClusterIP releases the node port; switching back allocates one.
    updated["spec"]["type"] = "ClusterIP"
    updated["spec"]["ports"][0].pop("nodePort")
    updated["spec"].pop("externalTrafficPolicy")
    status, plain = client.call("PUT", svc_path("web"), updated)
    assert status == 200 and "nodePort" not in plain["spec"]["ports"][0]


def test_status_subresource(client: Client) -> None:
    _, svc = client.call("POST", svc_path(), service("lb", type="LoadBalancer"))
    assert svc["status"] == {"loadBalancer": {}}
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.18.200.1"}]}}
    status, main = client.call("PUT", svc_path("lb"), svc)
    assert status == 200 and main["status"] == {"loadBalancer": {}}  # ignored on the main path
    status, updated = client.call("PUT", svc_path("lb") + "/status", svc)
    assert status == 200
    assert updated["status"]["loadBalancer"]["ingress"] == [{"ip": "198.18.200.1"}]
    patch = {"status": {"loadBalancer": {"ingress": [{"ip": "198.18.200.2"}]}}}
    status, patched = client.call(
        "PATCH",
        svc_path("lb") + "/status",
        patch,
        content_type="application/merge-patch+json",
    )
    assert patched["status"]["loadBalancer"]["ingress"] == [{"ip": "198.18.200.2"}]
    assert client.call("DELETE", svc_path("lb") + "/status")[0] == 405
    slice_status = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/x/status"
    assert client.call("GET", slice_status)[0] == 404


def test_patch_types(client: Client) -> None:
    _, svc = client.call("POST", svc_path(), service("web", selector={"app": "web"}))
    status, merged = client.call(
        "PATCH",
        svc_path("web"),
        {"metadata": {"labels": {"tier": "front"}}, "spec": {"selector": None}},
        content_type="application/merge-patch+json",
    )
    assert status == 200
    assert merged["metadata"]["labels"] == {"tier": "front"} and "selector" not in merged["spec"]
    assert rv(merged) == rv(svc) + 1
    status, strategic = client.call(
        "PATCH",
        svc_path("web"),
        {"metadata": {"labels": {"x": "y"}}, "$setElementOrder/ports": [{"port": 80}]},
        content_type="application/strategic-merge-patch+json",
    )
    assert status == 200 and strategic["metadata"]["labels"] == {"tier": "front", "x": "y"}
    ops = [
        {"op": "test", "path": "/metadata/labels/x", "value": "y"},
        {"op": "replace", "path": "/spec/ports/0/port", "value": 81},
        {"op": "remove", "path": "/metadata/labels/tier"},
    ]
    status, patched = client.call(
        "PATCH", svc_path("web"), ops, content_type="application/json-patch+json"
    )
    assert status == 200
    assert patched["spec"]["ports"][0]["port"] == 81 and patched["metadata"]["labels"] == {"x": "y"}
    failing = [{"op": "test", "path": "/metadata/labels/x", "value": "nope"}]
    status, _ = client.call(
        "PATCH", svc_path("web"), failing, content_type="application/json-patch+json"
    )
    assert status == 422
    stale = {"metadata": {"resourceVersion": str(rv(svc)), "labels": {"z": "1"}}}
    status, err = client.call(
        "PATCH", svc_path("web"), stale, content_type="application/merge-patch+json"
    )
    assert (status, err["reason"]) == (409, "Conflict")
    status, _ = client.call("PATCH", svc_path("web"), {}, content_type="text/plain")
    assert status == 415
    status, _ = client.call(
        "PATCH", svc_path("nope"), {}, content_type="application/merge-patch+json"
    )
    assert status == 404


def test_delete_answers_like_the_real_registry(client: Client) -> None:
    client.call("POST", svc_path(), service("web"))
    status, deleted = client.call("DELETE", svc_path("web"))
    assert status == 200 and deleted["kind"] == "Service"  # services return the object
    assert client.call("GET", svc_path("web"))[0] == 404
    assert client.call("DELETE", svc_path("web"))[0] == 404
    slice_path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
    body = {"metadata": {"name": "s1"}, "addressType": "IPv4", "endpoints": [], "ports": []}
    _, created = client.call("POST", slice_path, body)
    status, gone = client.call("DELETE", f"{slice_path}/s1")
    assert status == 200
    assert gone["kind"] == "Status" and gone["status"] == "Success"
    assert gone["details"] == {
        "name": "s1",
        "group": "discovery.k8s.io",
        "kind": "endpointslices",
        "uid": created["metadata"]["uid"],
    }
    client.call("POST", svc_path(), service("web"))
    precondition = {"preconditions": {"resourceVersion": "1"}}
    assert client.call("DELETE", svc_path("web"), precondition)[0] == 409


def test_finalizers_hold_a_deletion_until_removed(api: ApiServer, client: Client) -> None:
    node = {"metadata": {"name": "n1", "finalizers": ["lab/hold"]}, "spec": {}}
    client.call("POST", "/api/v1/nodes", node)
    with client.watch("/api/v1/nodes?watch=1&resourceVersion=" + api.resource_version) as watch:
        status, marked = client.call("DELETE", "/api/v1/nodes/n1")
        assert status == 200 and marked["metadata"]["deletionTimestamp"]
        assert client.get("/api/v1/nodes/n1")["metadata"]["deletionTimestamp"]
        marked["metadata"]["finalizers"] = []
        status, _ = client.call("PUT", "/api/v1/nodes/n1", marked)
        assert status == 200
        assert client.call("GET", "/api/v1/nodes/n1")[0] == 404
        events = watch.take(2)
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert events[1]["object"]["metadata"]["finalizers"] == []


def test_tests_can_set_node_taints_and_deletion_timestamp(api: ApiServer, client: Client) -> None:
    api.create("nodes", {"metadata": {"name": "n1"}})
    node = api.get("nodes", "n1")
    node["spec"]["taints"] = [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]
    node["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    api.update("nodes", node, validate=False)
    seen = client.get("/api/v1/nodes?fieldSelector=metadata.name%3Dn1")["items"][0]
    assert seen["metadata"]["deletionTimestamp"] == "2024-01-01T00:00:00Z"
    assert seen["spec"]["taints"][0]["key"] == "ToBeDeletedByClusterAutoscaler"
    # Through the validating path the API keeps deletionTimestamp to itself.
    seen["metadata"].pop("deletionTimestamp")
    assert "deletionTimestamp" in api.update("nodes", seen)["metadata"]


def test_namespace_lifecycle(api: ApiServer, client: Client) -> None:
    _, ns = client.call("POST", "/api/v1/namespaces", {"metadata": {"name": "team"}})
    assert ns["status"]["phase"] == "Active"
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "team"}
    client.call("POST", svc_path(namespace="team"), service("web"))
    status, _ = client.call("DELETE", "/api/v1/namespaces/team")
    assert status == 200
    assert client.call("GET", svc_path("web", "team"))[0] == 404
    status, err = client.call("DELETE", "/api/v1/namespaces/default")
    assert (status, err["reason"]) == (403, "Forbidden")


def test_in_process_store_api(api: ApiServer) -> None:
    created = api.create("services", service("web"), namespace="default")
    created["spec"]["ports"][0]["port"] = 81
    updated = api.update("services", created)
    assert updated["spec"]["ports"][0]["port"] == 81
    assert api.get("services", "web", namespace="default") == updated
    patched = api.patch(
        "services", "web", {"metadata": {"labels": {"a": "b"}}}, namespace="default"
    )
    assert api.list("services", label_selector="a=b") == [patched]
    with pytest.raises(ApiStatusError) as conflict:
        api.update("services", created)
    assert conflict.value.code == 409
    api.delete("services", "web", namespace="default")
    with pytest.raises(ApiStatusError) as missing:
        api.get("services", "web", namespace="default")
    assert (missing.value.code, missing.value.reason) == (404, "NotFound")
    # Objects "that slipped past validation", for bad-input tests.
    bad = service("bad", clusterIP="198.18.0.999", ports=[{"port": 0, "protocol": "ICMP"}])
    stored = api.create("services", bad, validate=False)
    assert stored["spec"]["clusterIP"] == "198.18.0.999" and stored["spec"]["ports"][0]["port"] == 0


# -- list: selectors, pagination --------------------------------------------------------------


def test_kube_proxy_label_selector_and_other_selectors(client: Client) -> None:
    client.call("POST", svc_path(), service("plain", labels={"app": "a"}))
    client.call(
        "POST",
        svc_path(),
        service("other-proxy", labels={"service.kubernetes.io/service-proxy-name": "x"}),
    )
    client.call(
        "POST",
        svc_path(),
        service("headless", clusterIP="None", labels={"service.kubernetes.io/headless": ""}),
    )
    client.call("POST", svc_path(namespace="kube-system"), service("dns", labels={"app": "b"}))

    def names(query: str) -> list[str]:
        doc = client.get("/api/v1/services?" + query)
        return sorted(item["metadata"]["name"] for item in doc["items"])

    assert names("labelSelector=" + quote(KUBE_PROXY_SELECTOR)) == ["dns", "plain"]
    assert names("labelSelector=" + quote("app in (a,b)")) == ["dns", "plain"]
    assert names("labelSelector=" + quote("app notin (a)")) == ["dns", "headless", "other-proxy"]
    assert names("labelSelector=" + quote("app!=a,app")) == ["dns"]
    assert names("fieldSelector=" + quote("metadata.namespace=kube-system")) == ["dns"]
    assert names("fieldSelector=" + quote("metadata.name!=dns,metadata.namespace==default")) == [
        "headless",
        "other-proxy",
        "plain",
    ]
    assert names("fieldSelector=" + quote("spec.clusterIP=None")) == ["headless"]
    namespaced = client.get(svc_path(namespace="kube-system"))["items"]
    assert [s["metadata"]["name"] for s in namespaced] == ["dns"]
    status, err = client.call("GET", "/api/v1/services?labelSelector=" + quote("a in ("))
    assert (status, err["reason"]) == (400, "BadRequest")
    status, err = client.call("GET", "/api/v1/services?fieldSelector=spec.bogus%3D1")
    assert status == 400 and "field label not supported" in err["message"]


def test_node_field_selector_as_kube_proxy_uses_it(client: Client) -> None:
    for name in ("node-a", "node-b"):
        client.call("POST", "/api/v1/nodes", {"metadata": {"name": name}})
    doc = client.get("/api/v1/nodes?fieldSelector=metadata.name%3Dnode-b")
    assert [n["metadata"]["name"] for n in doc["items"]] == ["node-b"]
    assert client.get("/api/v1/nodes?fieldSelector=metadata.name%3Dnope")["items"] == []


def test_pagination_is_a_consistent_snapshot(api: ApiServer, client: Client) -> None:
    for i in range(25):
        api.create("services", service(f"svc-{i:02d}"))
    first = client.get("/api/v1/services?limit=10")
    assert len(first["items"]) == 10
    token = first["metadata"]["continue"]
    assert first["metadata"]["remainingItemCount"] == 15
    snapshot_rv = first["metadata"]["resourceVersion"]
    api.create("services", service("svc-99"))  # after the snapshot: not in this list
    api.delete("services", "svc-20", namespace="default")  # still in this list
    names = [s["metadata"]["name"] for s in first["items"]]
    while token:
        page = client.get("/api/v1/services?limit=10&continue=" + quote(token))
        assert page["metadata"]["resourceVersion"] == snapshot_rv
        names += [s["metadata"]["name"] for s in page["items"]]
        token = page["metadata"].get("continue")
    assert names == [f"svc-{i:02d}" for i in range(25)]

    again = client.get("/api/v1/services?limit=10")
    api.compact()
    status, err = client.call(
        "GET", "/api/v1/services?limit=10&continue=" + quote(again["metadata"]["continue"])
    )
    assert (status, err["reason"], err["code"]) == (410, "Expired", 410)
    assert client.call("GET", "/api/v1/services?continue=garbage!")[0] == 400


def test_list_of_ten_thousand_services_and_slices_is_fast(api: ApiServer, client: Client) -> None:
    for i in range(10_000):
        api.create(
            "services",
            service(f"s{i}", labels={"app": f"a{i % 10}"}),
            namespace="default",
            validate=False,
        )
        api.create(
            "endpointslices",
            {
                "metadata": {
                    "name": f"s{i}-abcde",
                    "labels": {"kubernetes.io/service-name": f"s{i}"},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["198.18.64.10"]}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            },
            namespace="default",
            validate=False,
        )
    for path in (
        "/api/v1/services?labelSelector=" + quote(KUBE_PROXY_SELECTOR),
        "/apis/discovery.k8s.io/v1/endpointslices",
    ):
        started = time.monotonic()
        doc = client.get(path)
        elapsed = time.monotonic() - started
        assert len(doc["items"]) == 10_000
        assert elapsed < 1.0, f"{path} took {elapsed:.2f}s"


# -- watch ------------------------------------------------------------------------------------


def test_list_then_watch_resumes_without_gaps(api: ApiServer, client: Client) -> None:
    api.create("services", service("before"))
    listed = client.get("/api/v1/services")
    list_rv = listed["metadata"]["resourceVersion"]
    # Changes between the list and the watch are replayed from history.
    api.create("services", service("between"))
    with client.watch(f"/api/v1/services?watch=true&resourceVersion={list_rv}") as watch:
        api.delete("services", "before", namespace="default")
        current = api.get("services", "between", namespace="default")
        current["metadata"]["labels"] = {"x": "y"}
        api.update("services", current)
        events = watch.take(3)
    assert summary(events) == [("ADDED", "between"), ("DELETED", "before"), ("MODIFIED", "between")]
    versions = [rv(e["object"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(list_rv)
    # A resume from the middle replays only what came after.
    with client.watch(f"/api/v1/services?watch=1&resourceVersion={versions[0]}") as watch:
        assert summary(watch.take(2)) == [("DELETED", "before"), ("MODIFIED", "between")]


def test_watch_without_version_starts_with_synthetic_adds(api: ApiServer, client: Client) -> None:
    api.create("services", service("a"))
    api.create("services", service("b"))
    with client.watch("/api/v1/services?watch=true") as watch:
        assert summary(watch.take(2)) == [("ADDED", "a"), ("ADDED", "b")]
        api.create("services", service("c"))
        assert summary(watch.take(1)) == [("ADDED", "c")]
    with client.watch("/api/v1/services?watch=true&resourceVersion=0") as watch:
        assert len(watch.take(3)) == 3


def test_send_initial_events_ends_with_a_marked_bookmark(api: ApiServer, client: Client) -> None:
    api.create("services", service("a"))
    path = (
        "/api/v1/services?watch=1&sendInitialEvents=true&allowWatchBookmarks=true"
        "&resourceVersionMatch=NotOlderThan"
    )
    with client.watch(path) as watch:
        added, bookmark = watch.take(2, skip_bookmarks=False)
    assert added["type"] == "ADDED"
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_timeout_seconds_ends_the_stream_cleanly(api: ApiServer, client: Client) -> None:
    started = time.monotonic()
    with client.watch(
        f"/api/v1/services?watch=1&timeoutSeconds=1&resourceVersion={api.resource_version}"
    ) as watch:
        assert watch.next() is None  # a clean end: the final chunk arrived
    assert 0.9 <= time.monotonic() - started < 3.0


def test_bookmarks_arrive_and_carry_only_the_version(api: ApiServer, client: Client) -> None:
    path = (
        f"/api/v1/services?watch=1&allowWatchBookmarks=true&resourceVersion={api.resource_version}"
    )
    with client.watch(path, timeout=3) as watch:
        api.create("services", service("a"))
        first, second = watch.take(2, skip_bookmarks=False)
    assert first["type"] == "ADDED"
    assert second == {
        "type": "BOOKMARK",
        "object": {
            "kind": "Service",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": api.resource_version},
        },
    }
    # Without allowWatchBookmarks there are none: the read times out.
    with (
        client.watch(
            f"/api/v1/services?watch=1&resourceVersion={api.resource_version}", timeout=0.6
        ) as watch,
        pytest.raises(TimeoutError),
    ):
        watch.next()


def test_watch_from_compacted_history_is_410_in_an_error_event(
    api: ApiServer, client: Client
) -> None:
    api.create("services", service("a"))
    old = api.resource_version
    api.create("services", service("b"))
    api.compact()
    with client.watch(f"/api/v1/services?watch=1&resourceVersion={old}") as watch:
        event = watch.next()
        assert event is not None and event["type"] == "ERROR"
        assert event["object"]["code"] == 410
        assert event["object"]["reason"] in ("Expired", "Gone")
        assert watch.next() is None
    # The current version is still a valid starting point.
    with client.watch(f"/api/v1/services?watch=1&resourceVersion={api.resource_version}") as watch:
        api.create("services", service("c"))
        assert summary(watch.take(1)) == [("ADDED", "c")]


def test_history_is_a_bounded_window() -> None:
    with ApiServer(history_size=5) as server:
        client = Client(server.start())
        start = server.resource_version
        for i in range(12):
            server.create("services", service(f"s{i}"))
        with client.watch(f"/api/v1/services?watch=1&resourceVersion={start}") as watch:
            event = watch.next()
            assert event is not None and event["object"]["code"] == 410
        recent = int(server.resource_version) - 4
        with client.watch(f"/api/v1/services?watch=1&resourceVersion={recent}") as watch:
            assert len(watch.take(4)) == 4


def test_watch_applies_selectors_like_the_watch_cache(api: ApiServer, client: Client) -> None:
    api.create("services", service("web", labels={"app": "web"}))
    path = "/api/v1/services?watch=1&labelSelector=" + quote("app=web")
    with client.watch(f"{path}&resourceVersion={api.resource_version}") as watch:
        current = api.get("services", "web", namespace="default")
        current["metadata"]["labels"] = {"app": "other"}
        moved = api.update("services", current)
        api.create("services", service("noise", labels={"app": "noise"}))
        current = api.get("services", "web", namespace="default")
        current["metadata"]["labels"] = {"app": "web"}
        api.update("services", current)
        events = watch.take(2)
    assert summary(events) == [("DELETED", "web"), ("ADDED", "web")]
    # The DELETED carries the last matching content with the new version.
    assert events[0]["object"]["metadata"]["labels"] == {"app": "web"}
    assert rv(events[0]["object"]) == rv(moved)
    name_path = "/api/v1/nodes?watch=1&fieldSelector=metadata.name%3Dn2"
    with client.watch(f"{name_path}&resourceVersion={api.resource_version}") as watch:
        api.create("nodes", {"metadata": {"name": "n1"}})
        api.create("nodes", {"metadata": {"name": "n2"}})
        assert summary(watch.take(1)) == [("ADDED", "n2")]


def test_namespaced_watch_sees_only_its_namespace(api: ApiServer, client: Client) -> None:
    with client.watch(
        svc_path(namespace="kube-system") + f"?watch=1&resourceVersion={api.resource_version}"
    ) as watch:
        api.create("services", service("web"), namespace="default")
        api.create("services", service("dns"), namespace="kube-system")
        assert summary(watch.take(1)) == [("ADDED", "dns")]


# -- faults -----------------------------------------------------------------------------------


def test_expire_watches_sends_410_and_ends(api: ApiServer, client: Client) -> None:
    with client.watch(f"/api/v1/services?watch=1&resourceVersion={api.resource_version}") as watch:
        api.wait_for_watches("services")
        assert api.expire_watches() == 1
        event = watch.next()
        assert event is not None and event["type"] == "ERROR" and event["object"]["code"] == 410
        assert watch.next() is None
    api.wait_for_watches_closed("services")


def test_stalled_watch_keeps_the_connection_but_sends_nothing(
    api: ApiServer, client: Client
) -> None:
    path = (
        f"/api/v1/services?watch=1&allowWatchBookmarks=true&resourceVersion={api.resource_version}"
    )
    with client.watch(path, timeout=0.8) as watch:
        api.wait_for_watches("services")
        api.stall_watches()
        api.create("services", service("unseen"))
        with pytest.raises(TimeoutError):
            watch.next()  # neither the event nor a bookmark: only our timeout notices
    # The server notices the client hung up and frees the watch; new watches work.
    api.wait_for_watches_closed("services", timeout=3)
    with client.watch(f"/api/v1/services?watch=1&resourceVersion={api.resource_version}") as watch:
        api.create("services", service("seen"))
        assert summary(watch.take(1)) == [("ADDED", "seen")]


def test_dropped_watch_breaks_mid_stream(api: ApiServer, client: Client) -> None:
    with client.watch(f"/api/v1/services?watch=1&resourceVersion={api.resource_version}") as watch:
        api.wait_for_watches("services")
        api.drop_watches()
        with pytest.raises(StreamBrokenError):
            watch.next()


def test_fail_requests_answers_with_the_status(api: ApiServer, client: Client) -> None:
    api.fail_requests(status=500, count=2, path_prefix="/api/v1/services")
    for _ in range(2):
        status, err = client.call("GET", "/api/v1/services")
        assert (status, err["reason"], err["code"]) == (500, "InternalError", 500)
    assert client.call("GET", "/api/v1/services")[0] == 200
    api.fail_requests(status=403, count=1, path_prefix="/api/v1/nodes", method="GET")
    assert client.call("GET", "/api/v1/services")[0] == 200  # another path: unaffected
    status, err = client.call("GET", "/api/v1/nodes")
    assert (status, err["reason"]) == (403, "Forbidden")
    api.fail_requests(status=503, count=5)
    api.clear_faults()
    assert client.call("GET", "/version")[0] == 200


def test_restart_on_the_same_port_keeps_the_store(api: ApiServer, client: Client) -> None:
    api.create("services", service("kept"))
    watch = client.watch(f"/api/v1/services?watch=1&resourceVersion={api.resource_version}")
    api.wait_for_watches("services")
    url = api.url
    api.stop()
    with pytest.raises((StreamBrokenError, ConnectionError)):
        watch.next()
    watch.close()
    with pytest.raises(ConnectionError):
        client.call("GET", "/version")
    api.delete("services", "kept", namespace="default")  # the store works while down
    assert api.restart() == url
    assert client.get("/api/v1/services")["items"] == []
    api.stop()
    assert api.start(port=api.port) == url


# -- the proxy's own clients ------------------------------------------------------------------


def raw_api(api: ApiServer, tmp_path: Path, read_timeout: float = 5.0) -> RawApi:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
    return RawApi(load_api_config(str(kubeconfig), None), read_timeout=read_timeout)


def test_raw_api_lists_pages_and_watches(api: ApiServer, tmp_path: Path) -> None:
    for i in range(7):
        api.create("services", service(f"s{i}"))
    api.create("services", service("hidden", labels={"service.kubernetes.io/headless": ""}))
    client = raw_api(api, tmp_path)
    try:
        page = list_all(client, SERVICES, label_selector=KUBE_PROXY_SELECTOR, page_size=3)
        assert len(page.items) == 7 and page.resource_version == api.resource_version
        stream = client.watch(
            SERVICES,
            resource_version=page.resource_version,
            label_selector=KUBE_PROXY_SELECTOR,
            timeout_seconds=5,
        )
        api.create("services", service("new"))
        first = next(stream)
        assert (first.type, first.object["metadata"]["name"]) == ("ADDED", "new")
        stream.close()
        api.compact()
        stale = client.watch(SERVICES, resource_version=page.resource_version, timeout_seconds=5)
        with pytest.raises(WatchExpired):
            next(stale)
        api.fail_requests(status=403, path_prefix="/apis/discovery.k8s.io")
        with pytest.raises(ApiError) as denied:
            client.list(ENDPOINTSLICES)
        assert denied.value.status == 403
    finally:
        client.close()


def test_raw_api_read_timeout_notices_a_stalled_watch(api: ApiServer, tmp_path: Path) -> None:
    client = raw_api(api, tmp_path, read_timeout=0.5)
    try:
        stream = client.watch(NODES, resource_version=api.resource_version, timeout_seconds=30)
        api.wait_for_watches("nodes")
        api.stall_watches()
        api.create("nodes", {"metadata": {"name": "n1"}})
        with pytest.raises(WatchTimeout):
            next(stream)
        stream.close()
    finally:
        client.close()


class Recorder:
    def __init__(self) -> None:
        self.synced = threading.Event()

    def on_add(self, obj: RawObject) -> None:
        pass

    def on_update(self, old: RawObject, new: RawObject) -> None:
        pass

    def on_delete(self, obj: RawObject) -> None:
        pass

    def on_synced(self) -> None:
        self.synced.set()


def wait_until(what: str, check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_reflector_survives_restart_and_compaction(api: ApiServer, tmp_path: Path) -> None:
    api.create("services", service("stays"))
    api.create("services", service("goes"))
    client = raw_api(api, tmp_path, read_timeout=2.0)
    recorder = Recorder()
    reflector = Reflector(client, SERVICES, recorder, label_selector=KUBE_PROXY_SELECTOR)
    thread = threading.Thread(target=reflector.run, args=(threading.Event(),), daemon=True)
    thread.start()
    try:
        assert recorder.synced.wait(5)
        api.wait_for_watches("services")
        api.create("services", service("live"))
        wait_until("the live add", lambda: "default/live" in reflector.snapshot())
        # Outage: a deletion the watch cannot see, then history is gone.
        api.stop()
        api.delete("services", "goes", namespace="default")
        api.compact()
        api.restart()
        wait_until(
            "the relist to drop the deletion", lambda: "default/goes" not in reflector.snapshot()
        )
        assert set(reflector.snapshot()) == {"default/stays", "default/live"}
    finally:
        reflector.stop()
        thread.join(5)
        client.close()


# -- table output and the command line ---------------------------------------------------------


def test_table_answers_for_kubectl(api: ApiServer, client: Client) -> None:
    api.create("services", service("web", type="NodePort", selector={"app": "web"}))
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    status, doc = client.call("GET", "/api/v1/services", headers={"Accept": accept})
    assert status == 200 and doc["kind"] == "Table"
    columns = [c["name"] for c in doc["columnDefinitions"]]
    assert columns[:5] == ["Name", "Type", "Cluster-IP", "External-IP", "Port(s)"]
    cells = doc["rows"][0]["cells"]
    assert cells[0] == "web" and cells[1] == "NodePort" and cells[4].startswith("80:3")
    assert doc["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    assert [human_duration(s) for s in (5, 119, 125, 600, 3 * 3600 + 60, 49 * 3600)] == [
        "5s",
        "119s",
        "2m5s",
        "10m",
        "3h1m",
        "2d1h",
    ]


def test_command_line_server(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lab.apiserver",
            "--port",
            str(port),
            "--kubeconfig-out",
            str(kubeconfig),
            "--node",
            "n1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        assert url == f"http://127.0.0.1:{port}"
        assert f"server: {url}" in kubeconfig.read_text()
        nodes = Client(url).get("/api/v1/nodes")["items"]
        assert [n["metadata"]["name"] for n in nodes] == ["n1"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
