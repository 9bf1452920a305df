"""The lab's EndpointSlice writer against the API double's store (in-process, no HTTP).

Services are created through the `ApiServer`'s store API, so the writer reacts to
them through its subscription, as it does in the lab; one test creates the Service
over HTTP to show that kubectl-made services get slices too.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from lab.apiserver import ApiServer
from lab.slicewriter import (
    HEADLESS_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    TRIGGER_TIME_ANNOTATION,
    LabPod,
    SliceWriter,
    rfc3339_nano,
)

WEB = {"app": "web"}
PORTS = {"http": (8080, "TCP"), "dns": (5353, "UDP")}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.25

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.5) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def api() -> ApiServer:
    return ApiServer()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def writer(api: ApiServer, clock: FakeClock) -> Iterator[SliceWriter]:
    sw = SliceWriter(api, clock=clock)
    yield sw
    sw.close()


def pod(
    name: str,
    ip: str,
    *,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    terminating: bool = False,
    ports: dict[str, tuple[int, str]] | None = None,
    namespace: str = "default",
    node: str = "lab-node",
) -> LabPod:
    return LabPod(
        name=name,
        namespace=namespace,
        ip=ip,
        node_name=node,
        labels=WEB if labels is None else labels,
        ready=ready,
        terminating=terminating,
        container_ports=PORTS if ports is None else ports,
    )


def create_service(
    api: ApiServer, name: str = "web", selector: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    spec.setdefault("ports", [{"name": "http", "port": 80, "targetPort": "http"}])
    if selector is not None or "selector" not in spec:
        spec["selector"] = WEB if selector is None else selector
    labels = spec.pop("labels", None)
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return api.create("services", {"metadata": meta, "spec": spec}, namespace="default")


def slices(api: ApiServer, service: str = "web") -> list[dict[str, Any]]:
    return api.list("endpointslices", label_selector=f"{SERVICE_NAME_LABEL}={service}")


def only_slice(api: ApiServer, service: str = "web") -> dict[str, Any]:
    found = slices(api, service)
    assert len(found) == 1, found
    return found[0]


def addresses(slice_: dict[str, Any]) -> list[str]:
    return [ep["addresses"][0] for ep in slice_["endpoints"] or []]


def test_a_new_service_gets_a_slice_like_the_controller_writes(
    api: ApiServer, writer: SliceWriter, clock: FakeClock
) -> None:
    writer.set_pod(pod("web-1", "198.18.64.10"))
    writer.set_pod(pod("other", "198.18.64.11", labels={"app": "other"}))
    created_at = clock.tick()
    svc = create_service(api)
    slice_ = only_slice(api)
    meta = slice_["metadata"]
    assert meta["name"].startswith("web-") and len(meta["name"]) == len("web-") + 5
    assert meta["labels"] == {SERVICE_NAME_LABEL: "web", MANAGED_BY_LABEL: MANAGED_BY}
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "name": "web",
            "uid": svc["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["annotations"][TRIGGER_TIME_ANNOTATION] == rfc3339_nano(created_at)
    assert slice_["addressType"] == "IPv4"
    assert slice_["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert slice_["endpoints"] == [
        {
            "addresses": ["198.18.64.10"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": "lab-node",
            "targetRef": {
                "kind": "Pod",
                "namespace": "default",
                "name": "web-1",
                "uid": pod("web-1", "198.18.64.10").uid,
            },
        }
    ]


def test_trigger_time_is_rfc3339_with_fraction_in_utc() -> None:
    stamp = rfc3339_nano(1_700_000_000.25)
    assert stamp == "2023-11-14T22:13:20.25Z"
    assert rfc3339_nano(1_700_000_000.0) == "2023-11-14T22:13:20Z"
    assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() == 1_700_000_000.25


def test_pod_changes_update_the_slice_with_their_time(
    api: ApiServer, writer: SliceWriter, clock: FakeClock
) -> None:
    create_service(api)
    placeholder = only_slice(api)
    assert placeholder["endpoints"] == [] and placeholder["ports"] == []
    added_at = clock.tick()
    writer.set_pod(pod("web-1", "198.18.64.10"))
    updated = only_slice(api)
    assert updated["metadata"]["name"] == placeholder["metadata"]["name"]  # updated in place
    assert addresses(updated) == ["198.18.64.10"]
    assert updated["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] == rfc3339_nano(added_at)

    clock.tick()
    writer.set_pod(pod("web-2", "198.18.64.11", ready=False))
    writer.set_pod(pod("web-3", "198.18.64.12", terminating=True))
    conditions = {ep["targetRef"]["name"]: ep["conditions"] for ep in only_slice(api)["endpoints"]}
    assert conditions["web-2"] == {"ready": False, "serving": False, "terminating": False}
    assert conditions["web-3"] == {"ready": False, "serving": True, "terminating": True}

    removed_at = clock.tick()
    writer.remove_pod("web-1", "default")
    final = only_slice(api)
    assert addresses(final) == ["198.18.64.11", "198.18.64.12"]
    assert final["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] == rfc3339_nano(removed_at)


def test_a_pod_leaving_the_selector_leaves_the_slice(api: ApiServer, writer: SliceWriter) -> None:
    create_service(api)
    writer.set_pod(pod("web-1", "198.18.64.10"))
    writer.set_pod(pod("web-1", "198.18.64.10", labels={"app": "moved"}))
    assert addresses(only_slice(api)) == []


def test_syncing_without_changes_writes_nothing(api: ApiServer, writer: SliceWriter) -> None:
    writer.set_pod(pod("web-1", "198.18.64.10"))
    create_service(api)
    before = api.resource_version
    writer.sync_service("default", "web")
    writer.sync_all()
    writer.set_pod(pod("web-1", "198.18.64.10"))  # the same pod again
    assert api.resource_version == before


def test_named_ports_resolve_per_pod_and_group_into_slices(
    api: ApiServer, writer: SliceWriter
) -> None:
    writer.set_pod(pod("full", "198.18.64.10"))
    writer.set_pod(pod("tcp-only", "198.18.64.11", ports={"http": (9090, "TCP")}))
    writer.set_pod(pod("wrong-proto", "198.18.64.12", ports={"http": (8080, "UDP")}))
    create_service(
        api,
        ports=[
            {"name": "http", "port": 80, "targetPort": "http"},
            {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"},
            {"name": "metrics", "port": 9100, "targetPort": 9100},
        ],
    )
    by_ports = {json.dumps(s["ports"], sort_keys=True): sorted(addresses(s)) for s in slices(api)}
    assert by_ports == {
        json.dumps(
            [
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
                {"name": "metrics", "port": 9100, "protocol": "TCP"},
            ],
            sort_keys=True,
        ): ["198.18.64.10"],
        json.dumps(
            [
                {"name": "http", "port": 9090, "protocol": "TCP"},
                {"name": "metrics", "port": 9100, "protocol": "TCP"},
            ],
            sort_keys=True,
        ): ["198.18.64.11"],
        json.dumps([{"name": "metrics", "port": 9100, "protocol": "TCP"}], sort_keys=True): [
            "198.18.64.12"
        ],
    }


def test_service_updates_and_deletion_through_the_store(
    api: ApiServer, writer: SliceWriter
) -> None:
    writer.set_pod(pod("web-1", "198.18.64.10"))
    svc = create_service(api, labels={"team": "a"})
    name = only_slice(api)["metadata"]["name"]
    svc["spec"]["ports"][0]["targetPort"] = 8081
    svc["metadata"]["labels"] = {"team": "b"}
    api.update("services", svc)
    updated = only_slice(api)
    assert updated["metadata"]["name"] == name
    assert updated["ports"][0]["port"] == 8081
    assert updated["metadata"]["labels"]["team"] == "b"
    api.delete("services", "web", namespace="default")
    assert slices(api) == []


def test_no_slices_without_selector_or_for_external_name(
    api: ApiServer, writer: SliceWriter
) -> None:
    writer.set_pod(pod("web-1", "198.18.64.10"))
    svc = create_service(api)
    assert len(slices(api)) == 1
    svc["spec"].pop("selector")
    api.update("services", svc)
    assert slices(api) == []
    api.create(
        "services",
        {
            "metadata": {"name": "ext"},
            "spec": {"type": "ExternalName", "externalName": "example.com", "selector": WEB},
        },
        namespace="default",
    )
    assert slices(api, "ext") == []


def test_headless_label_zone_and_publish_not_ready(api: ApiServer, writer: SliceWriter) -> None:
    api.create(
        "nodes",
        {"metadata": {"name": "lab-node", "labels": {"topology.kubernetes.io/zone": "zone-a"}}},
    )
    writer.set_pod(pod("web-1", "198.18.64.10", ready=False))
    create_service(api, clusterIP="None", publishNotReadyAddresses=True)
    slice_ = only_slice(api)
    assert slice_["metadata"]["labels"][HEADLESS_LABEL] == ""
    endpoint = slice_["endpoints"][0]
    assert endpoint["zone"] == "zone-a"
    assert endpoint["conditions"] == {"ready": True, "serving": False, "terminating": False}


def test_only_pods_of_the_namespace_and_family(api: ApiServer, writer: SliceWriter) -> None:
    api.create("namespaces", {"metadata": {"name": "other"}})
    writer.set_pod(pod("web-1", "198.18.64.10"))
    writer.set_pod(pod("elsewhere", "198.18.64.11", namespace="other"))
    writer.set_pod(pod("v6", "2001:2::10"))
    create_service(api)
    assert addresses(only_slice(api)) == ["198.18.64.10"]


def test_explicit_sync_when_not_subscribed(api: ApiServer, clock: FakeClock) -> None:
    writer = SliceWriter(api, clock=clock, watch_services=False)
    writer.set_pod(pod("web-1", "198.18.64.10"))
    create_service(api)
    assert slices(api) == []
    writer.sync_service("default", "web")
    assert addresses(only_slice(api)) == ["198.18.64.10"]
    api.delete("services", "web", namespace="default")
    assert len(slices(api)) == 1  # nobody told the writer
    writer.sync_all()  # finds the orphaned slice and deletes it
    assert slices(api) == []


def test_services_created_over_http_get_slices(api: ApiServer, writer: SliceWriter) -> None:
    writer.set_pod(pod("web-1", "198.18.64.10"))
    url = api.start()
    try:
        body = {
            "metadata": {"name": "web"},
            "spec": {
                "selector": WEB,
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            },
        }
        request = urllib.request.Request(
            f"{url}/api/v1/namespaces/default/services",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 201
        assert addresses(only_slice(api)) == ["198.18.64.10"]
    finally:
        api.stop()


def test_a_dual_stack_service_gets_one_slice_per_family(clock: FakeClock) -> None:
    """As the EndpointSlice controller: a slice per address type; a pod with an address
    of each family appears in both, and the secondary family has no placeholder."""
    api = ApiServer(service_cidr="198.19.0.0/16,2001:2:0:ff::/112")
    writer = SliceWriter(api, clock=clock)
    try:
        dual = LabPod(
            name="web-1",
            namespace="default",
            ip="198.18.64.10",
            ip6="2001:2:0:40::a",
            node_name="lab-node",
            labels=WEB,
            ready=True,
            terminating=False,
            container_ports=PORTS,
        )
        writer.set_pod(dual)
        create_service(api, ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"])
        by_type = {s["addressType"]: addresses(s) for s in slices(api)}
        assert by_type == {"IPv4": ["198.18.64.10"], "IPv6": ["2001:2:0:40::a"]}
        writer.remove_pod("web-1", "default")
        by_type = {s["addressType"]: addresses(s) for s in slices(api)}
        assert by_type == {"IPv4": []}  # the primary family's placeholder only
    finally:
        writer.close()
