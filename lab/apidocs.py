"""Discovery and OpenAPI documents: what clients read before they touch a resource.

- `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<group>`, `/apis/<group>/<version>`
  are the classic (unaggregated) discovery documents, built from `RESOURCES`.
  kubectl 1.32 first asks for aggregated discovery
  (`application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList`); a reply
  with plain `application/json` makes it fall back to these, which is all it needs.
- `/openapi/v3` and `/openapi/v3/<api/v1|apis/g/v>` are minimal OpenAPI v3 documents:
  one PATCH operation per resource, tagged with `x-kubernetes-group-version-kind` and
  declaring the `fieldValidation` query parameter. That is exactly what kubectl's
  `QueryParamVerifierV3` looks for before `kubectl create`/`apply`: with it, kubectl
  leaves validation to the server (it sends `fieldValidation=Strict`, which the
  store honours for unknown fields) and needs no `--validate=false`. There are no
  schemas, so `kubectl explain` has nothing to show.

Pure functions of the resource table; documents are rebuilt per request (they are
small) and never cached across `RESOURCES` changes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lab.apitypes import RESOURCES, ResourceType

__all__ = [
    "SERVER_VERSION",
    "api_group",
    "api_group_list",
    "api_resource_list",
    "api_versions",
    "openapi_group_version",
    "openapi_root",
    "version_info",
]

Obj = dict[str, Any]
SERVER_VERSION = (1, 32, 0)

_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def version_info() -> Obj:
    major, minor, patch = SERVER_VERSION
    return {
        "major": str(major),
        "minor": str(minor),
        "gitVersion": f"v{major}.{minor}.{patch}-lab",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-12-11T00:00:00Z",
        "goVersion": "go1.23.4",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def _group_versions() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for rt in RESOURCES.values():
        versions = groups.setdefault(rt.group, [])
        if rt.version not in versions:
            versions.append(rt.version)
    return groups


def api_versions(server_address: str) -> Obj:
    """`/api`."""
    return {
        "kind": "APIVersions",
        "versions": _group_versions().get("", []),
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def api_group(group: str) -> Obj | None:
    """`/apis/<group>`, or None for a group we do not serve."""
    versions = _group_versions().get(group)
    if not group or not versions:
        return None
    listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": listed,
        "preferredVersion": listed[0],
    }


def api_group_list() -> Obj:
    """`/apis`."""
    groups = [api_group(g) for g in _group_versions() if g]
    for group in groups:
        if group is not None:
            group.pop("kind")
            group.pop("apiVersion")
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def _resources(group: str, version: str) -> list[ResourceType]:
    return [rt for rt in RESOURCES.values() if rt.group == group and rt.version == version]


def api_resource_list(group: str, version: str) -> Obj | None:
    """`/api/v1` or `/apis/<group>/<version>`, or None when we serve no such version."""
    types = _resources(group, version)
    if not types:
        return None
    resources: list[Obj] = []
    for rt in sorted(types, key=lambda t: t.plural):
        verbs = [v for v in _VERBS if not (v == "deletecollection" and rt.plural == "namespaces")]
        entry: Obj = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": verbs,
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        if rt.categories:
            entry["categories"] = list(rt.categories)
        resources.append(entry)
        if rt.status_subresource:
            resources.append(
                {
                    "name": f"{rt.plural}/status",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


# -- OpenAPI v3 ---------------------------------------------------------------------------


def _gv_paths() -> dict[str, tuple[str, str]]:
    return {
        (f"apis/{g}/{v}" if g else f"api/{v}"): (g, v)
        for g, versions in _group_versions().items()
        for v in versions
    }


def openapi_root() -> Obj:
    """`/openapi/v3`: where each group-version's document is."""
    paths = {}
    for path, (group, version) in _gv_paths().items():
        digest = hashlib.sha256(
            json.dumps(openapi_group_version_for(group, version), sort_keys=True).encode()
        ).hexdigest()[:32]
        paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest.upper()}"}
    return {"paths": paths}


def openapi_group_version(path: str) -> Obj | None:
    """`/openapi/v3/<path>` (path like `api/v1`), or None."""
    found = _gv_paths().get(path.strip("/"))
    return openapi_group_version_for(*found) if found else None


_FIELD_VALIDATION = {
    "name": "fieldValidation",
    "in": "query",
    "description": "fieldValidation instructs the server on how to handle objects in the "
    "request containing unknown or duplicate fields: Ignore, Warn or Strict.",
    "schema": {"type": "string", "uniqueItems": True},
}


def openapi_group_version_for(group: str, version: str) -> Obj:
    paths: Obj = {}
    for rt in _resources(group, version):
        prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
        item = (
            f"{prefix}/namespaces/{{namespace}}/{rt.plural}/{{name}}"
            if rt.namespaced
            else f"{prefix}/{rt.plural}/{{name}}"
        )
        gvk = {"group": group, "version": version, "kind": rt.kind}
        paths[item] = {
            "patch": {
                "description": f"partially update the specified {rt.kind}",
                "operationId": f"patch{rt.kind}",
                "parameters": [_FIELD_VALIDATION],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": gvk,
            },
            "put": {
                "description": f"replace the specified {rt.kind}",
                "operationId": f"replace{rt.kind}",
                "parameters": [_FIELD_VALIDATION],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "put",
                "x-kubernetes-group-version-kind": gvk,
            },
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (lab API double)", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }
