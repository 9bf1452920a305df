"""The resources the lab API double serves, and what is generic about validating them.

A `ResourceType` is everything the store, the HTTP layer, discovery and `kubectl`
need to know about one collection: its group/version/kind, whether it is namespaced,
its short names, which field selectors it supports, whether a DELETE answers with
the object or with a `Status` (as the real registry's `ReturnDeletedObject` decides),
and which subresources it has.

Resource-specific defaulting and validation (a Service's ClusterIP allocation, an
EndpointSlice's address checks) lives behind the `Admission` protocol; the store
calls it under its lock, so an admission may keep state (the IP allocator does).

Pure values and functions apart from the admissions' own state; see `apistore`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from lab.apierrors import FieldError
from lab.selectors import validate_label_key, validate_label_value

__all__ = [
    "RESOURCES",
    "Admission",
    "NoAdmission",
    "ResourceType",
    "selectable_fields",
    "validate_metadata",
]

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One collection of the API, e.g. `v1 services` or `discovery.k8s.io/v1 endpointslices`."""

    plural: str
    singular: str
    kind: str
    group: str
    """"" for the core group."""
    version: str
    namespaced: bool
    name_rule: str
    """`dns1035-label`, `dns1123-label` or `dns1123-subdomain`."""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    """Main-resource writes keep the stored status; `/status` writes change only it."""
    return_deleted_object: bool = False
    """DELETE answers with the object (else with a `Status` naming it)."""
    extra_fields: tuple[str, ...] = ()
    """Field selector paths beyond metadata.name and metadata.namespace."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def qualified(self) -> str:
        """kubectl's spelling: `services`, `endpointslices.discovery.k8s.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def group_version_path(self) -> str:
        """`api/v1` or `apis/<group>/<version>` (no leading slash)."""
        return f"apis/{self.group}/{self.version}" if self.group else f"api/{self.version}"

    @property
    def supported_fields(self) -> tuple[str, ...]:
        return ("metadata.name", "metadata.namespace", *self.extra_fields)


RESOURCES: dict[str, ResourceType] = {
    rt.plural: rt
    for rt in (
        ResourceType(
            "namespaces",
            "namespace",
            "Namespace",
            "",
            "v1",
            namespaced=False,
            name_rule="dns1123-label",
            short_names=("ns",),
            status_subresource=True,
            return_deleted_object=True,
            extra_fields=("status.phase",),
        ),
        ResourceType(
            "nodes",
            "node",
            "Node",
            "",
            "v1",
            namespaced=False,
            name_rule="dns1123-subdomain",
            short_names=("no",),
            status_subresource=True,
            extra_fields=("spec.unschedulable",),
        ),
        ResourceType(
            "services",
            "service",
            "Service",
            "",
            "v1",
            namespaced=True,
            name_rule="dns1035-label",
            short_names=("svc",),
            categories=("all",),
            status_subresource=True,
            return_deleted_object=True,
            extra_fields=("spec.clusterIP", "spec.type"),
        ),
        # The lab has no Pod objects (see `slicewriter`); the collection exists, empty
        # unless a test fills it, because kubectl (`describe node`) reads it.
        ResourceType(
            "pods",
            "pod",
            "Pod",
            "",
            "v1",
            namespaced=True,
            name_rule="dns1123-subdomain",
            short_names=("po",),
            categories=("all",),
            status_subresource=True,
            return_deleted_object=True,
            extra_fields=("spec.nodeName", "status.phase", "status.podIP"),
        ),
        ResourceType(
            "events",
            "event",
            "Event",
            "",
            "v1",
            namespaced=True,
            name_rule="dns1123-subdomain",
            short_names=("ev",),
            extra_fields=(
                "involvedObject.kind",
                "involvedObject.name",
                "involvedObject.namespace",
                "reason",
                "type",
            ),
        ),
        ResourceType(
            "endpointslices",
            "endpointslice",
            "EndpointSlice",
            "discovery.k8s.io",
            "v1",
            namespaced=True,
            name_rule="dns1123-subdomain",
        ),
    )
}


def _dig(obj: Mapping[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def selectable_fields(rt: ResourceType, obj: Mapping[str, Any]) -> dict[str, str]:
    """The field-selector view of `obj`: every supported field as a string."""
    meta = obj.get("metadata") or {}
    fields = {
        "metadata.name": str(meta.get("name") or ""),
        "metadata.namespace": str(meta.get("namespace") or ""),
    }
    for path in rt.extra_fields:
        value = _dig(obj, path)
        if isinstance(value, bool):
            # Go formats a bool field as "true"/"false"; unset reads as "false" too.
            fields[path] = "true" if value else "false"
        elif path == "spec.unschedulable" and value is None:
            fields[path] = "false"
        else:
            fields[path] = "" if value is None else str(value)
    return fields


# -- metadata --------------------------------------------------------------------------

_NAME_RULES = {
    "dns1035-label": (
        re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$"),
        63,
        "a DNS-1035 label must consist of lower case alphanumeric characters or '-', "
        "start with an alphabetic character, and end with an alphanumeric character "
        "(e.g. 'my-name',  or 'abc-123', regex used for validation is "
        "'[a-z]([-a-z0-9]*[a-z0-9])?')",
    ),
    "dns1123-label": (
        re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        63,
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
        "or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  "
        "or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
    ),
    "dns1123-subdomain": (
        re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        253,
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
        "characters, '-' or '.', and must start and end with an alphanumeric character "
        "(e.g. 'example.com', regex used for validation is "
        "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
    ),
}


def validate_metadata(rt: ResourceType, obj: Obj) -> list[FieldError]:
    """Name, labels and annotations, as the real API checks them on every write."""
    errors: list[FieldError] = []
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [FieldError("metadata", "Required")]
    name = meta.get("name")
    pattern, max_len, message = _NAME_RULES[rt.name_rule]
    if not isinstance(name, str) or not name:
        errors.append(
            FieldError("metadata.name", "Required", detail="name or generateName is required")
        )
    elif len(name) > max_len:
        errors.append(
            FieldError(
                "metadata.name", "Invalid", name, f"must be no more than {max_len} characters"
            )
        )
    elif not pattern.match(name):
        errors.append(FieldError("metadata.name", "Invalid", name, message))
    labels = meta.get("labels")
    if labels is not None and not isinstance(labels, dict):
        errors.append(FieldError("metadata.labels", "Invalid", labels, "must be a map"))
    elif labels:
        for key, value in labels.items():
            if (why := validate_label_key(str(key))) is not None:
                errors.append(FieldError("metadata.labels", "Invalid", key, why))
            if not isinstance(value, str):
                errors.append(
                    FieldError(f"metadata.labels[{key}]", "Invalid", value, "must be a string")
                )
            elif (why := validate_label_value(value)) is not None:
                errors.append(FieldError("metadata.labels", "Invalid", value, why))
    annotations = meta.get("annotations")
    if annotations is not None and (
        not isinstance(annotations, dict)
        or not all(isinstance(v, str) for v in annotations.values())
    ):
        errors.append(
            FieldError("metadata.annotations", "Invalid", annotations, "must be a map of strings")
        )
    finalizers = meta.get("finalizers")
    if finalizers is not None and (
        not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers)
    ):
        errors.append(FieldError("metadata.finalizers", "Invalid", finalizers, "must be strings"))
    return errors


# -- admission -------------------------------------------------------------------------


class Admission(Protocol):
    """Resource-specific defaulting, validation and allocation, run under the store lock.

    `create`/`update` default `obj`/`new` in place and return the field errors; they
    reserve what they allocate only when they return no error, so a rejected write
    leaves nothing behind. `release` frees what a deleted object held.
    """

    def create(self, obj: Obj) -> list[FieldError]: ...

    def update(self, new: Obj, old: Obj) -> list[FieldError]: ...

    def release(self, obj: Obj) -> None: ...

    def observe(self, obj: Obj) -> None:
        """Record what an object stored without admission (`validate=False`) holds."""
        ...


class NoAdmission:
    """Nothing to default or allocate."""

    def create(self, obj: Obj) -> list[FieldError]:
        return []

    def update(self, new: Obj, old: Obj) -> list[FieldError]:
        return []

    def release(self, obj: Obj) -> None:
        return None

    def observe(self, obj: Obj) -> None:
        return None


class NamespaceAdmission(NoAdmission):
    """Phase Active, the `kubernetes` finalizer and the `kubernetes.io/metadata.name` label."""

    def create(self, obj: Obj) -> list[FieldError]:
        self._default(obj)
        return []

    def update(self, new: Obj, old: Obj) -> list[FieldError]:
        self._default(new)
        return []

    @staticmethod
    def _default(obj: Obj) -> None:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        labels["kubernetes.io/metadata.name"] = meta["name"]
        meta["labels"] = labels
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        assert isinstance(spec, dict)
        spec.setdefault("finalizers", ["kubernetes"])
        obj["spec"] = spec
        status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
        assert isinstance(status, dict)
        status.setdefault("phase", "Active")
        obj["status"] = status


class NodeAdmission(NoAdmission):
    """`spec` and `status` always exist on a real Node (Go structs are never omitted)."""

    def create(self, obj: Obj) -> list[FieldError]:
        return self._default(obj)

    def update(self, new: Obj, old: Obj) -> list[FieldError]:
        return self._default(new)

    @staticmethod
    def _default(obj: Obj) -> list[FieldError]:
        for part in ("spec", "status"):
            if obj.get(part) is None:
                obj[part] = {}
            elif not isinstance(obj[part], dict):
                return [FieldError(part, "Invalid", obj[part], "must be an object")]
        return []


_ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
_PROTOCOLS = ("TCP", "UDP", "SCTP")


class EndpointSliceAdmission(NoAdmission):
    """The checks of `pkg/apis/discovery/validation` that a writer can get wrong."""

    def create(self, obj: Obj) -> list[FieldError]:
        return self._validate(obj)

    def update(self, new: Obj, old: Obj) -> list[FieldError]:
        errors = self._validate(new)
        if new.get("addressType") != old.get("addressType"):
            errors.append(
                FieldError("addressType", "Invalid", new.get("addressType"), "field is immutable")
            )
        return errors

    @staticmethod
    def _validate(obj: Obj) -> list[FieldError]:
        errors: list[FieldError] = []
        address_type = obj.get("addressType")
        if not address_type:
            errors.append(FieldError("addressType", "Required"))
        elif address_type not in _ADDRESS_TYPES:
            errors.append(FieldError("addressType", "NotSupported", address_type))
        endpoints = obj.get("endpoints") or []
        if not isinstance(endpoints, list):
            return [*errors, FieldError("endpoints", "Invalid", endpoints, "must be a list")]
        if len(endpoints) > 1000:
            errors.append(
                FieldError("endpoints", "Invalid", len(endpoints), "must have at most 1000 items")
            )
        for i, endpoint in enumerate(endpoints):
            addresses = endpoint.get("addresses") if isinstance(endpoint, dict) else None
            if not addresses or not isinstance(addresses, list):
                errors.append(FieldError(f"endpoints[{i}].addresses", "Required"))
                continue
            for j, address in enumerate(addresses):
                if not _address_ok(address_type, address):
                    errors.append(
                        FieldError(
                            f"endpoints[{i}].addresses[{j}]",
                            "Invalid",
                            address,
                            f"must be a valid {address_type} address",
                        )
                    )
        ports = obj.get("ports") or []
        if not isinstance(ports, list):
            return [*errors, FieldError("ports", "Invalid", ports, "must be a list")]
        for i, port in enumerate(ports):
            if not isinstance(port, dict):
                errors.append(FieldError(f"ports[{i}]", "Invalid", port, "must be an object"))
                continue
            number = port.get("port")
            if number is not None and (not isinstance(number, int) or not 0 < number < 65536):
                errors.append(
                    FieldError(
                        f"ports[{i}].port",
                        "Invalid",
                        number,
                        "must be between 1 and 65535, inclusive",
                    )
                )
            protocol = port.get("protocol")
            if protocol is not None and protocol not in _PROTOCOLS:
                errors.append(FieldError(f"ports[{i}].protocol", "NotSupported", protocol))
        return errors


def _address_ok(address_type: Any, address: Any) -> bool:
    if not isinstance(address, str):
        return False
    if address_type == "FQDN":
        return bool(address)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.version == (4 if address_type == "IPv4" else 6)


# -- strict field validation (`fieldValidation=Strict`, kubectl's default) -------------

_METADATA_FIELDS = frozenset(
    [
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    ]
)
_TOP_FIELDS = {
    "Service": ("spec", "status"),
    "Node": ("spec", "status"),
    "Pod": ("spec", "status"),
    "Namespace": ("spec", "status"),
    "EndpointSlice": ("addressType", "endpoints", "ports"),
    "Event": (
        "involvedObject",
        "reason",
        "message",
        "source",
        "firstTimestamp",
        "lastTimestamp",
        "count",
        "type",
        "eventTime",
        "series",
        "action",
        "related",
        "reportingComponent",
        "reportingInstance",
    ),
}
_SERVICE_SPEC_FIELDS = frozenset(
    [
        "ports",
        "selector",
        "clusterIP",
        "clusterIPs",
        "type",
        "externalIPs",
        "sessionAffinity",
        "loadBalancerIP",
        "loadBalancerSourceRanges",
        "externalName",
        "externalTrafficPolicy",
        "healthCheckNodePort",
        "publishNotReadyAddresses",
        "sessionAffinityConfig",
        "ipFamilies",
        "ipFamilyPolicy",
        "allocateLoadBalancerNodePorts",
        "loadBalancerClass",
        "internalTrafficPolicy",
        "trafficDistribution",
    ]
)
_SERVICE_PORT_FIELDS = frozenset(
    ["name", "protocol", "appProtocol", "port", "targetPort", "nodePort"]
)


def unknown_fields(rt: ResourceType, obj: Obj, *, remove: bool = False) -> list[str]:
    """Field paths the real decoder does not know (the common cases only).

    In strict mode the API rejects them; otherwise it silently drops them, which
    `remove=True` does here (the object is changed in place).
    """
    found: list[tuple[dict[str, Any], str, str]] = []

    def scan(container: Any, allowed: Iterable[str], prefix: str) -> None:
        if isinstance(container, dict):
            known = set(allowed)
            found.extend((container, k, f"{prefix}{k}") for k in container if k not in known)

    scan(obj, ("apiVersion", "kind", "metadata", *_TOP_FIELDS.get(rt.kind, ())), "")
    scan(obj.get("metadata"), _METADATA_FIELDS, "metadata.")
    spec = obj.get("spec")
    if rt.kind == "Service" and isinstance(spec, dict):
        scan(spec, _SERVICE_SPEC_FIELDS, "spec.")
        ports = spec.get("ports")
        for i, port in enumerate(ports if isinstance(ports, list) else []):
            scan(port, _SERVICE_PORT_FIELDS, f"spec.ports[{i}].")
    if remove:
        for container, key, _ in found:
            del container[key]
    return [path for _, _, path in found]
