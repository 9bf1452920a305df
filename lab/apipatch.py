"""PATCH bodies applied to plain JSON values: merge patch, "strategic" and JSON patch.

- `application/merge-patch+json` is RFC 7386: objects merge key by key, `null`
  deletes, anything else (lists included) replaces.
- `application/strategic-merge-patch+json` is treated as a merge patch, after
  dropping the `$patch`/`$setElementOrder/...`/`$retainKeys`/`$deleteFromPrimitiveList`
  directives kubectl adds. The real server merges some lists by key (a Service's
  ports by `port`); here a list in the patch replaces the stored one. Tests and the
  lab send whole lists, so the difference does not show.
- `application/json-patch+json` is RFC 6902 (`add`, `remove`, `replace`, `move`,
  `copy`, `test`) with RFC 6901 pointers.
- `application/apply-patch+yaml` (server-side apply) is applied as a merge patch of
  the YAML/JSON body; there is no field ownership.

Errors raise `PatchError`; the server answers 422 (a failed `test`, a bad path) or
400 (a body that does not decode), as the real one does. Pure functions: the inputs
are never modified; results share no mutable state with them.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml

__all__ = [
    "APPLY_PATCH",
    "JSON_PATCH",
    "MERGE_PATCH",
    "PATCH_TYPES",
    "STRATEGIC_MERGE_PATCH",
    "PatchError",
    "apply_patch",
]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (MERGE_PATCH, STRATEGIC_MERGE_PATCH, JSON_PATCH, APPLY_PATCH)


class PatchError(ValueError):
    """A patch that cannot be applied; `decode` is True when the body itself is bad."""

    def __init__(self, message: str, *, decode: bool = False) -> None:
        super().__init__(message)
        self.decode = decode


def decode_patch(body: bytes, patch_type: str) -> Any:
    try:
        if patch_type == APPLY_PATCH:
            return yaml.safe_load(body.decode())
        return json.loads(body)
    except (ValueError, yaml.YAMLError) as err:
        raise PatchError(f"couldn't decode the patch body: {err}", decode=True) from err


def apply_patch(target: dict[str, Any], patch: Any, patch_type: str) -> dict[str, Any]:
    """`target` with `patch` applied (a new value); raises `PatchError`."""
    if patch_type in (MERGE_PATCH, APPLY_PATCH):
        return _as_object(merge_patch(target, patch))
    if patch_type == STRATEGIC_MERGE_PATCH:
        return _as_object(merge_patch(target, _strip_directives(patch)))
    if patch_type == JSON_PATCH:
        return _as_object(json_patch(target, patch))
    raise PatchError(f"unsupported patch type {patch_type!r}")


def _as_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PatchError("the patched value is not an object")
    return value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _strip_directives(patch: Any) -> Any:
    if isinstance(patch, dict):
        if patch.get("$patch") == "delete":
            return None
        return {k: _strip_directives(v) for k, v in patch.items() if not str(k).startswith("$")}
    if isinstance(patch, list):
        return [_strip_directives(v) for v in patch if not (isinstance(v, dict) and "$patch" in v)]
    return patch


# -- RFC 6902 --------------------------------------------------------------------------


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise PatchError(f"invalid JSON pointer {path!r}")
    if not path:
        return []
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list[Any], token: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"invalid array index {token!r}")
    index = int(token)
    limit = len(container) if for_add else len(container) - 1
    if index > limit:
        raise PatchError(f"array index {index} out of range")
    return index


def _parent(doc: Any, parts: list[str]) -> Any:
    node = doc
    for token in parts[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"path element {token!r} not found")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, for_add=False)]
        else:
            raise PatchError(f"cannot descend into a scalar at {token!r}")
    return node


def _get(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return doc
    parent = _parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path element {last!r} not found")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, for_add=False)]
    raise PatchError("cannot index a scalar")


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, for_add=True), value)
    else:
        raise PatchError("cannot add to a scalar")
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise PatchError("cannot remove the whole document")
    parent = _parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path element {last!r} not found")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, for_add=False))
    raise PatchError("cannot remove from a scalar")


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations", decode=True)
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op:
            raise PatchError(f"invalid JSON patch operation {op!r}", decode=True)
        kind = op["op"]
        parts = _pointer(op.get("path"))
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"{kind} operation needs a value")
        if kind == "add":
            doc = _add(doc, parts, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, parts)
        elif kind == "replace":
            _get(doc, parts)
            if parts:
                _remove(doc, parts)
            doc = _add(doc, parts, copy.deepcopy(op["value"]))
        elif kind in ("move", "copy"):
            source = _pointer(op.get("from"))
            value = _get(doc, source)
            if kind == "move":
                _remove(doc, source)
            doc = _add(doc, parts, copy.deepcopy(value))
        elif kind == "test":
            if _get(doc, parts) != op["value"]:
                raise PatchError(f"test operation failed at {op.get('path')!r}")
        else:
            raise PatchError(f"unknown JSON patch operation {kind!r}", decode=True)
    return doc
