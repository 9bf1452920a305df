"""The lab's EndpointSlice controller: Services plus Python-valued pods in, slices out.

The lab has no kubelet and no Pod objects; its pods are `LabPod` values handed to
`SliceWriter.set_pod` / `remove_pod`. The writer keeps the EndpointSlices in the API
consistent with them and with the Services' `spec.selector`, the way kube's
EndpointSlice controller does, so the proxy under test sees what it would see on a
real cluster:

- services with a selector (not ExternalName) get slices labelled
  `kubernetes.io/service-name=<svc>` and
  `endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io` (plus the
  service's own labels, and `service.kubernetes.io/headless` for headless ones),
  owned by the service, named `<svc>-<random>` (generateName);
- an endpoint per matching pod of the service's IP family: `addresses` [pod IP],
  `conditions` ready (= ready and not terminating, or `publishNotReadyAddresses`),
  serving (= ready), terminating, `nodeName`, `zone` (from the Node's
  `topology.kubernetes.io/zone` label, when the Node exists), and a Pod `targetRef`;
- ports named as the service ports, with named `targetPort`s resolved per pod from
  its `container_ports` (name and protocol must match); a pod lacking a named port
  is left out of that port. Pods are grouped by their resolved port set, one slice
  per group (upstream also caps slices at 100 endpoints; we do not). A service with
  no endpoints gets one empty placeholder slice, as upstream does;
- `endpoints.kubernetes.io/last-change-trigger-time` is the RFC 3339 time (UTC,
  fractional seconds) of the oldest pod or service change not yet written, and a
  slice is written only when its content changes. Existing slices are updated in
  place where possible, so their names stay stable.
- deleting the service, removing its selector or making it ExternalName deletes
  its slices.

Reacting to Services: the writer subscribes to the store's change notifications
(`subscribe`), so any Service created, updated or deleted through the store or over
HTTP (kubectl too) is synced at once, on the writing thread. `sync_service` and
`sync_all` may also be called explicitly; syncing is idempotent and level-based (it
reads the current Service), so calling it twice or out of order is harmless.

Concurrency: one re-entrant lock serialises all of the writer's work; store calls
are made with it held (the store's own lock is never held while we wait for ours,
see `apistore`). Any thread may call any method.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from lab.apierrors import ApiStatusError
from lab.apistore import StoreChange
from lab.selectors import LabelSelector

__all__ = [
    "HEADLESS_LABEL",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "SERVICE_NAME_LABEL",
    "TRIGGER_TIME_ANNOTATION",
    "LabPod",
    "SliceStore",
    "SliceWriter",
    "rfc3339_nano",
]

log = logging.getLogger(__name__)

Obj = dict[str, Any]
ObjList = list[Obj]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"
HEADLESS_LABEL = "service.kubernetes.io/headless"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
ZONE_LABEL = "topology.kubernetes.io/zone"
_RESERVED_LABELS = (SERVICE_NAME_LABEL, MANAGED_BY_LABEL)


@dataclass(frozen=True)
class LabPod:
    """A pod as the lab knows it: no API object, just what a slice needs."""

    name: str
    namespace: str
    ip: str
    node_name: str
    labels: Mapping[str, str]
    ready: bool
    terminating: bool
    container_ports: Mapping[str, tuple[int, str]]
    """Named container ports: name -> (port, protocol)."""
    ip6: str = ""
    """The pod's IPv6 address on a dual-stack lab ("" when it has none)."""

    def ip_of(self, address_type: str) -> str | None:
        """The pod's address of one slice address type, if it has one."""
        for ip in (self.ip, self.ip6):
            if ip and _family_of(ip) == address_type:
                return ip
        return None

    @property
    def uid(self) -> str:
        """A stable made-up UID (for the endpoint's `targetRef`)."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"lab-pod:{self.namespace}/{self.name}"))


class SliceStore(Protocol):
    """What the writer needs from the API (`ApiServer` and `Store` both fit)."""

    def get(self, resource: str, name: str, *, namespace: str | None = None) -> Obj: ...

    def list(
        self,
        resource: str,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> ObjList: ...

    def create(
        self, resource: str, obj: Obj, *, namespace: str | None = None, validate: bool = True
    ) -> Obj: ...

    def update(
        self,
        resource: str,
        obj: Obj,
        *,
        namespace: str | None = None,
        subresource: str | None = None,
        validate: bool = True,
    ) -> Obj: ...

    def delete(self, resource: str, name: str, *, namespace: str | None = None) -> Obj: ...

    def subscribe(self, listener: Callable[[StoreChange], None]) -> Callable[[], None]: ...


def rfc3339_nano(when: float) -> str:
    """Go's `time.RFC3339Nano` in UTC: `2024-05-01T12:00:00.123456Z` (no trailing zeros)."""
    stamp = datetime.fromtimestamp(when, UTC)
    fraction = f"{stamp.microsecond:06d}".rstrip("0")
    return stamp.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def _resolve_port(service_port: Obj, pod: LabPod) -> int | None:
    """`podutil.FindPort`: a number as is, a name via the pod's ports (same protocol)."""
    target = service_port.get("targetPort")
    if target in (None, 0, ""):
        target = service_port.get("port")
    if isinstance(target, int):
        return target
    found = pod.container_ports.get(str(target))
    if found is None or found[1] != (service_port.get("protocol") or "TCP"):
        return None
    return found[0]


def _family_of(ip: str) -> str | None:
    try:
        return "IPv6" if ipaddress.ip_address(ip).version == 6 else "IPv4"
    except ValueError:
        return None


PortKey = tuple[tuple[str, int, str], ...]


def _port_key(address_type: str, ports: list[Obj] | None) -> tuple[str, PortKey]:
    return address_type, tuple(
        sorted(
            (str(p.get("name") or ""), int(p.get("port") or 0), str(p.get("protocol") or "TCP"))
            for p in ports or []
        )
    )


@dataclass
class _Group:
    ports: list[Obj]
    endpoints: list[Obj]


class SliceWriter:
    """Keeps EndpointSlices in step with Services and `LabPod`s; see the module doc."""

    def __init__(
        self,
        store: SliceStore,
        *,
        clock: Callable[[], float] = time.time,
        watch_services: bool = True,
    ) -> None:
        """`watch_services=False` leaves syncing Services to explicit calls."""
        self._store = store
        self._clock = clock
        self._lock = threading.RLock()
        self._pods: dict[tuple[str, str], LabPod] = {}
        self._pending: dict[tuple[str, str], float] = {}
        self._unsubscribe = store.subscribe(self._on_change) if watch_services else None

    def close(self) -> None:
        """Stop reacting to Service changes (slices stay as they are)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    @property
    def pods(self) -> list[LabPod]:
        with self._lock:
            return list(self._pods.values())

    # -- inputs --------------------------------------------------------------------------------

    def set_pod(self, pod: LabPod) -> None:
        """Add or change a pod; every service selecting it (before or after) is synced."""
        with self._lock:
            old = self._pods.get((pod.namespace, pod.name))
            self._pods[(pod.namespace, pod.name)] = pod
            labels = [pod.labels] + ([old.labels] if old is not None else [])
            self._sync_selecting(pod.namespace, labels)

    def remove_pod(self, name: str, namespace: str) -> None:
        """Forget a pod (deleted); the services that selected it are synced."""
        with self._lock:
            old = self._pods.pop((namespace, name), None)
            if old is not None:
                self._sync_selecting(namespace, [old.labels])

    def sync_all(self) -> None:
        """Sync every service (and drop slices of services that no longer exist)."""
        with self._lock:
            names = {
                (svc["metadata"]["namespace"], svc["metadata"]["name"])
                for svc in self._store.list("services")
            }
            names |= {
                (s["metadata"]["namespace"], s["metadata"]["labels"][SERVICE_NAME_LABEL])
                for s in self._store.list(
                    "endpointslices", label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}"
                )
                if SERVICE_NAME_LABEL in (s["metadata"].get("labels") or {})
            }
            for namespace, name in sorted(names):
                self.sync_service(namespace, name)

    def _on_change(self, change: StoreChange) -> None:
        if change.resource != "services":
            return
        with self._lock:
            self._mark(change.namespace, change.name)
            self.sync_service(change.namespace, change.name)

    def _mark(self, namespace: str, service: str) -> None:
        now = self._clock()
        key = (namespace, service)
        self._pending[key] = min(self._pending.get(key, now), now)

    def _sync_selecting(self, namespace: str, label_sets: list[Mapping[str, str]]) -> None:
        for svc in self._store.list("services", namespace=namespace):
            selector = (svc.get("spec") or {}).get("selector") or {}
            matches = LabelSelector.from_map(selector).matches
            if selector and any(matches(labels) for labels in label_sets):
                self._mark(namespace, svc["metadata"]["name"])
                self.sync_service(namespace, svc["metadata"]["name"])

    # -- the reconciliation ---------------------------------------------------------------------

    def sync_service(self, namespace: str, name: str) -> None:
        """Make the service's slices match its current spec and pods."""
        with self._lock:
            try:
                service: Obj | None = self._store.get("services", name, namespace=namespace)
            except ApiStatusError as err:
                if err.code != 404:
                    raise
                service = None
            existing = self._store.list(
                "endpointslices",
                namespace=namespace,
                label_selector=f"{SERVICE_NAME_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}",
            )
            trigger = self._pending.pop((namespace, name), None)
            spec = (service or {}).get("spec") or {}
            if service is None or not spec.get("selector") or spec.get("type") == "ExternalName":
                for stale in existing:
                    self._delete(stale)
                return
            self._reconcile(service, existing, trigger if trigger is not None else self._clock())

    def _reconcile(self, service: Obj, existing: ObjList, trigger: float) -> None:
        namespace = service["metadata"]["namespace"]
        wanted = {
            _port_key(address_type, g.ports): (address_type, g)
            for address_type, groups in self._desired(service)
            for g in groups
        }
        have: dict[tuple[str, PortKey], Obj] = {}
        leftovers: ObjList = []
        for slice_ in existing:
            key = _port_key(str(slice_.get("addressType")), slice_.get("ports"))
            if key in wanted and key not in have:
                have[key] = slice_
            else:
                leftovers.append(slice_)
        stamp = rfc3339_nano(trigger)
        for key, (address_type, group) in wanted.items():
            body = self._slice_body(service, address_type, group, stamp)
            current = have.get(key)
            reusable = [s for s in leftovers if s.get("addressType") == address_type]
            if current is None and reusable:
                current = reusable[0]  # reuse a slice whose ports changed: stable name
                leftovers.remove(current)
            if current is None:
                self._store.create("endpointslices", body, namespace=namespace)
            elif self._differs(current, body):
                body["metadata"] = {
                    **current["metadata"],
                    "labels": body["metadata"]["labels"],
                    "annotations": {
                        **(current["metadata"].get("annotations") or {}),
                        TRIGGER_TIME_ANNOTATION: stamp,
                    },
                    "ownerReferences": body["metadata"]["ownerReferences"],
                }
                self._store.update("endpointslices", body, namespace=namespace)
        for stale in leftovers:
            self._delete(stale)

    @staticmethod
    def _differs(current: Obj, body: Obj) -> bool:
        meta = current.get("metadata") or {}
        return bool(
            current.get("endpoints") != body["endpoints"]
            or (current.get("ports") or []) != body["ports"]
            or meta.get("labels") != body["metadata"]["labels"]
            or meta.get("ownerReferences") != body["metadata"]["ownerReferences"]
        )

    def _delete(self, slice_: Obj) -> None:
        meta = slice_["metadata"]
        try:
            self._store.delete("endpointslices", meta["name"], namespace=meta["namespace"])
        except ApiStatusError as err:
            if err.code != 404:
                raise

    def _desired(self, service: Obj) -> list[tuple[str, list[_Group]]]:
        """The slices a Service needs, per address type: one per family it has, as the
        EndpointSlice controller writes them (a placeholder only for the primary one)."""
        families = (service["spec"].get("ipFamilies") or ["IPv4"])[:2]
        desired = []
        for index, family in enumerate(families):
            address_type = "IPv6" if family == "IPv6" else "IPv4"
            groups = self._desired_of(service, address_type)
            if groups or index == 0:
                desired.append((address_type, groups or [_Group([], [])]))  # placeholder
        return desired

    def _desired_of(self, service: Obj, address_type: str) -> list[_Group]:
        meta, spec = service["metadata"], service["spec"]
        namespace = meta["namespace"]
        selector = LabelSelector.from_map(spec.get("selector") or {})
        publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
        zones: dict[str, str | None] = {}
        groups: dict[PortKey, _Group] = {}
        for (pod_ns, _), pod in sorted(self._pods.items()):
            if pod_ns != namespace or not selector.matches(pod.labels):
                continue
            ip = pod.ip_of(address_type)
            if ip is None:
                continue
            ports = []
            for service_port in spec.get("ports") or []:
                number = _resolve_port(service_port, pod)
                if number is None:
                    continue
                port: Obj = {
                    "name": service_port.get("name") or "",
                    "port": number,
                    "protocol": service_port.get("protocol") or "TCP",
                }
                if service_port.get("appProtocol"):
                    port["appProtocol"] = service_port["appProtocol"]
                ports.append(port)
            group = groups.setdefault(_port_key(address_type, ports)[1], _Group(ports, []))
            group.endpoints.append(self._endpoint(pod, ip, publish_not_ready, zones))
        return list(groups.values())

    def _endpoint(
        self, pod: LabPod, ip: str, publish_not_ready: bool, zones: dict[str, str | None]
    ) -> Obj:
        serving = pod.ready
        endpoint: Obj = {
            "addresses": [ip],
            "conditions": {
                "ready": publish_not_ready or (serving and not pod.terminating),
                "serving": serving,
                "terminating": pod.terminating,
            },
        }
        if pod.node_name:
            endpoint["nodeName"] = pod.node_name
            if pod.node_name not in zones:
                zones[pod.node_name] = self._zone(pod.node_name)
            zone = zones[pod.node_name]
            if zone:
                endpoint["zone"] = zone
        endpoint["targetRef"] = {
            "kind": "Pod",
            "namespace": pod.namespace,
            "name": pod.name,
            "uid": pod.uid,
        }
        return endpoint

    def _zone(self, node_name: str) -> str | None:
        try:
            node = self._store.get("nodes", node_name)
        except ApiStatusError:
            return None
        return ((node.get("metadata") or {}).get("labels") or {}).get(ZONE_LABEL)

    @staticmethod
    def _slice_body(service: Obj, address_type: str, group: _Group, stamp: str) -> Obj:
        meta = service["metadata"]
        labels = {k: v for k, v in (meta.get("labels") or {}).items() if k not in _RESERVED_LABELS}
        labels[SERVICE_NAME_LABEL] = meta["name"]
        labels[MANAGED_BY_LABEL] = MANAGED_BY
        if (service.get("spec") or {}).get("clusterIP") == "None":
            labels[HEADLESS_LABEL] = ""
        else:
            labels.pop(HEADLESS_LABEL, None)
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "generateName": f"{meta['name']}-",
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": {TRIGGER_TIME_ANNOTATION: stamp},
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "name": meta["name"],
                        "uid": meta.get("uid", ""),
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "addressType": address_type,
            "endpoints": group.endpoints,
            "ports": group.ports,
        }
