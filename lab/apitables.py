"""Server-side printing: `meta.k8s.io/v1 Table` answers, the columns `kubectl get` shows.

`kubectl get` (without `-o`) asks for `application/json;as=Table;v=v1;g=meta.k8s.io`
and prints whatever rows and columns the server sends; without tables it would fall
back to NAME and AGE only. The columns and cell formats here follow the real
server's printers (`pkg/printers/internalversion`) for the resources the double
serves: Services (TYPE, CLUSTER-IP, EXTERNAL-IP, PORT(S)), Nodes, Namespaces and
EndpointSlices (ADDRESSTYPE, PORTS, ENDPOINTS); anything else gets the default
NAME / CREATED AT table.

Each row carries the object as `includeObject` asks: `PartialObjectMetadata` (the
default; kubectl reads names and namespaces from it), `Object`, or `None`.

Pure functions of their inputs (plus the clock for AGE); safe from any thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

__all__ = ["TABLE_CONTENT_TYPE", "human_duration", "table"]

Obj = dict[str, Any]
TABLE_CONTENT_TYPE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def _column(name: str, kind: str = "string", fmt: str = "", priority: int = 0) -> Obj:
    return {"name": name, "type": kind, "format": fmt, "description": name, "priority": priority}


def human_duration(seconds: float) -> str:
    """`k8s.io/apimachinery/pkg/util/duration.HumanDuration`."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def _age(obj: Obj, now: float) -> str:
    stamp = (obj.get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return "<unknown>"
    try:
        created = datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "<unknown>"
    return human_duration(now - created)


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def _more(items: list[str], limit: int = 3) -> str:
    shown = ",".join(items[:limit])
    if len(items) > limit:
        return f"{shown} + {len(items) - limit} more..."
    return shown or "<unset>"


# -- Services ---------------------------------------------------------------------------


def _service_external_ip(spec: Obj, status: Obj) -> str:
    kind = spec.get("type") or "ClusterIP"
    external = [str(ip) for ip in spec.get("externalIPs") or []]
    if kind == "ExternalName":
        return str(spec.get("externalName") or "<none>")
    if kind == "LoadBalancer":
        ingress = (status.get("loadBalancer") or {}).get("ingress") or []
        addresses = [str(i.get("ip") or i.get("hostname") or "") for i in ingress]
        addresses = [a for a in addresses if a] + external
        return ",".join(addresses) if addresses else "<pending>"
    return ",".join(external) if external else "<none>"


def _service_ports(spec: Obj) -> str:
    parts = []
    for port in spec.get("ports") or []:
        protocol = port.get("protocol") or "TCP"
        if port.get("nodePort"):
            parts.append(f"{port.get('port')}:{port['nodePort']}/{protocol}")
        else:
            parts.append(f"{port.get('port')}/{protocol}")
    return ",".join(parts) or "<none>"


def _service_row(obj: Obj, now: float) -> list[Any]:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    cluster_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    selector = spec.get("selector") or {}
    return [
        _name(obj),
        spec.get("type") or "ClusterIP",
        cluster_ips[0] if cluster_ips else "<none>",
        _service_external_ip(spec, status),
        _service_ports(spec),
        _age(obj, now),
        ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "<none>",
    ]


_SERVICE_COLUMNS = [
    _column("Name", fmt="name"),
    _column("Type"),
    _column("Cluster-IP"),
    _column("External-IP"),
    _column("Port(s)"),
    _column("Age"),
    _column("Selector", priority=1),
]


# -- Nodes ------------------------------------------------------------------------------


def _node_row(obj: Obj, now: float) -> list[Any]:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    ready = conditions.get("Ready")
    state = "Ready" if ready == "True" else "NotReady" if ready == "False" else "Unknown"
    if spec.get("unschedulable"):
        state += ",SchedulingDisabled"
    labels = (obj.get("metadata") or {}).get("labels") or {}
    roles = sorted(
        {k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/")}
        | ({labels["kubernetes.io/role"]} if labels.get("kubernetes.io/role") else set())
    )
    addresses = status.get("addresses") or []

    def address(kind: str) -> str:
        found = [a.get("address") for a in addresses if a.get("type") == kind]
        return str(found[0]) if found else "<none>"

    info = status.get("nodeInfo") or {}
    return [
        _name(obj),
        state,
        ",".join(r for r in roles if r) or "<none>",
        _age(obj, now),
        info.get("kubeletVersion") or "",
        address("InternalIP"),
        address("ExternalIP"),
        info.get("osImage") or "<unknown>",
        info.get("kernelVersion") or "<unknown>",
        info.get("containerRuntimeVersion") or "<unknown>",
    ]


_NODE_COLUMNS = [
    _column("Name", fmt="name"),
    _column("Status"),
    _column("Roles"),
    _column("Age"),
    _column("Version"),
    _column("Internal-IP", priority=1),
    _column("External-IP", priority=1),
    _column("OS-Image", priority=1),
    _column("Kernel-Version", priority=1),
    _column("Container-Runtime", priority=1),
]


# -- Namespaces, EndpointSlices, default --------------------------------------------------


def _namespace_row(obj: Obj, now: float) -> list[Any]:
    return [_name(obj), (obj.get("status") or {}).get("phase") or "", _age(obj, now)]


_NAMESPACE_COLUMNS = [_column("Name", fmt="name"), _column("Status"), _column("Age")]


def _slice_row(obj: Obj, now: float) -> list[Any]:
    ports = []
    for port in obj.get("ports") or []:
        if port.get("port") is not None:
            ports.append(str(port["port"]))
        else:
            ports.append(str(port.get("name") or "*"))
    addresses = [
        str(address)
        for endpoint in obj.get("endpoints") or []
        for address in endpoint.get("addresses") or []
    ]
    return [
        _name(obj),
        obj.get("addressType") or "",
        _more(ports),
        _more(addresses),
        _age(obj, now),
    ]


_SLICE_COLUMNS = [
    _column("Name", fmt="name"),
    _column("AddressType"),
    _column("Ports"),
    _column("Endpoints"),
    _column("Age"),
]


def _default_row(obj: Obj, now: float) -> list[Any]:
    return [_name(obj), (obj.get("metadata") or {}).get("creationTimestamp")]


_DEFAULT_COLUMNS = [_column("Name", fmt="name"), _column("Created At", kind="date")]

_PRINTERS: dict[str, tuple[list[Obj], Callable[[Obj, float], list[Any]]]] = {
    "Service": (_SERVICE_COLUMNS, _service_row),
    "Node": (_NODE_COLUMNS, _node_row),
    "Namespace": (_NAMESPACE_COLUMNS, _namespace_row),
    "EndpointSlice": (_SLICE_COLUMNS, _slice_row),
}


def _row_object(obj: Obj, include_object: str) -> Obj | None:
    if include_object == "None":
        return None
    if include_object == "Object":
        return obj
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata") or {},
    }


def table(
    kind: str,
    objects: Iterable[Obj],
    *,
    resource_version: str = "",
    continue_token: str | None = None,
    include_object: str = "PartialObjectMetadata",
    headers: bool = True,
    clock: Callable[[], float] = time.time,
) -> Obj:
    """A `Table` of `objects` (all of kind `kind`); `headers=False` leaves the columns out,
    as the real server does for every watch event after the first."""
    columns, row = _PRINTERS.get(kind, (_DEFAULT_COLUMNS, _default_row))
    now = clock()
    rows = []
    for obj in objects:
        entry: Obj = {"cells": row(obj, now)}
        embedded = _row_object(obj, include_object)
        if embedded is not None:
            entry["object"] = embedded
        rows.append(entry)
    metadata: Obj = {}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    if continue_token:
        metadata["continue"] = continue_token
    result: Obj = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata}
    if headers:
        result["columnDefinitions"] = columns
    result["rows"] = rows
    return result
